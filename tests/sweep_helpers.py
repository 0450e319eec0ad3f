"""Helpers for sweep tests: run the real ``--multirun`` entry point, read both stores.

Pruners here are importable by path from a sweep's worker processes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

from zsharp_sweeps.sweep.worker import WorkerJob
from zsharp_sweeps.tracking.locks import sqlite_initialised

REPO = Path(__file__).resolve().parents[1]

# A small but honest sweep: digits, a tiny MLP, 2 epochs, one sharpness batch.
SWEEP = [
    "--multirun", "+sweep=zsharp_rho_qp_lr", "data=digits", "hardware=cpu", "model=mlp",
    "model.params.hidden=32", "trainer.epochs=2", "trainer.progress=false",
    "sharpness.num_batches=1", "sharpness.batch_size=32",
    "hydra.sweeper.sampler.n_startup_trials=2",
]
STUDY = "zsharp_rho_qp_lr-mlp-digits"


class AlwaysPrune(optuna.pruners.BasePruner):
    """Prunes every trial at its first report: makes PRUNED deterministic in tests."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


class _NoCallbacks:
    """Hydra's job callbacks, none registered (what ``run_job`` calls around a job)."""

    def on_job_start(self, **kwargs: object) -> None:
        pass

    def on_job_end(self, **kwargs: object) -> None:
        pass


@contextlib.contextmanager
def worker_job(overrides: list[str], sweep_dir: Path, task_function: Callable
               ) -> Iterator[WorkerJob]:
    """A sweep worker's job, as the sweeper builds it, for a worker run in this process:
    Hydra's config loader and the master config of conf/config.yaml (public Hydra APIs)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import HydraContext, RunMode

    with initialize_config_dir(config_dir=str(REPO / "conf"), job_name="train"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration(
            "config", [*overrides, f"hydra.sweep.dir={sweep_dir}"], run_mode=RunMode.MULTIRUN)
        yield WorkerJob(HydraContext(config_loader=loader, callbacks=_NoCallbacks()),
                        task_function, master)


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    out["OMP_NUM_THREADS"] = "1"
    return out


def seed_mlflow_store(template: Path, cwd: Path) -> None:
    """An initialised (migrated) MLflow database where the sweep looks by default: creating
    one runs MLflow's migrations, which take seconds per test otherwise."""
    (cwd / "mlruns").mkdir(parents=True, exist_ok=True)
    shutil.copy(template, cwd / "mlruns" / "mlflow.db")


def make_mlflow_template(directory: Path) -> Path:
    path = directory / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates and migrates
    return path


def sweep_cmd(*extra: str, base: tuple[str, ...] = tuple(SWEEP)) -> list[str]:
    return [sys.executable, "-m", "zsharp_sweeps.train", *base, *extra]


def run_sweep(cwd: Path, *extra: str, check: bool = True, timeout: float = 300,
              base: tuple[str, ...] = tuple(SWEEP)) -> subprocess.CompletedProcess:
    proc = subprocess.run(sweep_cmd(*extra, base=base), cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    return proc


def start_sweep(cwd: Path, *extra: str, base: tuple[str, ...] = tuple(SWEEP)) -> subprocess.Popen:
    log = open(cwd / "sweep.log", "w")  # noqa: SIM115  closed with the process
    return subprocess.Popen(sweep_cmd(*extra, base=base), cwd=cwd, env=env(), stdout=log,
                            stderr=subprocess.STDOUT, text=True)


def storage_url(cwd: Path, name: str = STUDY) -> str:
    return f"sqlite:///{cwd / 'multirun' / name / 'optuna.db'}"


def load_study(cwd: Path, name: str = STUDY) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage_url(cwd, name))


def mlflow_runs(cwd: Path):
    """(client, parent runs, child runs) of the default store under ``cwd``."""
    client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("zsharp-sweeps")
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def wait_for(condition: Callable[[], object], timeout: float, what: str,
             proc: subprocess.Popen | None = None) -> object:
    """Poll ``condition`` until it returns something truthy; fail with ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with_value = _safe(condition)
        if with_value:
            return with_value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before: {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


def _safe(condition: Callable[[], object]) -> object:
    try:
        return condition()
    except Exception:  # the store may not exist yet, or be locked for a moment
        return None


def running_trials_with_reports(cwd: Path, name: str = STUDY) -> list:
    """RUNNING trials that reported at least one epoch (well inside their training). Reads
    only a storage the sweep has finished creating: opening a new SQLite file creates
    Optuna's tables, which would race the sweep's own creation."""
    if not sqlite_initialised(cwd / "multirun" / name / "optuna.db"):
        return []
    study = load_study(cwd, name)
    return [t for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.RUNNING and t.intermediate_values]


