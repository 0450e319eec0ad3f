"""The Optuna storage URL (``hydra.sweeper.storage``), checked before a sweep creates anything.

Why: Optuna opens the storage inside ``create_study``/``load_study`` and reports a bad one as
a long traceback (``ModuleNotFoundError: MySQLdb``, ``database disk image is malformed``).
Worse, a 0-byte ``optuna.db`` (a copy that failed, a disk that filled up) is a valid empty
SQLite database to Optuna: the sweep silently starts a new study and the old trials are
gone. ``check_storage_url`` refuses all of these with one line naming the setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from zsharp_sweeps.config import ConfigError
from zsharp_sweeps.sweep.quiet import optuna_experimental
from zsharp_sweeps.tracking.dburl import check_rdb_url, rdb_dialect

__all__ = ["ALLOWED_STORAGE", "STORAGE_SETTING", "check_storage_url", "open_storage"]

STORAGE_SETTING = "hydra.sweeper.storage"
ALLOWED_STORAGE = (
    "null (multirun/<study_name>/optuna.db), sqlite:///<path>.db in a writable directory, "
    "or postgresql://, mysql://, mssql:// with their Python driver installed"
)


def check_storage_url(url: str) -> None:
    """Raise ``ConfigError`` (one line naming ``hydra.sweeper.storage`` and what is allowed)
    if Optuna could not use ``url``, without creating anything.

    Refused: a URL that is no SQLAlchemy database URL, a database whose Python driver is not
    installed, a SQLite file whose directory cannot be written, a file that is not a SQLite
    database or is damaged, and an empty (0-byte) SQLite file, which would silently start a
    new study in place of the one that was there.
    """
    if rdb_dialect(url) is None:
        raise ConfigError(
            f"{STORAGE_SETTING}={url!r} is invalid: not a database URL; allowed "
            f"{ALLOWED_STORAGE}."
        )
    if rdb_dialect(url) == "sqlite":
        path = _sqlite_file(url)
        if path is not None and path.is_file() and path.stat().st_size == 0:
            raise ConfigError(
                f"{STORAGE_SETTING}={url!r}: {path.absolute()} is empty (0 bytes), so the study "
                "it held is lost and Optuna would silently start a new one. To start fresh, "
                "delete the file or pick another hydra.sweeper.study_name or "
                f"{STORAGE_SETTING}; to continue, restore the file from a copy."
            )
    check_rdb_url(url, STORAGE_SETTING, ALLOWED_STORAGE, owner="optuna")


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for an in-memory database."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(url).database
    except ArgumentError:
        return None  # check_rdb_url reports it
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def open_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int = 30,
                 max_retry: int = 3) -> optuna.storages.RDBStorage:
    """The study's RDB storage. With ``heartbeat_interval`` (a sweep's workers), Optuna's
    heartbeat: a dead worker's trial is noticed by every other worker (after
    ``grace_period`` s) and retried (up to ``max_retry``); without it, a reader's handle."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval is not None:
        heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period,
                     "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(
                         max_retry=max_retry)}
    with optuna_experimental():  # heartbeats
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
