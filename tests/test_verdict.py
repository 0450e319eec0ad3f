"""The verdict end to end on digits, through its real entry point: stopped by SIGTERM in
each stage (tuning, retraining, analysis), resumed, finished; then the numbers it reports
are checked against values computed here, independently, from the MLflow runs."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from scipy import stats

from zsharp_sweeps.tracking.locks import sqlite_initialised

from .sweep_helpers import env, wait_for

NAME = "verdict-equal_budget-mlp-digits"
ARMS = ("sgd", "zsharp")
SEEDS = (100, 101)
VERDICT = [
    sys.executable, "-m", "zsharp_sweeps.verdict", "data=digits", "hardware=cpu", "model=mlp",
    "model.params.hidden=32", "trainer.epochs=2", "trainer.progress=false",
    "sharpness.num_batches=1", "sharpness.batch_size=32", "verdict.optimizers=[sgd,zsharp]",
    "verdict.tune.trials=2", "verdict.tune.epochs=2", "verdict.final.seeds=[100,101]",
]


def _start(cwd: Path, log_name: str) -> tuple[subprocess.Popen, Path]:
    log = cwd / log_name
    handle = open(log, "w")  # noqa: SIM115  closed with the process
    return subprocess.Popen(VERDICT, cwd=cwd, env=env(), stdout=handle,
                            stderr=subprocess.STDOUT, text=True), log


def _storage(cwd: Path) -> str:
    return f"sqlite:///{cwd / 'multirun' / NAME / 'optuna.db'}"


def _study(cwd: Path, stage: str, arm: str) -> optuna.Study:
    return optuna.load_study(study_name=f"{NAME}.{stage}.{arm}", storage=_storage(cwd))


def _running(cwd: Path, stage: str) -> bool:
    if not sqlite_initialised(cwd / "multirun" / NAME / "optuna.db"):
        return False
    for arm in ARMS:
        try:
            trials = _study(cwd, stage, arm).get_trials(deepcopy=False)
        except KeyError:
            continue
        if any(t.state == TrialState.RUNNING for t in trials):
            return True
    return False


def _completed(cwd: Path) -> dict[tuple[str, int], object]:
    """Every COMPLETE trial, by (study, number), with when it completed."""
    out = {}
    for stage in ("tune", "final"):
        for arm in ARMS:
            try:
                study = _study(cwd, stage, arm)
            except KeyError:
                continue
            for t in study.get_trials(deepcopy=False):
                if t.state == TrialState.COMPLETE:
                    out[(study.study_name, t.number)] = t.datetime_complete
    return out


def _stop(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert "Verdict stopped: rerun the same command to resume" in log.read_text()


def _no_running_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("zsharp-sweeps")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    return runs


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_verdict_stopped_in_each_stage_resumes_and_reports_what_the_runs_say(cwd: Path):
    client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    snapshots = []

    # 1. SIGTERM while tuning trials run
    proc, log = _start(cwd, "run1.log")
    wait_for(lambda: _running(cwd, "tune"), 120, "a tuning trial running", proc)
    _stop(proc, log)
    runs = _no_running_runs(client)
    verdict_run = next(r for r in runs if r.data.tags.get("verdict_stage") == "verdict")
    assert verdict_run.info.status == "KILLED"
    snapshots.append(_completed(cwd))

    # 2. SIGTERM while final (retraining) trials run
    proc, log = _start(cwd, "run2.log")
    wait_for(lambda: _running(cwd, "final"), 180, "a final trial running", proc)
    _stop(proc, log)
    _no_running_runs(client)
    snapshots.append(_completed(cwd))

    # 3. SIGTERM in the analysis: as soon as the last sweep is done
    proc, log = _start(cwd, "run3.log")
    wait_for(lambda: "final.zsharp: done" in log.read_text()
             and "final.sgd: done" in (cwd / "run2.log").read_text() + log.read_text(),
             180, "every final sweep done", proc)
    _stop(proc, log)
    _no_running_runs(client)
    assert not (cwd / "multirun" / NAME / "verdict" / "verdict.json").exists() or \
        "Verdict written" not in log.read_text()
    snapshots.append(_completed(cwd))

    # 4. the rerun finishes: only the analysis is left
    proc, log = _start(cwd, "run4.log")
    assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    assert "sweep(s) to run" not in log.read_text()  # no stage was started again
    done = _completed(cwd)

    # Nothing finished ran twice: every trial completed before a stop is unchanged, and
    # each study holds exactly its size in COMPLETE trials.
    for snapshot in snapshots:
        for key, when in snapshot.items():
            assert done[key] == when, key
    for arm in ARMS:
        assert sum(1 for (s, _n) in done if s == f"{NAME}.tune.{arm}") == 2
        assert sum(1 for (s, _n) in done if s == f"{NAME}.final.{arm}") == len(SEEDS)
    runs = _no_running_runs(client)
    finished_trial_runs = [r for r in runs if r.data.tags.get("trial_number")
                           and r.info.status == "FINISHED"]
    assert len(finished_trial_runs) == len(done)  # one finished MLflow run per trial

    # MLflow: one verdict run, FINISHED, with every stage's sweep nested under it
    verdict_run = client.get_run(verdict_run.info.run_id)
    assert verdict_run.info.status == "FINISHED"
    sweeps = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert sorted(r.data.tags["study_name"] for r in sweeps) == sorted(
        f"{NAME}.{stage}.{arm}" for stage in ("tune", "final") for arm in ARMS)
    assert {r.data.tags["mlflow.parentRunId"] for r in sweeps} == {verdict_run.info.run_id}
    sweep_ids = {r.info.run_id for r in sweeps}
    assert {r.data.tags["mlflow.parentRunId"] for r in finished_trial_runs} <= sweep_ids
    assert "Paired comparisons with zsharp" in verdict_run.data.tags["mlflow.note.content"]
    artifacts = {a.path for a in client.list_artifacts(verdict_run.info.run_id, "verdict")}
    assert {"verdict/verdict.md", "verdict/verdict.tex", "verdict/val_curves.png",
            "verdict/sharpness_vs_test.png", "verdict/verdict.json"} <= artifacts

    # The numbers, recomputed here from the final runs' MLflow metrics
    test_acc: dict[str, dict[int, float]] = {arm: {} for arm in ARMS}
    sharp: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for r in finished_trial_runs:
        if r.data.tags.get("verdict_stage") != "final":
            continue
        arm, seed = r.data.tags["verdict_arm"], int(r.data.params["seed"])
        assert seed in SEEDS and seed != 0  # fresh seeds: tuning ran at seed 0
        test_acc[arm][seed] = r.data.metrics["final_test_acc"]
        sharp[arm].append(r.data.metrics["sharpness/sam"])
    report = json.loads((cwd / "multirun" / NAME / "verdict" / "verdict.json").read_text())
    rows = {row["arm"]: row for row in report["arms"]}
    for arm in ARMS:
        acc = np.array([test_acc[arm][s] for s in SEEDS])
        half = stats.t.ppf(0.975, len(acc) - 1) * acc.std(ddof=1) / math.sqrt(len(acc))
        assert rows[arm]["n"] == len(SEEDS)
        assert rows[arm]["test_mean"] == pytest.approx(acc.mean(), abs=1e-12)
        assert rows[arm]["test_std"] == pytest.approx(acc.std(ddof=1), abs=1e-12)
        assert rows[arm]["ci_low"] == pytest.approx(acc.mean() - half, abs=1e-12)
        assert rows[arm]["ci_high"] == pytest.approx(acc.mean() + half, abs=1e-12)
        assert rows[arm]["sharpness/sam_mean"] == pytest.approx(np.mean(sharp[arm]), abs=1e-12)
        assert rows[arm]["trials"] == 2
    (comparison,) = report["comparisons"]
    diff = np.array([test_acc["sgd"][s] - test_acc["zsharp"][s] for s in SEEDS])
    assert comparison["arm"] == "sgd" and comparison["reference"] == "zsharp"
    assert comparison["mean_diff"] == pytest.approx(diff.mean(), abs=1e-12)
    if np.ptp(diff) > 1e-12:
        p = stats.ttest_rel([test_acc["sgd"][s] for s in SEEDS],
                            [test_acc["zsharp"][s] for s in SEEDS]).pvalue
        assert comparison["p"] == pytest.approx(p, rel=1e-9)
        assert comparison["p_holm"] == pytest.approx(p, rel=1e-9)  # one comparison
    # the report's tables are there, for people and for papers
    out = cwd / "multirun" / NAME / "verdict"
    assert "| sgd |" in (out / "verdict.md").read_text()
    assert (out / "verdict.tex").read_text().lstrip().startswith("\\begin{tabular}")
    assert "device-minutes" in (out / "cost.md").read_text()

    # 5. a rerun of a finished verdict runs nothing and shows the verdict
    started = time.monotonic()
    rerun = subprocess.run(VERDICT, cwd=cwd, env=env(), capture_output=True, text=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Paired comparisons with zsharp" in rerun.stdout
    assert _completed(cwd) == done
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_a_bad_protocol_value_is_one_line_exit_2_and_creates_nothing(cwd: Path):
    first = subprocess.run([*VERDICT, "verdict.tune.trials=0"], cwd=cwd, env=env(),
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 2
    assert first.stderr.strip().splitlines() == [
        "error: verdict.tune.trials=0 is invalid: allowed >= 1"]
    # nothing created but Hydra's log of the command: no storage, no MLflow run
    assert not (cwd / "multirun" / NAME / "optuna.db").exists()
    client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("zsharp-sweeps")
    assert exp is None or client.search_runs([exp.experiment_id]) == []
