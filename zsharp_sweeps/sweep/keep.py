"""Which trials keep their checkpoints once a sweep is done (``hydra.sweeper.keep_checkpoints``).

Every trial checkpoints after each epoch into ``<its folder>/checkpoints`` (a retried trial
resumes from there) and keeps its last one when it ends (``trainer.keep_checkpoints``): up
to ~72 MB per trial for a ViT, so a 100-trial sweep holds gigabytes. The sweeper can tidy
that once the study is done:

- ``all`` (the default): nothing is deleted;
- ``best``: only the best trial keeps its checkpoints (several objectives: the Pareto front);
- ``none``: no trial keeps them;
- an integer k: the k best complete trials keep them.

Nothing is deleted while the study could still need a checkpoint: only a sweep that ended
FINISHED, whose study holds no RUNNING or WAITING trial (a retry not yet run, a worker of
another host), prunes; a stopped, failed or still-shared sweep keeps everything, so its
interrupted trials resume on the next run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from zsharp_sweeps.sweep.progress import counted_trials
from zsharp_sweeps.sweep.worker import DIR_ATTR

log = logging.getLogger(__name__)

KEEP_CHOICES = ("all", "best", "none")


def check_keep(keep: object) -> str | int:
    """``keep`` as the sweeper uses it; ValueError naming the setting otherwise."""
    if isinstance(keep, bool):
        keep = str(keep).lower()
    if isinstance(keep, int) and keep >= 0:
        return keep
    if isinstance(keep, str):
        if keep.isdigit():
            return int(keep)
        if keep in KEEP_CHOICES:
            return keep
    raise ValueError(f"hydra.sweeper.keep_checkpoints={keep!r} is invalid: allowed all, best, "
                     "none or a number k >= 0 (the k best trials keep theirs)")


def kept_trials(study: optuna.Study, keep: str | int) -> set[int]:
    """The numbers of the trials whose checkpoints stay."""
    trials = [t for t in counted_trials(study.get_trials(deepcopy=False))
              if t.state == TrialState.COMPLETE]
    if keep == "all":
        return {t.number for t in study.get_trials(deepcopy=False)}
    if keep == "none" or not trials:
        return set()
    if keep == "best":
        if len(study.directions) > 1:
            return {t.number for t in study.best_trials}
        return {study.best_trial.number}
    if len(study.directions) > 1:  # k best of several objectives: the front, then the rest
        front = [t.number for t in study.best_trials]
        return set((front + [t.number for t in trials if t.number not in front])[: int(keep)])
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    ranked = sorted(trials, key=lambda t: (sign * float(t.value), t.number))
    return {t.number for t in ranked[: int(keep)]}


def _checkpoint_dir(trial: FrozenTrial, sweep_dir: Path) -> Path:
    folder = trial.user_attrs.get(DIR_ATTR)
    return Path(folder if folder else sweep_dir / str(trial.number)) / "checkpoints"


def prune_checkpoints(study: optuna.Study, sweep_dir: str | Path, keep: str | int,
                      status: str) -> list[Path]:
    """Delete the checkpoint folders of the trials ``keep`` does not keep, once the sweep
    is over; returns the folders deleted (none when the sweep may still need them)."""
    keep = check_keep(keep)
    if keep == "all":
        return []
    trials = study.get_trials(deepcopy=False)
    pending = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    if status != "FINISHED" or pending:
        if status == "FINISHED":
            log.info(f"hydra.sweeper.keep_checkpoints={keep}: trials {pending} are still "
                     "running or waiting; every checkpoint is kept")
        return []
    kept = kept_trials(study, keep)
    kept_dirs = {_checkpoint_dir(t, Path(sweep_dir)).resolve()
                 for t in trials if t.number in kept}
    removed = []
    for trial in trials:
        folder = _checkpoint_dir(trial, Path(sweep_dir))
        if trial.number in kept or folder.resolve() in kept_dirs or not folder.is_dir():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        log.info(f"hydra.sweeper.keep_checkpoints={keep}: deleted the checkpoints of "
                 f"{len(removed)} trial(s); kept those of trials {sorted(kept)}")
    return removed
