"""A verdict's results as the analysis floor takes them, from what its stages' trials
recorded (``sweep.records``)."""

from __future__ import annotations

import math
from typing import Any

from zsharp_sweeps.analysis import ArmBudget, SeedResult
from zsharp_sweeps.sweep.records import StudyStore, TrialRecord


def _number(value: Any) -> float:
    return float(value) if value is not None else math.nan


def seed_result(arm: str, record: TrialRecord) -> SeedResult:
    metrics = record.metrics
    if "final_test_acc" not in metrics:
        raise ValueError(f"arm {arm}: final trial {record.number} recorded no final_test_acc "
                         "(run by an older worker?)")
    return SeedResult(
        arm=arm, seed=int(record.params["seed"]), test_acc=float(metrics["final_test_acc"]),
        best_val_acc=float(metrics.get("best_val_acc", math.nan)),
        sharpness={k: float(v) for k, v in metrics.items() if k.startswith("sharpness/")},
        val_curve=tuple(_number(v) for v in record.curves.get("val_acc", [])),
        train_time_s=float(metrics.get("train_time_s", math.nan)),
    )


def seed_results(arm: str, store: StudyStore, final_study: str) -> list[SeedResult]:
    """One result per completed final run (a seed whose run failed is left out, and the
    analysis says which seeds do not pair)."""
    return [seed_result(arm, record) for record in store.records(final_study)]


def arm_budget(arm: str, store: StudyStore, tune_study: str, selected: dict[str, Any],
               device_s: dict[str, float]) -> ArmBudget:
    state = store.progress(tune_study)
    return ArmBudget(
        arm=arm, config=dict(selected["params"]), tune_best_val=float(selected["value"]),
        trials=state.finished, complete=state.complete, pruned=state.pruned,
        failed=state.failed, tune_gpu_hours=device_s.get(f"tune.{arm}", 0.0) / 3600,
        final_gpu_hours=device_s.get(f"final.{arm}", 0.0) / 3600,
    )
