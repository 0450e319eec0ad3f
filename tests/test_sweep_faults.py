"""A sweep survives what happens to processes: SIGTERM and Ctrl-C of the sweep, SIGKILL of
the sweep's main process, SIGKILL of one worker. Nothing stays RUNNING, nothing runs twice,
interrupted trials FAIL and are retried (from their last checkpoint), MLflow runs end
KILLED. Every test drives the real ``--multirun`` entry point."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from zsharp_sweeps.sweep.lifecycle import pid_alive
from zsharp_sweeps.sweep.progress import INTERRUPTED_ATTR, counted_trials, retried_numbers

from .sweep_helpers import (
    STUDY,
    load_study,
    mlflow_runs,
    run_sweep,
    running_trials_with_reports,
    start_sweep,
    wait_for,
)

pytestmark = pytest.mark.slow

# Trials long enough to be caught mid-training (an epoch of this MLP takes ~0.1 s).
LONG = ("trainer.epochs=40", "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=4")


def _worker_pids(cwd: Path) -> set[int]:
    return {t.user_attrs["worker"]["pid"] for t in load_study(cwd).get_trials()
            if "worker" in t.user_attrs}


def _assert_interrupted_cleanly(cwd: Path) -> list:
    """Every trial is COMPLETE, or FAIL + interrupted with a WAITING retry of its params;
    no trial and no MLflow run is left RUNNING."""
    trials = load_study(cwd).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert interrupted, "the signal should have caught a trial mid-training"
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    for trial in interrupted:
        assert trial.user_attrs[INTERRUPTED_ATTR] is True
        assert any(w.params == trial.params for w in waiting)
    _, parents, children = mlflow_runs(cwd)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert "RUNNING" not in {c.info.status for c in children}
    killed = {c.data.tags["trial_number"] for c in children if c.info.status == "KILLED"}
    assert {str(t.number) for t in interrupted} <= killed
    return interrupted


def _resume_completes(cwd: Path, n_trials: int, *extra: str) -> None:
    # Resumed with 2 epochs where the killed trials had 40 (to finish fast): a change of a
    # fixed setting, which a resume refuses unless it is accepted deliberately.
    run_sweep(cwd, f"hydra.sweeper.n_trials={n_trials}", "trainer.epochs=2",
              "hydra.sweeper.allow_changed_settings=true", *extra)
    trials = load_study(cwd).get_trials()
    counted = counted_trials(trials)
    assert len(counted) == n_trials
    assert all(t.state == TrialState.COMPLETE for t in counted)


def _checkpointed_trials(cwd: Path) -> set[int]:
    sweep_dir = cwd / "multirun" / STUDY
    return {int(p.relative_to(sweep_dir).parts[0]) for p in sweep_dir.glob("*/checkpoints/*.pt")}


@pytest.mark.long  # 37 s on 2 cores: make test-long (CI runs it)
def test_sigterm_stops_workers_cleanly_and_resume_retries(cwd: Path) -> None:
    keep = "hydra.sweeper.keep_checkpoints=best"
    proc = start_sweep(cwd, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", keep, *LONG)
    wait_for(lambda: len(running_trials_with_reports(cwd)) == 2, 180,
             "both workers training", proc)
    pids = _worker_pids(cwd)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    for pid in pids:  # the workers ended with the sweep
        wait_for(lambda pid=pid: not pid_alive(pid), 10, f"worker {pid} to exit")
    interrupted = _assert_interrupted_cleanly(cwd)
    # keep_checkpoints=best deletes nothing from a stopped sweep: the retries resume there.
    assert {t.number for t in interrupted} <= _checkpointed_trials(cwd)
    # The retries run and the study completes with exactly n_trials that count; the
    # trials' MLflow runs link the attempts they repeat.
    _resume_completes(cwd, 4, "hydra.sweeper.n_jobs=2", keep)
    _, _, children = mlflow_runs(cwd)
    assert any("retry_of" in c.data.tags for c in children if c.info.status == "FINISHED")
    # Finished: only the best trial keeps its checkpoints.
    assert _checkpointed_trials(cwd) == {load_study(cwd).best_trial.number}


def test_ctrl_c_of_an_in_process_sweep_fails_the_trial_and_kills_the_run(cwd: Path) -> None:
    proc = start_sweep(cwd, "hydra.sweeper.n_trials=2", *LONG)  # n_jobs=1: in-process
    wait_for(lambda: running_trials_with_reports(cwd), 180, "a trial training", proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 128 + signal.SIGINT
    _assert_interrupted_cleanly(cwd)


def test_sigkill_of_the_main_process_leaves_no_worker_running(cwd: Path) -> None:
    proc = start_sweep(cwd, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", *LONG)
    # Both workers well inside a trial (far from its last epoch, so none ends on its own
    # while the workers notice).
    running = wait_for(
        lambda: [t for t in running_trials_with_reports(cwd) if len(t.intermediate_values) < 25]
        if len(running_trials_with_reports(cwd)) == 2 else [],
        180, "both workers training", proc,
    )
    pids = _worker_pids(cwd)
    proc.kill()
    proc.wait(timeout=10)
    for pid in pids:
        wait_for(lambda pid=pid: not pid_alive(pid), 15, f"orphaned worker {pid} to exit")
    # The workers recorded their trials FAIL (retried) and their runs KILLED: nothing
    # finished behind the study's back, nothing is left RUNNING.
    trials = load_study(cwd).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for caught in running:
        after = trials[caught.number]
        assert after.state == TrialState.FAIL and after.user_attrs[INTERRUPTED_ATTR] is True
    _, _, children = mlflow_runs(cwd)
    status = {c.data.tags["trial_number"]: c.info.status for c in children}
    assert {status[str(t.number)] for t in running} == {"KILLED"}
    assert "RUNNING" not in status.values()  # (resuming is the SIGTERM test's part)


@pytest.mark.long
def test_a_killed_worker_is_noticed_by_the_heartbeat_and_its_trial_retried(cwd: Path) -> None:
    proc = start_sweep(cwd, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2", *LONG)
    running = wait_for(lambda: running_trials_with_reports(cwd), 180, "a trial training", proc)
    victim = running[0]
    killed_at = time.monotonic()
    os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)
    # The survivor fails the stale trial after the grace period and retries it.
    wait_for(lambda: load_study(cwd).trials[victim.number].state == TrialState.FAIL, 60,
             "the dead worker's trial to become FAIL")
    # Noticed by the grace period (4 s), give or take a heartbeat poll on a busy machine.
    assert time.monotonic() - killed_at < 30
    assert proc.wait(timeout=300) == 0, (cwd / "sweep.log").read_text()[-4000:]

    trials = load_study(cwd).get_trials()
    retried = retried_numbers(trials)
    assert victim.number in retried
    counted = counted_trials(trials)
    assert len(counted) == 3 and all(t.state == TrialState.COMPLETE for t in counted)
    retry = next(t for t in counted if t.params == victim.params and t.number != victim.number)
    _, _, children = mlflow_runs(cwd)
    status = {c.data.tags["trial_number"]: c for c in children}
    assert status[str(victim.number)].info.status == "KILLED"  # not RUNNING forever
    resumed = status[str(retry.number)]
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["retry_of"] == str(victim.number)
    # It resumed from the killed attempt's checkpoint: no epoch trained twice, and its run
    # holds the whole curve.
    assert resumed.data.tags.get("resumed_from") == status[str(victim.number)].info.run_id
    client, _, _ = mlflow_runs(cwd)
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "val_acc")]
    assert sorted(steps) == list(range(1, 41))


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with open(task / "children") as f:
            found |= {int(p) for p in f.read().split()}
    return found


def test_ctrl_c_during_set_up_ends_the_waiting_workers_and_leaves_nothing_running(
    cwd: Path,
) -> None:
    """The worker processes start before the study exists; Ctrl-C while the sweeper is
    still setting up (here: waiting for the study database's first-touch lock) ends them
    and the sweep in one line, exit 130."""
    from filelock import FileLock

    from .sweep_helpers import STUDY

    (cwd / "multirun" / STUDY).mkdir(parents=True)
    with FileLock(str(cwd / "multirun" / STUDY / "optuna.db.lock")):
        proc = start_sweep(cwd, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2")
        # Two workers (and, where they were spawned, multiprocessing's resource tracker).
        workers = wait_for(lambda: _children(proc.pid) if len(_children(proc.pid)) >= 2
                           else set(), 120, "the two worker processes", proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 128 + signal.SIGINT
    for pid in workers:
        wait_for(lambda pid=pid: not pid_alive(pid), 10, f"worker {pid} to exit")
    log = (cwd / "sweep.log").read_text()
    assert "Sweep interrupted: rerun the same command to resume" in log
    assert "Traceback" not in log, log[-3000:]
    assert not (cwd / "multirun" / STUDY / "optuna.db").exists()
    _, parents, children = mlflow_runs(cwd)
    assert parents == [] and children == []


@pytest.mark.long  # 10-20 s each on 2 cores; the mechanism is pinned fast in test_sweep_runtime
@pytest.mark.parametrize("delay", [0.3, 0.9, 1.5])
def test_ctrl_c_right_after_the_study_line_stops_the_sweep_before_any_trial(
    cwd: Path, delay: float,
) -> None:
    """0.3-1.6 s after ``Study ...: 4 trials, 2 worker(s)``, while MLflow opens its store, a
    Ctrl-C used to be dropped (raised inside a garbage collector's callback) and the sweep
    ran every trial and exited 0."""
    proc = start_sweep(cwd, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                       "trainer.epochs=1")
    wait_for(lambda: "worker(s) on this host" in (cwd / "sweep.log").read_text(), 120,
             "the sweep's Study line", proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    log = (cwd / "sweep.log").read_text()
    assert code == 128 + signal.SIGINT, log[-3000:]
    trials = load_study(cwd).get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.COMPLETE)]
    _, parents, children = mlflow_runs(cwd)
    assert "RUNNING" not in {r.info.status for r in parents + children}
    assert "Sweep finished" not in log
