"""One table of optimizers (zsharp_sweeps/optim/registry.py): config, factory and conf/ agree,
and a newly registered optimizer needs nothing else to be valid and buildable."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from zsharp_sweeps.config import ConfigError, OptimizerConfig
from zsharp_sweeps.optim import SAM, SAMBase, build_optimizer
from zsharp_sweeps.optim.registry import BASES, SAM_FAMILY, optimizer_names, register_sam

from .conftest import CONF_DIR


def test_every_registered_optimizer_has_its_yaml_and_back() -> None:
    on_disk = {
        p.stem: OmegaConf.load(p).get("name") for p in (CONF_DIR / "optimizer").glob("*.yaml")
    }
    assert all(stem == name for stem, name in on_disk.items()), on_disk
    assert set(on_disk) == set(optimizer_names())
    assert set(BASES) == {"sgd", "adam", "adamw"}
    assert not set(BASES) & set(SAM_FAMILY)


@pytest.mark.parametrize("name", optimizer_names())
def test_each_name_builds_its_optimizer_with_the_config_values(name: str) -> None:
    cfg = OptimizerConfig(name=name, base="adam", lr=0.02, rho=0.07)
    opt = build_optimizer(cfg, nn.Linear(3, 2))
    group = opt.param_groups[0]
    assert group["lr"] == 0.02
    if name in BASES:
        assert not isinstance(opt, SAMBase)
        assert type(opt).__name__.lower() == name
    else:
        assert isinstance(opt, SAMBase)
        assert isinstance(opt.base_optimizer, torch.optim.Adam)
        assert group["rho"] == 0.07


@pytest.fixture
def registered_twin() -> Iterator[str]:
    """A SAM variant registered the way a new optimizer module would, removed afterwards."""
    name = "sam_twin_for_test"

    @register_sam(name)
    def _twin(named: Any, base: type[torch.optim.Optimizer], base_kwargs: dict[str, Any],
              cfg: OptimizerConfig) -> SAM:
        return SAM(named, base, rho=cfg.rho * 2, **base_kwargs)

    try:
        yield name
    finally:
        SAM_FAMILY.pop(name)


def test_a_registered_optimizer_is_valid_and_buildable(registered_twin: str) -> None:
    cfg = OptimizerConfig(name=registered_twin, rho=0.1)  # the schema accepts it at once
    opt = build_optimizer(cfg, nn.Linear(3, 2))
    assert isinstance(opt, SAM)
    assert opt.param_groups[0]["rho"] == pytest.approx(0.2)
    assert registered_twin in optimizer_names()


def test_unknown_and_duplicate_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="optimizer.name='nope' is invalid: allowed one of sgd"):
        OptimizerConfig(name="nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_sam("zsharp")(lambda *args: None)
    assert "zsharp" in SAM_FAMILY
