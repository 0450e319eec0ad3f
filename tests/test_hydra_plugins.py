"""Our Hydra plugins against Hydra's own contracts.

``hydra/launcher=zsharp_workers`` runs Hydra's launcher suites (``hydra.test_utils``, the ones
hydra-joblib-launcher runs). ``hydra/sweeper=zsharp_optuna`` sweeps whatever task function
Hydra hands it: a user's own ``@hydra.main`` app over conf/ is what a sweep optimises, in the
sweep's process and in worker processes. Upstream hydra-optuna-sweeper's own tests are in
``test_upstream_sweeper.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from hydra.core.plugins import Plugins
from hydra.test_utils.launcher_common_tests import BatchedSweeperTestSuite, LauncherTestSuite
from omegaconf import DictConfig
from optuna.trial import TrialState

from .conftest import CONF_DIR

# Hydra's ``hydra_restore_singletons`` fixture snapshots Hydra's global state before each
# test and restores it after: scan the plugins first, or the first test's scan (which
# registers every plugin's config) is undone and the next test finds no hydra/sweeper/basic.
Plugins.instance()

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("launcher_name", "overrides"), [("zsharp_workers", [])])
class TestWorkersLauncher(LauncherTestSuite):
    """Hydra's launcher contract: returns, job configs, output dirs, tracebacks."""


@pytest.mark.parametrize(
    ("launcher_name", "overrides"),
    [("zsharp_workers", ["hydra/sweeper=basic", "hydra.sweeper.max_batch_size=2"])],
)
class TestWorkersLauncherBatched(BatchedSweeperTestSuite):
    """Hydra's batched-sweeper contract: every JobReturn keeps its hydra_cfg."""


def _user_sweep(hydra_sweep_runner, tmp_path: Path, task_function, *extra: str):
    """A user's ``@hydra.main(config_path=conf/, config_name="config")`` app, swept with our
    sweeper: four trials over optimizer.lr, tracking off."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    return hydra_sweep_runner(
        calling_file=__file__, calling_module=None, task_function=task_function,
        config_path=str(CONF_DIR), config_name="config",
        overrides=["hydra/sweeper=zsharp_optuna", "hydra/sweeper/sampler=random",
                   "hydra.sweeper.sampler.seed=0", "hydra.sweeper.direction=minimize",
                   "hydra.sweeper.n_trials=4", f"hydra.sweeper.storage={storage}",
                   "hydra.sweeper.study_name=user", "tracking=off", "data=digits",
                   "optimizer.lr=interval(0.01, 0.5)", *extra],
        temp_dir=tmp_path / "sweep",
    ), storage


def test_a_users_own_task_function_is_what_the_sweep_optimises(
    hydra_sweep_runner, tmp_path: Path
) -> None:
    calls: list[float] = []

    def user_task(cfg: DictConfig) -> float:  # not this project's training
        calls.append(cfg.optimizer.lr)
        return (cfg.optimizer.lr - 0.1) ** 2

    sweep, storage = _user_sweep(hydra_sweep_runner, tmp_path, user_task,
                                 "hydra/launcher=zsharp_workers", "hydra.sweeper.n_jobs=1")
    with sweep:
        pass
    study = optuna.load_study(study_name="user", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert sorted(calls) == sorted(t.params["optimizer.lr"] for t in study.trials)
    for trial in study.trials:
        assert trial.value == pytest.approx((trial.params["optimizer.lr"] - 0.1) ** 2)


def _marking_task(cfg: DictConfig) -> float:
    """A user's task that leaves a file per call (it runs in the workers' processes)."""
    import os
    import time

    time.sleep(0.3)  # long enough that both workers take trials
    lr = float(cfg.optimizer.lr)
    (Path(cfg.marks) / f"{os.getpid()}-{lr}.json").write_text(json.dumps(lr))
    return (lr - 0.1) ** 2


def test_worker_processes_run_the_users_task_function(hydra_sweep_runner, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    sweep, storage = _user_sweep(hydra_sweep_runner, tmp_path, _marking_task,
                                 "hydra/launcher=zsharp_workers", "hydra.sweeper.n_jobs=2",
                                 f"+marks={marks}")
    with sweep:
        pass
    study = optuna.load_study(study_name="user", storage=storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    called = sorted(json.loads(p.read_text()) for p in marks.iterdir())
    assert called == sorted(t.params["optimizer.lr"] for t in complete)
    assert len({p.name.split("-")[0] for p in marks.iterdir()}) == 2  # both workers ran it
