"""Optuna sweeps through the real ``--multirun`` entry point: workers that pull trials,
exact ``n_trials``, resume without repeats, grids that finish, failures counted over the
study, MLflow parent/child runs and the report. Digits + a tiny MLP keep them fast.

Signals and killed processes are in ``test_sweep_faults.py``; the pieces of the runtime
(seeds, counting, lifecycle) are unit-tested in ``test_sweep_runtime.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from zsharp_sweeps.sweep.progress import SURPLUS_ATTR, counted_trials
from zsharp_sweeps.tracking.view import SHARED_VIEW_TAG_PREFIX, parse_view_url

from .sweep_helpers import (
    STUDY,
    SWEEP,
    env,
    load_study,
    mlflow_runs,
    run_sweep,
    start_sweep,
    storage_url,
)

pytestmark = pytest.mark.slow

GRID = ("--multirun", "+sweep=percentile_grid", "data=digits", "hardware=cpu", "model=mlp",
        "model.params.hidden=16", "trainer.epochs=1", "trainer.progress=false",
        "sharpness.num_batches=1", "sharpness.batch_size=32")
GRID_STUDY = "percentile_grid-mlp-digits"


@pytest.mark.long
def test_two_workers_pull_trials_asynchronously_on_their_own_devices(cwd: Path) -> None:
    # Enqueue one long trial then short ones: while one worker trains the long trial, the
    # other must take every short trial (no batch barrier).
    (cwd / "multirun" / STUDY).mkdir(parents=True)
    study = optuna.create_study(study_name=STUDY, storage=storage_url(cwd), direction="maximize")
    study.enqueue_trial({"trainer.epochs": 60})
    for _ in range(3):
        study.enqueue_trial({"trainer.epochs": 1})
    proc = run_sweep(cwd, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                     "hydra.sweeper.devices=[cpu:0,cpu:1]", "trainer.epochs=choice(1,60)")
    output = proc.stdout + proc.stderr
    # Each CPU worker takes its share of the cores (two spinning thread pools on the same
    # cores ran 10x slower); worker processes end cleanly (no library abort at exit, no
    # leaked semaphores).
    shares = [(int(t), int(c)) for t, c in re.findall(r"on cpu:\d \((\d+) of (\d+) cores\)",
                                                       output)]
    assert len(shares) == 2 and all(t == max(1, c // 2) for t, c in shares), output[-3000:]
    assert "terminate called" not in output and "leaked semaphore" not in output

    trials = load_study(cwd).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4  # n_trials is exact
    long, short = trials[0], trials[1:]
    assert long.params["trainer.epochs"] == 60
    long_device = long.user_attrs["worker"]["device"]
    assert {t.user_attrs["worker"]["device"] for t in trials} == {"cpu:0", "cpu:1"}
    # The other worker took short trial after short trial while the long one trained.
    assert all(t.user_attrs["worker"]["device"] != long_device for t in short)
    during = [t for t in short
              if long.datetime_start < t.datetime_start < t.datetime_complete
              < long.datetime_complete]
    assert len(during) >= 2, [(t.datetime_start, t.datetime_complete) for t in trials]
    for trial in trials:  # wall time minus epochs: what a trial costs beyond training
        assert 0 < trial.user_attrs["overhead_s"] < trial.user_attrs["wall_s"]

    client, parents, children = mlflow_runs(cwd)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    by_number = {int(c.data.tags["trial_number"]): c for c in children}
    for trial in trials:
        run = by_number[trial.number]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["device"] == trial.user_attrs["worker"]["device"]
        assert run.info.run_name.startswith(f"t{trial.number} ")  # tellable apart
        assert f"epochs={trial.params['trainer.epochs']}" in run.info.run_name
        assert int(run.data.params["trainer.epochs"]) == trial.params["trainer.epochs"]
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == (
            trial.params["trainer.epochs"])
        assert sorted(trial.intermediate_values) == list(
            range(1, trial.params["trainer.epochs"] + 1))
        folder = cwd / "multirun" / STUDY / str(trial.number)
        overrides = (folder / ".hydra" / "overrides.yaml").read_text()
        assert f"trainer.epochs={trial.params['trainer.epochs']}" in overrides
        assert f"trial {trial.number} started on " in (folder / "train.log").read_text()
    assert len({c.info.run_name for c in children}) == 4

    sweep_dir = cwd / "multirun" / STUDY
    assert (sweep_dir / "optimization_results.yaml").is_file()
    assert (sweep_dir / "report").is_dir()
    # What the user reads: one line per trial, where things are; not joblib's internals.
    assert "Joblib.Parallel" not in output and "study.storage=" not in output
    for trial in trials:
        assert f"trial {trial.number} complete: best_val_acc=" in output
    assert "Sweep finished: 4/4 trials (4 complete, 0 pruned, 0 failed)" in output
    assert f"report:  {sweep_dir / 'report'}" in output
    assert f"parent run {parents[0].info.run_id}" in output

    # The report command on the finished sweep's folder, as a user reruns it.
    out = cwd / "report2"
    proc = subprocess.run(
        [sys.executable, "-m", "zsharp_sweeps.report", str(sweep_dir), "--out", str(out)],
        cwd=cwd, capture_output=True, text=True, timeout=120, env=env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(p.suffix == ".png" for p in out.iterdir())


@pytest.mark.long
def test_processes_started_together_and_resumes_never_repeat_a_configuration(
    tmp_path: Path,
) -> None:
    # Three sweep processes on one study, the recipe's sampler seed 0, tracking off: each
    # trial draws from its own derived seed, so no two trials share parameters.
    args = ("hydra.sweeper.n_trials=6", "tracking=off", "trainer.epochs=1")
    procs = [start_sweep(tmp_path, *args) for _ in range(3)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, (tmp_path / "sweep.log").read_text()[-4000:]
    counted = _counted(load_study(tmp_path).get_trials())
    assert [t.state for t in counted] == [TrialState.COMPLETE] * 6
    configs = {tuple(sorted(t.params.items())) for t in counted}
    assert len(configs) == 6

    # Resuming with a larger study continues the sequence instead of restarting it.
    run_sweep(tmp_path, "hydra.sweeper.n_trials=8", *args[1:])
    counted = _counted(load_study(tmp_path).get_trials())
    assert [t.state for t in counted] == [TrialState.COMPLETE] * 8
    assert len({tuple(sorted(t.params.items())) for t in counted}) == 8
    # Trial folders are keyed by the trial number: one each, never overwritten.
    folders = sorted(int(p.name) for p in (tmp_path / "multirun" / STUDY).iterdir()
                     if (p / ".hydra").is_dir())
    assert set(folders) == {t.number for t in counted}


def _counted(trials: list) -> list:
    """The trials that take the study's places; processes racing for the last one may ask
    one more, which is told FAIL and flagged, never counted or run."""
    counted = counted_trials(trials)
    for trial in trials:
        if trial not in counted:
            assert trial.state == TrialState.FAIL and trial.user_attrs[SURPLUS_ATTR]
    return counted


def test_grid_sweep_that_exhausts_its_grid_finishes_with_plus_keys(cwd: Path) -> None:
    # The paper's Q_p grid, plus a search-space key that starts with "+" (Hydra's
    # custom-search-space example): both used to crash at the end of the study.
    # Also: only the best trial keeps its checkpoints, the parent run names the best run
    # and holds the trials table, and the closing lines link to the trials, best first.
    study = GRID_STUDY
    proc = run_sweep(
        cwd, "optimizer.percentile=choice(0.5,0.9)", "+tracking.tags.variant=choice(a,b)",
        "hydra.sweeper.keep_checkpoints=best", base=GRID,
    )
    optuna_study = load_study(cwd, study)
    trials = optuna_study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4  # capped at the grid
    assert {(t.params["optimizer.percentile"], t.params["+tracking.tags.variant"])
            for t in trials} == {(0.5, "a"), (0.5, "b"), (0.9, "a"), (0.9, "b")}
    sweep_dir = cwd / "multirun" / study
    assert (sweep_dir / "optimization_results.yaml").is_file()
    assert (sweep_dir / "report").is_dir()
    best = optuna_study.best_trial.number
    assert sorted(p.relative_to(sweep_dir).parts[0] for p in sweep_dir.glob("*/checkpoints/*.pt")
                  ) == [str(best)]
    client, parents, children = mlflow_runs(cwd)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert {p.data.tags.get("best.tracking.tags.variant") for p in parents} <= {"a", "b"}
    assert {c.data.tags["variant"] for c in children} == {"a", "b"}
    parent = parents[0]
    best_run = client.get_run(parent.data.tags["best_run_id"])
    assert best_run.data.tags["trial_number"] == str(best)
    assert best_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # An MLflow table artifact (mlflow.load_table reads it), best first.
    table = json.loads(Path(client.download_artifacts(
        parent.info.run_id, "trials.json", str(cwd))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert rows[0]["run_id"] == best_run.info.run_id and len(rows) == 4
    assert [r["best_val_acc"] for r in rows] == sorted((r["best_val_acc"] for r in rows),
                                                       reverse=True)
    assert {"optimizer.percentile", "tracking.tags.variant", "sharpness/sam"} <= set(rows[0])
    link = re.search(r"trials, best first: (\S+)", proc.stderr + proc.stdout).group(1)
    experiment_id, key = parse_view_url(link)
    assert (experiment_id, key) == (parent.info.experiment_id, parent.data.tags["mlflow_view"])
    view = json.loads(client.get_experiment(experiment_id).tags[SHARED_VIEW_TAG_PREFIX + key])
    state = json.loads(view["state"])
    assert state["orderByKey"] == "metrics.`best_val_acc`" and state["orderByAsc"] is False
    assert "params.`optimizer.percentile`" in state["selectedColumns"]


@pytest.mark.long  # 30 s on 2 cores: make test-long (CI runs it)
def test_failures_count_over_the_study_not_per_trial(tmp_path: Path) -> None:
    # A diverging lr fails its trial (non-finite loss) but the sequential sweep goes on:
    # 2 of 4 failures are within max_failure_rate=0.5.
    proc = run_sweep(
        tmp_path, "tracking=off", "optimizer.lr=choice(0.05,1e6)",
        "optimizer.percentile=choice(0.5,0.9)", base=GRID, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    states = sorted(t.state.name for t in load_study(tmp_path, GRID_STUDY).get_trials())
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    assert "Sweep finished: 4/4 trials (2 complete, 0 pruned, 2 failed)" in proc.stderr + proc.stdout

    # Past the bound the sweep stops, says why and exits 1, with what ran recorded.
    other = tmp_path / "other"
    other.mkdir()
    proc = run_sweep(
        other, "hydra.sweeper.n_trials=4", "tracking=off", "trainer.epochs=1",
        "optimizer.lr=choice(1e6,2e6)", "hydra.sweeper.max_failure_rate=0.25", check=False,
    )
    assert proc.returncode == 1
    assert [t.state for t in load_study(other).get_trials()] == [TrialState.FAIL] * 2
    # One line per diverged trial and one for the sweep: no traceback, no Hydra "Error
    # executing job" line (there was one of each per trial, and the sweep's traceback).
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output and "Error executing job" not in output, output[-4000:]
    for number in (0, 1):
        lines = [line for line in output.splitlines() if f"trial {number} failed" in line]
        assert len(lines) == 1 and "failed: the run diverged: training loss " in lines[0], lines
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: 2 of 2 finished trials failed, more than hydra.sweeper.max_failure_rate=0.25")


def test_a_bad_launcher_setting_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    proc = run_sweep(tmp_path, "hydra.sweeper.n_jobs=2", "hydra.launcher.start_method=thread",
                     check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: hydra.launcher.start_method='thread': allowed auto, fork, spawn"
    ], proc.stderr[-2000:]
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "mlruns").exists()


def test_spawned_workers_run_the_sweep_too(cwd: Path) -> None:
    """``start_method=spawn`` (where forking is unsafe): the same sweep, fresh processes."""
    proc = run_sweep(cwd, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2",
                     "trainer.epochs=1", "hydra.launcher.start_method=spawn",
                     "hydra.verbose=[hydra_plugins.zsharp_workers_launcher.launcher]")
    output = proc.stdout + proc.stderr
    assert len(re.findall(r"worker process \d+ spawned", output)) == 2, output[-3000:]
    assert "forked" not in output
    trials = load_study(cwd).get_trials()
    # Workers racing for the last place may leave a surplus trial (FAIL, not counted).
    assert [t.state for t in counted_trials(trials)] == [TrialState.COMPLETE] * 3
    assert all(t.user_attrs.get(SURPLUS_ATTR) for t in trials if t not in counted_trials(trials))


@pytest.mark.parametrize(
    ("swept", "named"),
    [("optimizer.momentum=choice(0.9,1.5)", "optimizer.momentum=1.5"),
     # A model parameter its constructor refuses: checked with the model built on the meta
     # device, before the study, the parent run or any trial exists.
     ("model.params.hidden=choice(32,0)", "model.params.hidden=0")],
)
def test_invalid_swept_value_is_refused_before_anything_is_created(
    cwd: Path, swept: str, named: str
) -> None:
    base = tuple(o for o in SWEEP if not o.startswith("model.params.hidden"))
    proc = run_sweep(cwd, swept, check=False, base=base)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and named in lines[0], proc.stderr[-2000:]
    assert not (cwd / "multirun" / STUDY / "optuna.db").exists()
    assert mlflow_runs(cwd)[1:] == ([], [])


def test_rerun_with_another_direction_is_refused(tmp_path: Path) -> None:
    (tmp_path / "multirun" / STUDY).mkdir(parents=True)
    optuna.create_study(study_name=STUDY, storage=storage_url(tmp_path), direction="minimize")
    proc = run_sweep(tmp_path, "tracking=off", check=False)
    assert proc.returncode == 2
    assert "hydra.sweeper.direction" in proc.stderr and "minimize" in proc.stderr


def test_pruned_trials_are_recorded_pruned(cwd: Path) -> None:
    run_sweep(cwd, "hydra.sweeper.n_trials=2", "study.pruner=tests.sweep_helpers.AlwaysPrune")
    study = load_study(cwd)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    assert all(sorted(t.intermediate_values) == [1] for t in study.trials)
    _, parents, children = mlflow_runs(cwd)
    assert len(children) == 2
    for child in children:
        assert child.info.status == "KILLED"
        assert child.data.tags["run_state"] == "PRUNED"
    assert parents[0].info.status == "FINISHED"


def test_multi_objective_sweep_accuracy_vs_sharpness(cwd: Path) -> None:
    study_name = "acc_vs_sharpness-mlp-digits"
    proc = run_sweep(
        cwd, "hydra.sweeper.n_trials=2",
        base=("--multirun", "+sweep=acc_vs_sharpness", "data=digits", "hardware=cpu",
              "model=mlp", "model.params.hidden=16", "trainer.epochs=1",
              "trainer.progress=false", "sharpness.num_batches=1", "sharpness.batch_size=32"),
    )
    assert proc.returncode == 0
    study = load_study(cwd, study_name)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert all(len(t.values) == 2 for t in study.trials)
    assert (cwd / "multirun" / study_name / "optimization_results.yaml").is_file()
