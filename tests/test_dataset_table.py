"""One table per fact about datasets: names (specs.py SPECS), files (sources.FILE_DATASETS) and
the config schema agree with each other and with conf/data/."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from zsharp_sweeps.config import ConfigError, DataConfig, dataset_names
from zsharp_sweeps.data import SPECS
from zsharp_sweeps.data.sources import FILE_DATASETS, _how_to_place, _required

from .conftest import CONF_DIR


def test_names_come_from_the_specs_and_match_conf_data() -> None:
    on_disk = {p.stem: OmegaConf.load(p).get("name") for p in (CONF_DIR / "data").glob("*.yaml")}
    assert all(stem == name for stem, name in on_disk.items()), on_disk
    assert set(on_disk) == set(dataset_names()) == {*SPECS, "synthetic"}
    # Every real dataset is either embedded (digits) or file-backed, never neither.
    assert set(FILE_DATASETS) == set(SPECS) - {"digits"}


def test_a_name_outside_the_table_is_refused_with_the_table() -> None:
    with pytest.raises(ConfigError, match="data.name='imagenet' is invalid: allowed one of cifar10"):
        DataConfig(name="imagenet")
    with pytest.raises(ConfigError, match="data.synthetic_like='synthetic'"):
        DataConfig(name="synthetic", synthetic_like="synthetic")


@pytest.mark.parametrize("name", sorted(FILE_DATASETS))
def test_each_file_dataset_says_where_its_files_go(name: str, tmp_path: Path) -> None:
    files = _required(name, tmp_path)
    assert files and all(tmp_path in p.parents for p in files)
    advice = _how_to_place(name, tmp_path, download=False)
    assert SPECS[name].url.rsplit("/", 1)[0] in advice  # where to download from
    assert str(tmp_path) in advice  # and exactly where to put it
    assert advice.endswith("Or set data.root to a folder that already holds the files.")


def test_embedded_and_generated_data_have_no_files(tmp_path: Path) -> None:
    for name in ("digits", "synthetic"):
        with pytest.raises(ValueError, match=f"{name} has no files on disk"):
            _required(name, tmp_path)
