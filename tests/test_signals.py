"""SIGTERM and Ctrl-C end a run KILLED in MLflow (not RUNNING forever), with its epochs kept.

The unit tests pin ``graceful_stop`` and ``Tracker.run``; the slow ones kill a real
``python -m zsharp_sweeps.train`` process after its first epoch is in the store.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from zsharp_sweeps.config import TrackingConfig
from zsharp_sweeps.tracking import Tracker
from zsharp_sweeps.training.signals import (
    Terminated,
    check_stop,
    exit_code,
    graceful_stop,
    stop_pending,
)

from .conftest import REPO


def test_sigterm_becomes_terminated_at_a_safe_point_and_the_old_handler_comes_back() -> None:
    def sentinel(signum, frame) -> None:  # pragma: no cover - never called
        raise AssertionError

    previous = signal.signal(signal.SIGTERM, sentinel)
    try:
        with pytest.raises(Terminated) as info, graceful_stop():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            with graceful_stop():  # nested (a sweep trial's task): the outer block decides
                assert stop_pending()
            assert stop_pending()
            check_stop()
        assert isinstance(info.value, KeyboardInterrupt)
        assert info.value.signum == signal.SIGTERM
        assert str(info.value) == "received SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is sentinel
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_off_the_main_thread_it_changes_nothing() -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen: list[object] = []

    def worker() -> None:
        with graceful_stop():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [before]


def test_exit_codes_are_128_plus_the_signal() -> None:
    assert exit_code(Terminated(signal.SIGTERM)) == 143
    assert exit_code(KeyboardInterrupt()) == 130


@pytest.mark.parametrize(("raised", "code", "name"), [
    (KeyboardInterrupt(), 130, "SIGINT"), (Terminated(signal.SIGTERM), 143, "SIGTERM"),
])
def test_a_stopped_run_names_the_signal(raised: KeyboardInterrupt, code: int, name: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C used to print ``stopped ():`` (a KeyboardInterrupt's text is empty)."""
    from zsharp_sweeps import cli

    with pytest.raises(SystemExit) as info, cli.edge():
        raise raised
    assert info.value.code == code
    assert capsys.readouterr().err == f"stopped ({name}): the run ends KILLED\n"


@pytest.mark.parametrize(
    ("raised", "status", "state", "killed_by"),
    [
        (Terminated(signal.SIGTERM), "KILLED", "KILLED", "received SIGTERM"),
        (KeyboardInterrupt(), "KILLED", "KILLED", "KeyboardInterrupt"),
        (RuntimeError("boom"), "FAILED", "FAILED", None),
    ],
)
def test_tracker_run_ends_killed_or_failed_and_keeps_what_was_logged(
    raised: BaseException, status: str, state: str, killed_by: str | None,
    mlflow_uri: str, experiment_name: str,
) -> None:
    tracker = Tracker(TrackingConfig(uri=mlflow_uri, experiment=experiment_name))
    with pytest.raises(type(raised)), tracker.run(run_name="interrupted"):
        tracker.log_metrics({"val_acc": 0.5}, step=1)
        raise raised
    run = MlflowClient(mlflow_uri).get_run(tracker.run_id)
    assert run.info.status == status
    assert run.data.tags["run_state"] == state
    assert run.data.tags.get("killed_by") == killed_by
    assert run.data.metrics == {"val_acc": 0.5}


# ---- a real training process, killed after its first epoch ----------------------------------


def _first_epoch_logged(db: Path, experiment: str) -> bool:
    """True once the store holds the experiment's val_acc at step 1 (read-only queries, so
    the trainer is undisturbed)."""
    try:
        with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
                "JOIN experiments e ON r.experiment_id = e.experiment_id "
                "WHERE e.name = ? AND m.key = 'val_acc' AND m.step = 1",
                (experiment,),
            ).fetchone()
    except sqlite3.Error:  # briefly locked by a writer
        return False
    return bool(row and row[0])


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_killed_training_process_ends_its_run_killed(
    tmp_path: Path, signum: int, code: int, mlflow_uri: str, experiment_name: str
) -> None:
    db = Path(mlflow_uri.removeprefix("sqlite:///"))
    MlflowClient(mlflow_uri).search_experiments()  # the session store exists (migrated) first
    proc = subprocess.Popen(
        [sys.executable, "-m", "zsharp_sweeps.train", "data=digits", "model=mlp",
         "model.params.hidden=32", "hardware=cpu", "trainer.epochs=500", "sharpness=none",
         f"tracking.uri={mlflow_uri}", f"tracking.experiment={experiment_name}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not _first_epoch_logged(db, experiment_name):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no epoch was logged within 120 s"
            time.sleep(0.2)
        proc.send_signal(signum)
        sent = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - sent < 30
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"stopped ({signal.Signals(signum).name}): the run ends KILLED")

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment_name).experiment_id])
    assert run.info.status == "KILLED"
    assert run.data.tags["run_state"] == "KILLED"
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert 1 in {m.step for m in history}
    assert len(history) < 500
