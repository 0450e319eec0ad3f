"""The multi-host engines for real: an Optuna study on PostgreSQL, a training run recorded by
an ``mlflow server`` backed by PostgreSQL, and the throwaway cluster cleaning up after itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import RDBStorage, RetryFailedTrialCallback
from optuna.trial import TrialState

from .conftest import REPO
from .servers import MlflowServer, PostgresCluster, port_open


def test_optuna_study_on_postgres_is_shared_by_two_storages(postgres_url: str) -> None:
    """Two storage objects stand for two hosts: what one tells, the other sees."""
    assert postgres_url.startswith("postgresql+psycopg://")
    host_a = optuna.create_study(study_name="shared", storage=postgres_url, direction="maximize")
    host_b = optuna.load_study(study_name="shared", storage=postgres_url)
    for study, value in ((host_a, 0.25), (host_b, 0.75), (host_a, 0.5)):
        trial = study.ask()
        x = trial.suggest_float("x", 0.0, 1.0)
        assert 0.0 <= x <= 1.0
        study.tell(trial, value)
    seen = optuna.load_study(study_name="shared", storage=postgres_url)
    assert [t.state for t in seen.trials] == [TrialState.COMPLETE] * 3
    assert [t.number for t in seen.trials] == [0, 1, 2]
    assert seen.best_value == 0.75


def test_a_server_database_is_probed_and_the_other_tools_is_refused(postgres_url: str) -> None:
    """A reachable database passes both checks; once it holds a study, MLflow may not use it
    (it would write its tables beside Optuna's), and the study is left as it was."""
    from zsharp_sweeps.config import ConfigError
    from zsharp_sweeps.sweep.storage import check_storage_url
    from zsharp_sweeps.tracking import check_tracking_uri

    check_tracking_uri(postgres_url, "tracking.uri")
    check_storage_url(postgres_url)
    optuna.create_study(study_name="s", storage=postgres_url)
    check_storage_url(postgres_url)
    with pytest.raises(ConfigError, match="the database is an Optuna study storage"):
        check_tracking_uri(postgres_url, "tracking.uri")
    assert optuna.get_all_study_names(storage=postgres_url) == ["s"]


_DYING_WORKER = """
import sys, time
import optuna
from optuna.storages import RDBStorage

storage = RDBStorage(sys.argv[1], heartbeat_interval=1, grace_period=2)
study = optuna.load_study(study_name="hb", storage=storage)

def objective(trial):
    trial.suggest_float("x", 0.0, 1.0)
    print("started", flush=True)
    time.sleep(600)  # the test SIGKILLs this worker here

study.optimize(objective, n_trials=1)
"""


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_and_retried_on_postgres(postgres_url: str) -> None:
    """A worker SIGKILLed mid-trial stops beating; the next worker to start a trial marks it
    FAILED and ``RetryFailedTrialCallback`` runs a copy with the same parameters."""
    optuna.create_study(study_name="hb", storage=postgres_url)
    worker = subprocess.Popen([sys.executable, "-c", _DYING_WORKER, postgres_url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "started", worker.stderr.read()[-3000:]
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    time.sleep(3.2)  # past the 2 s grace period (heartbeats every 1 s)

    storage = RDBStorage(postgres_url, heartbeat_interval=1, grace_period=2,
                         failed_trial_callback=RetryFailedTrialCallback(max_retry=1))
    survivor = optuna.load_study(study_name="hb", storage=storage)
    survivor.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=1)
    dead, retry = survivor.get_trials(deepcopy=False)
    assert (dead.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert RetryFailedTrialCallback.retried_trial_number(retry) == dead.number
    assert retry.params == dead.params and retry.value == dead.params["x"]


@pytest.mark.slow
def test_training_run_lands_in_the_mlflow_server(
    mlflow_server: MlflowServer, postgres: PostgresCluster, tmp_path: Path
) -> None:
    """``MLFLOW_TRACKING_URI=http://...`` and the real entry point: metrics, params and the
    artifacts reach the server, its PostgreSQL store and its artifact directory."""
    experiment = f"server-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=mlflow_server.uri)
    proc = subprocess.run(
        [sys.executable, "-m", "zsharp_sweeps.train", "data=digits", "model=mlp",
         "hardware=cpu", "trainer.epochs=1", "trainer.progress=false",
         "trainer.max_steps_per_epoch=5", "sharpness.num_batches=1", "sharpness.batch_size=32",
         f"tracking.experiment={experiment}", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "mlruns").exists()  # nothing went to the local default store

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_acc", "test_acc", "sharpness/sam"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1], key
    assert 0.0 <= run.data.metrics["final_test_acc"] <= 1.0
    assert run.data.params["model.name"] == "mlp"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "config"} <= artifacts
    # Through the server to its --artifacts-destination, and into its PostgreSQL store.
    stored = list(mlflow_server.artifacts.rglob(f"{run.info.run_id}/artifacts/curves.png"))
    assert len(stored) == 1 and stored[0].stat().st_size > 1000
    with postgres.connect(mlflow_server.backend_uri.rsplit("/", 1)[1]) as conn:
        row = conn.execute("SELECT status FROM runs WHERE run_uuid = %s",
                           (run.info.run_id,)).fetchone()
    assert row == ("FINISHED",)


def test_cluster_stop_closes_the_port_and_removes_its_files() -> None:
    cluster = PostgresCluster.start()
    try:
        assert port_open(cluster.port)
        assert cluster.startup_s < 60
        url = cluster.new_database("lifecycle")
        assert url.startswith(f"postgresql+psycopg://postgres@127.0.0.1:{cluster.port}/lifecycle_")
    finally:
        cluster.stop()
    assert not port_open(cluster.port)
    assert not cluster.root.exists()
