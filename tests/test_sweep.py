"""Optuna sweeps through the real entry point: persistence, resume, pruning, parallel
workers, MLflow parent/child runs and the report. Digits + a tiny MLP keep them fast."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from zsharp_sweeps.config import StudyConfig
from zsharp_sweeps.report import compare, paired_test
from zsharp_sweeps.sweep import assign_device, build_pruner

from .conftest import REPO

SWEEP = [
    "--multirun", "+sweep=zsharp_rho_qp_lr", "data=digits", "hardware=cpu", "model=mlp",
    "model.params.hidden=32", "trainer.epochs=2", "trainer.progress=false",
    "sharpness.num_batches=1", "sharpness.batch_size=32", "hydra.sweeper.sampler.n_startup_trials=2",
]
STUDY = "zsharp_rho_qp_lr-mlp-digits"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _sweep(cwd: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "zsharp_sweeps.train", *SWEEP, *extra],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _study(cwd: Path, name: str = STUDY) -> optuna.Study:
    return optuna.load_study(
        study_name=name, storage=f"sqlite:///{cwd / 'multirun' / name / 'optuna.db'}"
    )


def _mlflow(cwd: Path):
    client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("zsharp-sweeps")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_tpe_sweep_records_trials_runs_and_report(tmp_path: Path) -> None:
    _sweep(tmp_path, "hydra.sweeper.n_trials=3")
    study = _study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    for trial in study.trials:
        assert set(trial.params) == {"optimizer.rho", "optimizer.percentile", "optimizer.lr"}
        assert 0.01 <= trial.params["optimizer.rho"] <= 0.5
        assert 0.0 <= trial.value <= 1.0
        assert sorted(trial.intermediate_values) == [1, 2]  # per-epoch val_acc reports

    client, parents, children = _mlflow(tmp_path)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["study_name"] == STUDY
    assert "space.optimizer.rho" in parent.data.params
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == [0, 1, 2]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["run_state"] == "COMPLETE"
        number = int(child.data.tags["trial_number"])
        rho = study.trials[number].params["optimizer.rho"]
        assert float(child.data.params["optimizer.rho"]) == pytest.approx(rho)
        assert len(client.get_metric_history(child.info.run_id, "val_acc")) == 2

    # The sweeper writes the report at the end and logs it to the parent run.
    report = tmp_path / "multirun" / STUDY / "report"
    for name in ("history.png", "slice.png", "contour.png",
                 "importances.png", "val_curves.png", "best_settings.csv", "summary.txt"):
        assert (report / name).is_file(), name
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/history.png" in logged

    # The report command on the same sweep directory.
    out = tmp_path / "report2"
    proc = subprocess.run(
        [sys.executable, "-m", "zsharp_sweeps.report", str(tmp_path / "multirun" / STUDY),
         "--out", str(out)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "optimizer.percentile" in proc.stdout
    assert (out / "contour.png").stat().st_size > 1000
    rows = (out / "best_settings.csv").read_text().splitlines()
    assert len(rows) == 1 + 3


def test_rerunning_resumes_and_retries_interrupted_trials(tmp_path: Path) -> None:
    _sweep(tmp_path, "hydra.sweeper.n_trials=2")
    study = _study(tmp_path)
    first = [(t.number, t.params, t.value) for t in study.trials]
    assert len(first) == 2

    # Simulate a sweep killed mid-trial: a RUNNING trial owned by a dead process on this host.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask({"optimizer.rho": optuna.distributions.FloatDistribution(0.01, 0.5, log=True)})
    study._storage.set_trial_system_attr(
        trial._trial_id, "zsharp:worker", {"host": os.uname().nodename, "pid": dead.pid}
    )

    _sweep(tmp_path, "hydra.sweeper.n_trials=4")
    study = _study(tmp_path)
    trials = study.trials
    # The first two trials are untouched, not repeated.
    assert [(t.number, t.params, t.value) for t in trials[:2]] == first
    interrupted = trials[2]
    assert interrupted.state == TrialState.FAIL
    assert interrupted.user_attrs["interrupted"] is True
    counted = [t for t in trials if not t.user_attrs.get("interrupted")]
    assert len(counted) == 4
    assert all(t.state == TrialState.COMPLETE for t in counted)
    retry = [t for t in trials if t.user_attrs.get("retry_of") == interrupted.number]
    assert len(retry) == 1
    assert retry[0].params["optimizer.rho"] == interrupted.params["optimizer.rho"]

    # A third run with the same size adds nothing.
    _sweep(tmp_path, "hydra.sweeper.n_trials=4")
    assert len(_study(tmp_path).trials) == len(trials)
    _, parents, children = _mlflow(tmp_path)
    assert len(parents) == 1  # the resumed sweeps share the parent run
    assert len(children) == 4


def test_pruned_trials_are_recorded_pruned(tmp_path: Path) -> None:
    _sweep(tmp_path, "hydra.sweeper.n_trials=2", "study.pruner=tests.sweep_helpers.AlwaysPrune")
    study = _study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    assert all(sorted(t.intermediate_values) == [1] for t in study.trials)
    _, parents, children = _mlflow(tmp_path)
    assert len(children) == 2
    for child in children:
        assert child.info.status == "KILLED"
        assert child.data.tags["run_state"] == "PRUNED"
        assert "train_loss" in child.data.metrics  # the epoch before pruning was logged
    assert parents[0].info.status == "FINISHED"


def test_two_parallel_workers_on_one_storage_lose_no_trial(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    args = [sys.executable, "-m", "zsharp_sweeps.train", *SWEEP,
            "hydra.sweeper.n_trials=4", f"hydra.sweeper.storage='{storage}'"]
    workers = [
        subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-4000:]
    study = optuna.load_study(study_name=STUDY, storage=storage)
    trials = study.trials
    assert len(trials) >= 4
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.number for t in trials}) == len(trials)
    _, parents, children = _mlflow(tmp_path)
    assert len(parents) == 1
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == sorted(
        t.number for t in trials
    )


def test_parallel_batch_gets_slots_and_failed_trials_stay_visible(tmp_path: Path) -> None:
    # n_jobs=2: two joblib worker processes; lr=-1 makes every trial fail validation.
    proc = _sweep(
        tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.max_failure_rate=1.0", "optimizer.lr=-1", check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    study = _study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    _, _, children = _mlflow(tmp_path)
    assert [c.info.status for c in children] == ["FAILED"] * 2
    assert all("optimizer.lr" in c.data.tags["error"] for c in children)

    _sweep(tmp_path, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2")
    study = _study(tmp_path)
    assert [t.state for t in study.trials[2:]] == [TrialState.COMPLETE] * 2
    _, _, children = _mlflow(tmp_path)
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert sorted(c.data.params["study.slot"] for c in finished) == ["0", "1"]
    assert {c.data.tags["device"] for c in finished} == {"cpu"}


def test_assign_device_spreads_slots_over_gpus() -> None:
    assert [assign_device("cuda", s, 4) for s in range(6)] == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1",
    ]
    assert [assign_device("auto", s, 2, trials_per_gpu=2) for s in range(4)] == [
        "cuda:0", "cuda:0", "cuda:1", "cuda:1",
    ]
    assert assign_device("cpu", 3, 8) == "cpu"
    assert assign_device("cuda:5", 0, 8) == "cuda:5"
    assert assign_device("auto", None, 8) == "auto"
    assert assign_device("auto", 1, 0) == "auto"


def test_build_pruner_by_name_and_path() -> None:
    assert isinstance(build_pruner(StudyConfig(pruner="median")), optuna.pruners.MedianPruner)
    assert isinstance(build_pruner(StudyConfig(pruner="hyperband")), optuna.pruners.HyperbandPruner)
    assert isinstance(build_pruner(StudyConfig(pruner="none")), optuna.pruners.NopPruner)
    custom = build_pruner(StudyConfig(pruner="tests.sweep_helpers.AlwaysPrune"))
    assert type(custom).__name__ == "AlwaysPrune"
    with pytest.raises(ValueError, match="study.pruner"):
        build_pruner(StudyConfig(pruner="no.such.Pruner"))
    with pytest.raises(ValueError, match="study.pruner"):
        StudyConfig(pruner="sometimes")


def test_paired_test_across_seeds() -> None:
    result = paired_test([0.90, 0.92, 0.91], [0.88, 0.91, 0.89])
    assert result["n"] == 3
    assert result["mean_diff"] == pytest.approx(0.016666, rel=1e-3)
    assert result["t_stat"] == pytest.approx(5.0, rel=1e-6)
    assert 0.03 < result["p_value"] < 0.04
    by_seed = {"zsharp": {0: [0.9], 1: [0.92], 2: [0.91]}, "sam": {0: [0.88], 1: [0.91], 3: [0.5]}}
    paired = compare(by_seed, "zsharp", "sam")
    assert paired["n"] == 2  # seeds both ran
    with pytest.raises(ValueError, match="adamw"):
        compare(by_seed, "zsharp", "adamw")


def test_multi_objective_sweep_accuracy_vs_sharpness(tmp_path: Path) -> None:
    study_name = "acc_vs_sharpness-mlp-digits"
    proc = subprocess.run(
        [sys.executable, "-m", "zsharp_sweeps.train", "--multirun", "+sweep=acc_vs_sharpness",
         *SWEEP[2:-1], "hydra.sweeper.n_trials=2"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    study = _study(tmp_path, study_name)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    _, _, children = _mlflow(tmp_path)
    by_trial = {int(c.data.tags["trial_number"]): c for c in children}
    for trial in study.trials:
        accuracy, sharpness = trial.values
        run = by_trial[trial.number]
        assert accuracy == pytest.approx(run.data.metrics["best_val_acc"])
        assert sharpness == pytest.approx(run.data.metrics["sharpness/sam"])  # last epoch's
    assert (tmp_path / "multirun" / study_name / "report" / "pareto.png").is_file()


def test_streams_launcher_runs_trials_as_threads_each_with_its_own_config(tmp_path: Path) -> None:
    # Two trials at once in one process: each must see its own overrides (Hydra's per-job
    # config is per thread while the batch runs), write its own job dir and MLflow run.
    proc = _sweep(tmp_path, "hydra/launcher=zsharp_streams", "hydra.sweeper.n_jobs=2",
                  "hydra.sweeper.n_trials=4")
    assert "as threads of one process" in proc.stdout + proc.stderr
    study = _study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    _, parents, children = _mlflow(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    by_trial = {int(c.data.tags["trial_number"]): c for c in children}
    for trial in study.trials:
        run = by_trial[trial.number]
        assert run.info.status == "FINISHED"
        assert float(run.data.params["optimizer.lr"]) == trial.params["optimizer.lr"]
        assert float(run.data.params["optimizer.rho"]) == trial.params["optimizer.rho"]
        assert run.data.metrics["best_val_acc"] == trial.value
        job = tmp_path / "multirun" / STUDY / str(trial.number)
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        assert f"optimizer.lr={trial.params['optimizer.lr']}" in overrides
        assert f"study.trial_number={trial.number}" in overrides
    assert sorted(c.data.params["study.slot"] for c in children) == ["0", "0", "1", "1"]
    for pair in ((0, 1), (2, 3)):  # the two trials of a batch ran at the same time
        a, b = (by_trial[n].info for n in pair)
        assert a.start_time < b.end_time and b.start_time < a.end_time


def test_streams_launcher_refuses_what_threads_cannot_share(tmp_path: Path) -> None:
    proc = _sweep(tmp_path, "hydra/launcher=zsharp_streams", "hydra.sweeper.n_trials=1",
                  "hardware.compile=true", check=False)
    assert proc.returncode != 0
    assert "allowed hardware.compile=false" in proc.stderr
