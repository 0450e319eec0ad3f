"""The SLURM path through submitit, run locally: ``launcher=local`` (submitit_local) starts
the sweep's workers as submitit jobs; each worker pulls trials until the study is full."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState

from .conftest import CONF_DIR, REPO


@pytest.mark.parametrize(
    ("launcher", "target", "workers_key"),
    [
        ("joblib", "hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs"),
        ("local", "hydra_submitit_launcher.submitit_launcher.LocalLauncher", None),
        ("slurm", "hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "array_parallelism"),
    ],
)
def test_launcher_recipes_tie_the_workers_to_n_jobs(
    launcher: str, target: str, workers_key: str | None
) -> None:
    """A sweep's launcher is picked by ``launcher=...`` (conf/launcher/); ``launcher=slurm``
    gives SLURM with one GPU, one task per job and as many jobs at once as
    ``hydra.sweeper.n_jobs``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(
            config_name="config", return_hydra_config=True,
            overrides=["+sweep=zsharp_random", f"launcher={launcher}", "hydra.sweeper.n_jobs=6"],
        )
    conf = cfg.hydra.launcher
    assert conf._target_ == f"hydra_plugins.{target}"
    if workers_key is not None:
        assert conf[workers_key] == 6
    if launcher == "slurm":
        assert (conf.gpus_per_node, conf.tasks_per_node, conf.nodes) == (1, 1, 1)
        assert conf.partition is None and conf.timeout_min >= 60
    if launcher == "local":  # CPU workers by default: no GPU visible to the jobs
        assert (conf.gpus_per_node, conf.tasks_per_node) == (0, 1)


@pytest.mark.long
@pytest.mark.slow
def test_sweep_through_submitit_local_completes_two_trials(
    tmp_path: Path, mlflow_uri: str, experiment_name: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "zsharp_sweeps.train", "--multirun", "+sweep=zsharp_rho_qp_lr",
         "launcher=local", "data=digits", "model=mlp", "model.params.hidden=32",
         "hardware=cpu", "trainer.epochs=1", "trainer.max_steps_per_epoch=3",
         "trainer.progress=false", "sharpness=none", "hydra.sweeper.n_trials=2",
         "hydra.sweeper.n_jobs=2", "hydra.sweeper.study_name=submitit",
         f"tracking.uri={mlflow_uri}", f"tracking.experiment={experiment_name}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    sweep_dir = tmp_path / "multirun" / "submitit"
    study = optuna.load_study(study_name="submitit", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    # The workers really were submitit jobs: one job folder each, with its result.
    results = sorted((sweep_dir / ".submitit").glob("*/*_0_result.pkl"))
    assert len(results) == 2
