"""Shared fixtures: a composed config from the real conf/ tree and one MLflow store per session.

Why one store per session: creating an SQLite MLflow database runs its migrations (seconds);
tests share one database and isolate themselves by experiment name.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from zsharp_sweeps.config import register_configs

# Throwaway PostgreSQL cluster and MLflow server for the multi-host tests (tests/servers.py).
from .servers import mlflow_server, postgres, postgres_url  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

# One torch thread per test process, and for the processes tests start (they inherit the
# environment). On 2 cores, two intra-op threads per process oversubscribe the CPU as soon as
# anything else runs (pytest-xdist's other worker, a CLI subprocess under test), and
# OpenMP's spin-waiting then makes small-tensor steps 10-50x slower: a ResNet-20 SAM step on
# 16 digits took 20 ms with 1 thread and 0.3-1 s with 2 on a loaded 2-core machine.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
register_configs()

# Small but honest settings for runs in tests: digits, a tiny model, few steps.
FAST = [
    "data=digits",
    "hardware=cpu",
    "trainer.epochs=2",
    "trainer.progress=false",
    "sharpness.num_batches=1",
    "sharpness.batch_size=32",
]


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    store = tmp_path_factory.mktemp("mlruns")
    return f"sqlite:///{store / 'mlflow.db'}"


@pytest.fixture
def experiment_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_cfg(mlflow_uri: str, experiment_name: str) -> Callable[..., DictConfig]:
    """Compose conf/config.yaml with overrides, tracking into the session store."""

    def _make(overrides: Sequence[str] = (), *, fast: bool = True) -> DictConfig:
        all_overrides = [*(FAST if fast else []), *overrides]
        all_overrides += [f"tracking.uri={mlflow_uri}", f"tracking.experiment={experiment_name}"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose(config_name="config", overrides=all_overrides)

    return _make

@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised (migrated) MLflow SQLite database, made once per session."""
    from .sweep_helpers import make_mlflow_template

    return make_mlflow_template(tmp_path_factory.mktemp("mlflow-template"))


@pytest.fixture
def cwd(tmp_path: Path, mlflow_template: Path) -> Path:
    """A working directory for an end-to-end sweep: ``tmp_path`` with a ready MLflow store
    where the sweep looks by default (creating one runs migrations for seconds)."""
    from .sweep_helpers import seed_mlflow_store

    seed_mlflow_store(mlflow_template, tmp_path)
    return tmp_path


# GPU-only tests: collected where CUDA exists, absent (not skipped) elsewhere.
collect_ignore = [] if torch.cuda.is_available() else ["gpu"]

GPU_DIR = Path(__file__).resolve().parent / "gpu"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/gpu/ carries the ``gpu`` marker (``-m "not gpu"`` on a GPU host).

    Slow tests run first (stable order otherwise): with ``-n 2`` the long end-to-end tests
    then start at once and the many short ones fill the gaps, instead of two long tests
    starting last and leaving a tail with one core idle."""
    for item in items:
        if GPU_DIR in Path(item.fspath).parents:
            item.add_marker(pytest.mark.gpu)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
