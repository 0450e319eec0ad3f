"""conf/data/*.yaml: every option composes onto the DataConfig schema, names its dataset,
and writes the flip default documented in zsharp_sweeps/data/specs.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from zsharp_sweeps.config import ConfigError, DataConfig, dataset_names, register_configs
from zsharp_sweeps.data import SPECS

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _compose(overrides: list[str]) -> DataConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(overrides=overrides)
    return OmegaConf.to_object(cfg.data)


def test_every_dataset_has_an_option() -> None:
    assert sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml")) == sorted(dataset_names())


@pytest.mark.parametrize("name", dataset_names())
def test_option_composes_and_validates(name: str) -> None:
    data = _compose([f"+data={name}"])
    assert isinstance(data, DataConfig) and data.name == name
    if name in SPECS:
        assert data.hflip == SPECS[name].hflip
    if name == "digits":
        assert (data.image_size, data.val_size, data.batch_size) == (16, 200, 64)


def test_schema_checks_run_when_composing() -> None:
    with pytest.raises(ConfigError, match="data.synthetic_like"):
        _compose(["+data=synthetic", "data.synthetic_like=synthetic"])
