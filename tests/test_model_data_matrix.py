"""Every model adapts to every dataset's shape: one forward/backward per pair.

Each model is built from its composed ``conf/model/<name>.yaml`` with the channels, class
count and image size that ``data=<dataset>`` trains on (``data.image_size`` if set, else the
dataset's native size), exactly as ``build_parts`` does. A forward/backward on two random
images pins what a shape mismatch would break (logits shape, every weight reached by the
gradient) without the cost of full runs; the entry point itself is covered by
test_train.py, the file formats by test_data_*.py.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from zsharp_sweeps.config import DataConfig, ModelConfig, validate
from zsharp_sweeps.data import SPECS
from zsharp_sweeps.models import build_model

from .conftest import CONF_DIR

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml") if p.stem != "synthetic")
# Keep the CPU cost of the widest network small; its code path is the same at width 2.
SLIMMER = {"wrn28_10": {"width": 2}}


@functools.cache
def _composed(model: str, dataset: str) -> tuple[ModelConfig, DataConfig]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = validate(compose(config_name="config", overrides=[f"model={model}",
                                                                f"data={dataset}"]))
    return cfg.model, cfg.data


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_one_forward_backward(model: str, dataset: str) -> None:
    model_cfg, data_cfg = _composed(model, dataset)
    model_cfg = replace(model_cfg, params={**model_cfg.params, **SLIMMER.get(model, {})})
    spec = SPECS[dataset]
    size = data_cfg.image_size or spec.image_size
    net = build_model(model_cfg, in_channels=spec.in_channels, num_classes=spec.num_classes,
                      image_size=size)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, spec.in_channels, size, size, generator=gen)
    targets = torch.tensor([0, spec.num_classes - 1])

    logits = net(images)
    assert logits.shape == (2, spec.num_classes)
    loss = F.cross_entropy(logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in net.named_parameters():
        assert param.grad is not None, f"{model} on {dataset}: no gradient reaches {name}"
        assert torch.isfinite(param.grad).all(), f"{model} on {dataset}: {name}"
