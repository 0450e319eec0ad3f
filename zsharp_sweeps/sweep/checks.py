"""The sweeper's own settings (``hydra.sweeper.*``), checked before a sweep creates anything.

Why: the stock sweeper takes any number. ``n_trials=0`` (or ``-3``) created an empty study
and a FINISHED MLflow parent run and exited 0; ``n_jobs=0`` logged "0 worker(s)" and started
one; ``study_name=../../x`` put the sweep's folder (``multirun/<study_name>``) outside
``multirun/``; ``storage`` set to the MLflow database wrote Optuna's tables into it. Each is
one ``ConfigError`` line here, naming the setting and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path

from zsharp_sweeps.config import ConfigError
from zsharp_sweeps.tracking.uris import sqlite_path

__all__ = ["check_separate_stores", "check_sweeper_settings"]


def check_sweeper_settings(*, n_trials: int, n_jobs: int, max_failure_rate: float,
                           study_name: str | None, heartbeat_interval: int = 10,
                           grace_period: int | None = None, max_retry: int = 3) -> None:
    """Raise ``ConfigError`` for a ``hydra.sweeper`` setting out of its range."""
    ranges = [
        ("n_trials", n_trials, n_trials >= 1,
         "an int >= 1 (the size of the study; rerun the command to continue it)"),
        ("n_jobs", n_jobs, n_jobs >= 1,
         "an int >= 1 (the workers this host starts: n_gpus x hardware.trials_per_gpu)"),
        ("max_failure_rate", max_failure_rate, 0.0 <= max_failure_rate <= 1.0,
         "a fraction in [0, 1]"),
        ("heartbeat_interval", heartbeat_interval, heartbeat_interval >= 1,
         "an int >= 1 (seconds)"),
        ("grace_period", grace_period, grace_period is None or grace_period >= 1,
         "null (3 x heartbeat_interval) or an int >= 1 (seconds)"),
        ("max_retry", max_retry, max_retry >= 0, "an int >= 0"),
    ]
    for name, value, ok, allowed in ranges:
        if not ok:
            raise ConfigError(f"hydra.sweeper.{name}={value} is invalid: allowed {allowed}.")
    if study_name is not None:
        check_study_name(str(study_name))


def check_study_name(name: str) -> None:
    """A study's name is a name, not a path: it becomes the folder ``multirun/<name>``."""
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not name.strip() or name in (".", "..") or any(s in name for s in separators):
        raise ConfigError(
            f"hydra.sweeper.study_name={name!r} is invalid: it names the sweep's folder "
            "(multirun/<study_name>), so it must be a plain name: allowed a non-empty name "
            "without '/' or '\\' that is not '.' or '..' (to put the study elsewhere, set "
            "hydra.sweep.dir or hydra.sweeper.storage)."
        )


def check_separate_stores(storage: str, tracking_uri: str | None) -> None:
    """The Optuna storage and the MLflow store are two databases: the same SQLite file for
    both would get both tools' tables (and their two schema versions in one
    ``alembic_version`` table), which breaks the second tool to open it."""
    if tracking_uri is None:
        return
    study_db, mlflow_db = sqlite_path(storage), sqlite_path(tracking_uri)
    if study_db is None or mlflow_db is None:
        return
    if Path(study_db).expanduser().resolve() == Path(mlflow_db).expanduser().resolve():
        raise ConfigError(
            f"hydra.sweeper.storage={storage!r} is the MLflow tracking store's database "
            f"({tracking_uri}): allowed another file, e.g. null (multirun/<study_name>/"
            "optuna.db) or sqlite:///<path>/optuna.db."
        )
