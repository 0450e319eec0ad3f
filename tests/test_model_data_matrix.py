"""Every model trains one step through the entry point on every dataset's shape.

Synthetic data (``data=synthetic data.synthetic_like=<name>``) has each dataset's exact
channels, image size and class count, so this pins that every model adapts to every dataset
without needing the files; the file formats themselves are covered in test_data_*.py.
"""

from __future__ import annotations

import math

import pytest

from zsharp_sweeps.config import validate
from zsharp_sweeps.train import run_training

from .conftest import CONF_DIR

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml") if p.stem != "synthetic")
# Keep the CPU cost of the two biggest networks small; their code path is the same.
SLIMMER = {"wrn28_10": ["model.params.width=2"], "vgg19_bn": [], "vgg16_bn": []}


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_one_training_step(model: str, dataset: str, make_cfg) -> None:
    cfg = make_cfg(
        [
            "data=synthetic", f"data.synthetic_like={dataset}", "data.synthetic_size=12",
            "data.val_size=4", "data.batch_size=4", "data.eval_batch_size=8",
            f"model={model}", *SLIMMER.get(model, []), "optimizer=zsharp",
            "trainer.epochs=1", "trainer.max_steps_per_epoch=1", "sharpness=none",
            "tracking=off",
        ],
    )
    train_cfg = validate(cfg)
    summary = run_training(train_cfg)
    assert math.isfinite(summary["final_test_loss"])
    assert 0.0 <= summary["best_val_acc"] <= 1.0
