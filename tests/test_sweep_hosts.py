"""Two "hosts" on one study, as users run several machines: two sweep commands in separate
working directories against one PostgreSQL storage and one ``mlflow server`` (both started by
the fixtures in ``tests/servers.py``). Exactly ``n_trials`` trials, no duplicates, one parent
run; and when one host dies mid-trial, every other host notices (Optuna's heartbeat) and
retries its trial from the dead attempt's checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from zsharp_sweeps.sweep.progress import SURPLUS_ATTR, counted_trials, retried_numbers

from .sweep_helpers import STUDY, env, sweep_cmd, wait_for

pytestmark = pytest.mark.slow

HOST_ARGS = ("hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=4")


def _start_host(cwd: Path, storage: str, tracking: str, *extra: str) -> subprocess.Popen:
    experiment = f"hosts-{Path(storage).name}"  # one per test: the server is shared
    """One host: its own working directory, the shared storage and tracking server. A new
    session, so the test can kill the host's whole process group as a dead machine would."""
    cwd.mkdir(parents=True, exist_ok=True)
    log = open(cwd / "sweep.log", "w")  # noqa: SIM115  closed with the process
    return subprocess.Popen(
        sweep_cmd(f"hydra.sweeper.storage={storage}", f"tracking.experiment={experiment}",
                  *HOST_ARGS, *extra), cwd=cwd,
        env={**env(), "MLFLOW_TRACKING_URI": tracking}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )


def _counted(study: optuna.Study) -> list:
    trials = study.get_trials()
    counted, retried = counted_trials(trials), retried_numbers(trials)
    for trial in trials:
        if trial not in counted:  # a racer's extra ask, or a dead attempt
            assert trial.state == TrialState.FAIL
            assert trial.user_attrs.get(SURPLUS_ATTR) or trial.number in retried
    return counted


def _runs(tracking: str, storage: str) -> tuple[MlflowClient, list, list]:
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(f"hosts-{Path(storage).name}")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_two_hosts_share_one_study_on_postgres_and_an_mlflow_server(
    tmp_path: Path, postgres_url: str, mlflow_server
) -> None:
    hosts = [_start_host(tmp_path / f"host{i}", postgres_url, mlflow_server.uri,
                         "hydra.sweeper.n_trials=4", "trainer.epochs=2") for i in range(2)]
    for i, proc in enumerate(hosts):
        assert proc.wait(timeout=400) == 0, (tmp_path / f"host{i}" / "sweep.log").read_text()[-4000:]

    study = optuna.load_study(study_name=STUDY, storage=postgres_url)
    counted = _counted(study)
    assert [t.state for t in counted] == [TrialState.COMPLETE] * 4
    assert len({tuple(sorted(t.params.items())) for t in counted}) == 4  # no duplicates

    _, parents, children = _runs(mlflow_server.uri, postgres_url)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_trial: dict[str, list] = {}
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        by_trial.setdefault(child.data.tags["trial_number"], []).append(child)
    assert sorted(by_trial) == sorted(str(t.number) for t in counted)
    assert all(len(runs) == 1 for runs in by_trial.values())
    # Both hosts wrote the report into the one parent run; each has it on disk too.
    client = MlflowClient(mlflow_server.uri)
    assert any(a.path.endswith(".png")
               for a in client.list_artifacts(parents[0].info.run_id, "report"))
    for i in range(2):
        assert (tmp_path / f"host{i}" / "multirun" / STUDY / "optimization_results.yaml").is_file()


@pytest.mark.long
def test_a_dead_host_is_noticed_and_its_trial_resumed_by_the_other(
    tmp_path: Path, postgres_url: str, mlflow_server
) -> None:
    # A shared sweep folder (as on NFS) lets the survivor resume the dead host's checkpoint.
    shared = tmp_path / "shared"
    args = ("hydra.sweeper.n_trials=3", "trainer.epochs=40", f"hydra.sweep.dir={shared}")
    doomed = _start_host(tmp_path / "doomed", postgres_url, mlflow_server.uri, *args)

    def doomed_training():
        # Only once the host has created the study: opening a storage creates its tables.
        if "Starting 1 worker" not in (tmp_path / "doomed" / "sweep.log").read_text():
            return []
        study = optuna.load_study(study_name=STUDY, storage=postgres_url)
        return [t for t in study.get_trials()
                if t.state == TrialState.RUNNING and len(t.intermediate_values) >= 2]

    victim = wait_for(doomed_training, 240, "the first host training a trial", doomed)[0]
    survivor = _start_host(tmp_path / "survivor", postgres_url, mlflow_server.uri, *args)
    os.killpg(doomed.pid, signal.SIGKILL)  # the machine is gone: main process and workers
    doomed.wait(timeout=30)

    assert survivor.wait(timeout=400) == 0, (tmp_path / "survivor" / "sweep.log").read_text()[-4000:]
    study = optuna.load_study(study_name=STUDY, storage=postgres_url)
    dead = study.trials[victim.number]
    assert dead.state == TrialState.FAIL
    counted = _counted(study)
    assert [t.state for t in counted] == [TrialState.COMPLETE] * 3
    retry = next(t for t in counted if t.params == dead.params)
    assert retry.user_attrs["worker"]["pid"] != dead.user_attrs["worker"]["pid"]

    client, parents, children = _runs(mlflow_server.uri, postgres_url)
    assert len(parents) == 1
    runs = {c.data.tags["trial_number"]: c for c in children}
    assert runs[str(dead.number)].info.status == "KILLED"  # not RUNNING forever
    resumed = runs[str(retry.number)]
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["retry_of"] == str(dead.number)
    assert resumed.data.tags["resumed_from"] == runs[str(dead.number)].info.run_id
    steps = sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "val_acc"))
    assert steps == list(range(1, 41))  # the whole curve, each epoch once
    log = (tmp_path / "survivor" / "sweep.log").read_text()
    assert "resuming from" in log and f"/{dead.number}/checkpoints/" in log
