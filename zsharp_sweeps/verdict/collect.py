"""Read a verdict's results out of its stages' studies (the worker records each trial's
summary metrics and per-epoch curves as trial attributes), for the analysis floor."""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from zsharp_sweeps.analysis import ArmBudget, SeedResult
from zsharp_sweeps.sweep.progress import counted_trials, progress


def _number(value: Any) -> float:
    return float(value) if value is not None else math.nan


def seed_result(arm: str, trial: FrozenTrial) -> SeedResult:
    metrics = trial.user_attrs.get("metrics") or {}
    curves = trial.user_attrs.get("curves") or {}
    if "final_test_acc" not in metrics:
        raise ValueError(f"arm {arm}: final trial {trial.number} recorded no final_test_acc "
                         "(run by an older worker?)")
    return SeedResult(
        arm=arm, seed=int(trial.params["seed"]), test_acc=float(metrics["final_test_acc"]),
        best_val_acc=float(metrics.get("best_val_acc", math.nan)),
        sharpness={k: float(v) for k, v in metrics.items() if k.startswith("sharpness/")},
        val_curve=tuple(_number(v) for v in curves.get("val_acc", [])),
        train_time_s=float(metrics.get("train_time_s", math.nan)),
    )


def seed_results(arm: str, final: optuna.Study) -> list[SeedResult]:
    """One result per completed final run (a seed whose run failed is left out, and the
    analysis says which seeds do not pair)."""
    trials = counted_trials(final.get_trials(deepcopy=False))
    return [seed_result(arm, t) for t in trials if t.state == TrialState.COMPLETE]


def select_best(tune: optuna.Study) -> dict[str, Any]:
    """The tuning trial with the best validation objective (never the test set)."""
    complete = [t for t in counted_trials(tune.get_trials(deepcopy=False))
                if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        state = progress(tune)
        raise ValueError(f"study {tune.study_name}: no tuning trial completed "
                         f"({state.pruned} pruned, {state.failed} failed)")
    best = max(complete, key=lambda t: (t.value, -t.number))
    return {"params": dict(best.params), "trial": best.number, "value": float(best.value)}


def arm_budget(arm: str, tune: optuna.Study, selected: dict[str, Any], device_s: dict[str, float]
               ) -> ArmBudget:
    state = progress(tune)
    return ArmBudget(
        arm=arm, config=dict(selected["params"]), tune_best_val=float(selected["value"]),
        trials=state.finished, complete=state.complete, pruned=state.pruned,
        failed=state.failed, tune_gpu_hours=device_s.get(f"tune.{arm}", 0.0) / 3600,
        final_gpu_hours=device_s.get(f"final.{arm}", 0.0) / 3600,
    )


def epoch_seconds(study: optuna.Study) -> tuple[float, float]:
    """(seconds in training epochs, seconds of trial wall time) over the study's trials:
    what the sweep's workers spent training against what its trials took in all."""
    epochs = wall = 0.0
    for t in study.get_trials(deepcopy=False):
        w, o = t.user_attrs.get("wall_s"), t.user_attrs.get("overhead_s")
        if w is not None:
            wall += float(w)
            if o is not None:
                epochs += float(w) - float(o)
    return epochs, wall
