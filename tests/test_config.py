"""Every config group option composes and validates; bad values fail with clear messages."""

from __future__ import annotations

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from zsharp_sweeps.config import ConfigError, validate

from .conftest import CONF_DIR

GROUPS = ["data", "model", "optimizer", "hardware", "trainer", "sharpness", "tracking"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in GROUPS for o in _options(g)]
)
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=[f"{group}={option}"])
    train_cfg = validate(cfg)
    section = dataclasses.asdict(getattr(train_cfg, group))
    if group in ("data", "model", "optimizer"):  # the option file names its own choice
        assert section["name"] == option
    # Every value the option file sets reaches the validated config unchanged.
    own = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    own.pop("defaults", None)
    assert own, f"conf/{group}/{option}.yaml sets nothing"
    for key, value in own.items():
        assert section[key] == value, f"{group}.{key}"


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ has no options"


def test_defaults_match_the_product() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config")
    train_cfg = validate(cfg)
    assert (train_cfg.data.name, train_cfg.model.name, train_cfg.optimizer.name) == (
        "cifar10", "resnet20", "zsharp",
    )
    assert train_cfg.hardware.device == "auto"
    assert train_cfg.optimizer.percentile == 0.95
    assert train_cfg.optimizer.rho == 0.05


@pytest.mark.parametrize(
    ("override", "setting", "allowed"),
    [
        ("optimizer.rho=-0.1", "optimizer.rho", ">= 0"),
        ("optimizer.percentile=1.0", "optimizer.percentile", "[0, 1)"),
        ("optimizer.percentile=-0.5", "optimizer.percentile", "[0, 1)"),
        ("optimizer.lr=0", "optimizer.lr", "> 0"),
        ("optimizer.lr=-1e-3", "optimizer.lr", "> 0"),
        ("trainer.epochs=0", "trainer.epochs", ">= 1"),
        ("data.batch_size=0", "data.batch_size", ">= 1"),
        ("hardware.precision=fp8", "hardware.precision", "fp32"),
        ("optimizer.filter=top", "optimizer.filter", "zscore"),
    ],
)
def test_bad_values_name_the_setting_and_the_range(
    override: str, setting: str, allowed: str
) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=[override])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert setting in str(info.value)
    assert allowed in str(info.value)


def test_percentile_given_as_percent_suggests_the_fraction() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=["optimizer.percentile=70"])
    with pytest.raises(ConfigError, match=r"Did you mean 0\.7\?"):
        validate(cfg)


def test_wrong_type_fails_composition_naming_the_setting() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        with pytest.raises(ConfigCompositionException, match="optimizer.rho=abc") as info:
            compose(config_name="config", overrides=["optimizer.rho=abc"])
    cause = info.value.__cause__
    assert isinstance(cause, ValidationError)
    assert cause.full_key == "optimizer.rho"


@pytest.mark.parametrize("sweep", _options("sweep"))
def test_every_sweep_composes_with_our_sweeper(sweep: str) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=[f"+sweep={sweep}", "data=digits"],
                      return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("ZSharpOptunaSweeper")
    assert sweeper.sampler._target_.startswith(("optuna.samplers.", "hydra_plugins."))
    assert sweeper.study_name.startswith(sweep)
    assert cfg.hydra.sweep.dir == f"multirun/{sweeper.study_name}"
    assert sweeper.params, "a sweep without a search space"
    validate(cfg)


def test_the_schema_is_a_leaf_that_loads_no_torch() -> None:
    """``import zsharp_sweeps.config`` imports nothing else of the package, so no torch (the
    import-linter contracts in pyproject.toml keep it so; this checks the result)."""
    import subprocess
    import sys

    from .conftest import REPO

    code = ("import sys, zsharp_sweeps.config\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('zsharp_sweeps')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, timeout=120).stdout
    loaded = eval(out)  # noqa: S307  (our own print of a list of names)
    assert "torch" not in loaded
    assert all(m == "zsharp_sweeps" or m.startswith("zsharp_sweeps.config") for m in loaded), loaded


def test_the_registries_name_what_the_schema_names() -> None:
    from zsharp_sweeps.config import DATASETS, MODELS, OPTIMIZER_SCHEMAS
    from zsharp_sweeps.data import SPECS
    from zsharp_sweeps.models import MODELS as REGISTERED_MODELS
    from zsharp_sweeps.optim.registry import optimizer_names

    assert tuple(SPECS) == DATASETS
    assert set(REGISTERED_MODELS) == set(MODELS)
    assert set(optimizer_names()) == set(OPTIMIZER_SCHEMAS)


def test_a_bad_model_name_or_parameter_is_refused_before_anything_is_built() -> None:
    from zsharp_sweeps.training.run import check_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        with pytest.raises(ConfigError, match="model.name='resnet21' is invalid"):
            validate(compose(config_name="config", overrides=["model.name=resnet21"]))
        cfg = validate(compose(config_name="config",
                               overrides=["data=digits", "model=mlp", "model.params.hidden=0"]))
        with pytest.raises(ConfigError, match="model.params.hidden=0 is invalid"):
            check_config(cfg)  # the constructor's own check, on the meta device
        cfg = validate(compose(config_name="config",
                               overrides=["data=digits", "model=mlp", "+model.params.width=3"]))
        with pytest.raises(ConfigError, match="model.params.width is not a parameter"):
            check_config(cfg)
        cfg = validate(compose(config_name="config", overrides=["data.val_size=50000"]))
        with pytest.raises(ConfigError, match="data.val_size=50000 is invalid: allowed < 50000"):
            check_config(cfg)


@pytest.mark.parametrize("option", _options("optimizer"))
def test_each_optimizer_option_sets_its_schemas_defaults(option: str) -> None:
    """conf/optimizer/<name>.yaml spells out its schema's defaults: what optimizer_shared
    compares against to tell a value someone gave from the option's own."""
    from zsharp_sweeps.config import OPTIMIZER_SCHEMAS

    own = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "optimizer" / f"{option}.yaml"))
    own.pop("defaults")
    defaults = dataclasses.asdict(OPTIMIZER_SCHEMAS[option]())
    assert {k: defaults[k] for k in own} == own
