"""What a sweep's trials record in the study, and the reading of it.

Why in the study: an analysis (the verdict's) then reads one storage, with or without
MLflow, on any host. The writer (``record_results``, called by the worker) and the readers
live together so the attribute names are defined once; callers above the sweep floor get
plain data (``TrialRecord``, dicts) and never touch Optuna.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from zsharp_sweeps.sweep.progress import Progress, counted_trials, progress

#: Per-epoch metrics a trial keeps in its ``curves`` attribute.
CURVE_METRICS = ("val_acc", "val_loss", "test_acc", "train_loss", "epoch_wall_s")


def record_results(trial: optuna.Trial, summary: Mapping[str, Any]) -> None:
    """The trial's results as attributes: ``metrics`` (the finite summary numbers, test
    accuracy and sharpness included) and ``curves`` (per-epoch metrics)."""
    metrics = {k: float(v) for k, v in summary.items()
               if isinstance(v, (int, float)) and math.isfinite(float(v))}
    trial.set_user_attr("metrics", metrics)
    history = summary.get("history") or []
    curves = {name: [float(row[name]) if math.isfinite(row.get(name, math.nan)) else None
                     for row in history]
              for name in CURVE_METRICS if any(name in row for row in history)}
    if curves:
        trial.set_user_attr("curves", curves)


@dataclass(frozen=True)
class TrialRecord:
    """A completed trial that counts toward its study: its parameters and what it recorded."""

    number: int
    params: dict[str, Any]
    metrics: dict[str, float]
    curves: dict[str, list[float | None]]


class StudyStore:
    """Studies of one storage, read by name, and the attributes of one bookkeeping study
    (``name``: it holds no trials), for a program that runs sweeps and reads their results."""

    def __init__(self, url: str, name: str) -> None:
        from zsharp_sweeps.sweep.storage import open_storage
        from zsharp_sweeps.tracking.locks import sqlite_init_lock
        from zsharp_sweeps.tracking.uris import sqlite_path

        path = sqlite_path(url)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        with sqlite_init_lock(url):  # the first touch creates the schema
            self.storage = open_storage(url)
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self.meta = optuna.create_study(study_name=name, storage=self.storage,
                                            load_if_exists=True, direction="maximize")
        self.name = name

    # ----- the bookkeeping study's attributes --------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return self.meta.user_attrs

    def get(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.meta.set_user_attr(key, value)

    def add(self, key: str, amount: float) -> None:
        """Accumulate a number over runs (device seconds, wall seconds)."""
        self.set(key, float(self.get(key, 0.0)) + float(amount))

    # ----- the studies -------------------------------------------------------------------
    def _study(self, name: str) -> optuna.Study | None:
        try:
            return optuna.load_study(study_name=name, storage=self.storage)
        except KeyError:
            return None

    def progress(self, name: str) -> Progress:
        """Counts of the trials that count (all zero for a study not created yet)."""
        study = self._study(name)
        return progress(study) if study is not None else Progress(0, 0, 0, 0, 0)

    def done(self, name: str, n_trials: int) -> bool:
        return self._study(name) is not None and self.progress(name).done(n_trials)

    def records(self, name: str) -> list[TrialRecord]:
        """The completed trials that count, in trial order."""
        study = self._study(name)
        trials = counted_trials(study.get_trials(deepcopy=False)) if study else []
        return [TrialRecord(t.number, dict(t.params), dict(t.user_attrs.get("metrics") or {}),
                            dict(t.user_attrs.get("curves") or {}))
                for t in trials if t.state == TrialState.COMPLETE]

    def best(self, name: str) -> dict[str, Any]:
        """The completed trial with the best objective (a single-objective study that
        maximises): ``{"params", "trial", "value"}``. ValueError if none completed."""
        study = self._study(name)
        complete = [t for t in counted_trials(study.get_trials(deepcopy=False))
                    if t.state == TrialState.COMPLETE and t.value is not None] if study else []
        if not complete:
            state = self.progress(name)
            raise ValueError(f"study {name}: no tuning trial completed "
                             f"({state.pruned} pruned, {state.failed} failed)")
        best = max(complete, key=lambda t: (t.value, -t.number))
        return {"params": dict(best.params), "trial": best.number, "value": float(best.value)}

    def epoch_seconds(self, name: str) -> tuple[float, float]:
        """(seconds in training epochs, seconds of trial wall time) over the study's trials,
        from the worker's ``wall_s`` and ``overhead_s`` attributes."""
        study = self._study(name)
        epochs = wall = 0.0
        for t in study.get_trials(deepcopy=False) if study else []:
            w, o = t.user_attrs.get("wall_s"), t.user_attrs.get("overhead_s")
            if w is not None:
                wall += float(w)
                if o is not None:
                    epochs += float(w) - float(o)
        return epochs, wall
