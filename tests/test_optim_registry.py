"""One table of optimizers: the schema names them (zsharp_sweeps/config: one schema per
optimizer), the registry (zsharp_sweeps/optim/registry.py) builds them, conf/ offers them, and
the three agree; a new optimizer is its schema, its builder and its YAML."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from zsharp_sweeps.config import (
    OPTIMIZER_SCHEMAS,
    ConfigError,
    SAMConfig,
    optimizer_config,
    validate,
)
from zsharp_sweeps.optim import SAM, SAMBase, build_optimizer
from zsharp_sweeps.optim.registry import BASES, SAM_FAMILY, optimizer_names, register_sam

from .conftest import CONF_DIR


def test_every_registered_optimizer_has_its_yaml_and_back() -> None:
    on_disk = {
        p.stem: OmegaConf.load(p).get("name") for p in (CONF_DIR / "optimizer").glob("*.yaml")
    }
    assert all(stem == name for stem, name in on_disk.items()), on_disk
    assert set(on_disk) == set(optimizer_names()) == set(OPTIMIZER_SCHEMAS)
    assert set(BASES) == {"sgd", "adam", "adamw"}
    assert not set(BASES) & set(SAM_FAMILY)


@pytest.mark.parametrize("name", optimizer_names())
def test_each_name_builds_its_optimizer_with_the_config_values(name: str) -> None:
    settings = {"base": "adam", "lr": 0.02, "rho": 0.07}
    own = OPTIMIZER_SCHEMAS[name].settings()
    cfg = optimizer_config(name=name, **{k: v for k, v in settings.items() if k in own})
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
    """A SAM variant added the way a new optimizer is: its schema, then its builder next to
    its class; both removed afterwards."""
    name = "sam_twin_for_test"
    OPTIMIZER_SCHEMAS[name] = SAMConfig

    @register_sam(name)
    def _twin(named: Any, base: type[torch.optim.Optimizer], base_kwargs: dict[str, Any],
              cfg: SAMConfig) -> SAM:
        return SAM(named, base, rho=cfg.rho * 2, **base_kwargs)

    try:
        yield name
    finally:
        SAM_FAMILY.pop(name)
        OPTIMIZER_SCHEMAS.pop(name)


def test_a_registered_optimizer_is_valid_and_buildable(registered_twin: str) -> None:
    cfg = optimizer_config(name=registered_twin, rho=0.1)
    opt = build_optimizer(cfg, nn.Linear(3, 2))
    assert isinstance(opt, SAM)
    assert opt.param_groups[0]["rho"] == pytest.approx(0.2)
    assert registered_twin in optimizer_names()


def test_unknown_and_duplicate_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="optimizer.name='nope' is invalid: allowed one of sgd"):
        optimizer_config(name="nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_sam("zsharp")(lambda *args: None)
    assert "zsharp" in SAM_FAMILY
    with pytest.raises(ValueError, match="has no schema: add its settings to OPTIMIZER_SCHEMAS"):
        register_sam("unknown_to_the_schema")(lambda *args: None)
    assert "unknown_to_the_schema" not in SAM_FAMILY


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_a_setting_the_optimizer_does_not_have_is_refused_naming_it() -> None:
    from hydra.errors import ConfigCompositionException

    # On the command line: Hydra refuses it against the option's own schema.
    with pytest.raises(ConfigCompositionException, match="optimizer.percentile"):
        _compose("optimizer=sam", "optimizer.percentile=0.9")
    # Anywhere else (a config built in Python, a dict): the schema check names it.
    with pytest.raises(ConfigError, match="optimizer.percentile is not a setting of optimizer "
                                          "'sam'.*optimizer_shared.percentile"):
        optimizer_config("sam", percentile=0.9)
    cfg = _compose("optimizer=sam")
    cfg.optimizer._set_flag("struct", False)
    cfg.optimizer.percentile = 0.9
    with pytest.raises(ConfigError, match="optimizer.percentile is not a setting of optimizer"):
        validate(cfg)
    # An SGD run has SGD's settings only: none of ZSharp's knobs reach its config or MLflow.
    assert set(vars(validate(_compose("optimizer=sgd")).optimizer)) == {
        "name", "lr", "weight_decay", "momentum", "nesterov"}


def test_a_setting_shared_by_some_optimizers_reaches_those_that_have_it() -> None:
    shared = "+optimizer_shared.rho=0.2"
    assert validate(_compose("optimizer=sam", shared)).optimizer.rho == 0.2
    assert validate(_compose("optimizer=asam", shared)).optimizer.rho == 0.2  # over its 0.5
    assert not hasattr(validate(_compose("optimizer=sgd", shared)).optimizer, "rho")
    # Given both ways with different values: which one was meant is not guessed.
    with pytest.raises(ConfigError, match="optimizer.rho=0.1 and optimizer_shared.rho=0.2"):
        validate(_compose("optimizer=sam", "optimizer.rho=0.1", shared))
    with pytest.raises(ConfigError, match="optimizer_shared.nope"):
        validate(_compose("+optimizer_shared.nope=1"))
