"""SQLite stores shared by several processes: the first-touch lock, and "database is locked".

Why: MLflow and Optuna create their SQLite schemas (and run migrations) on first use. Two
sweep workers that start together against a new ``mlflow.db`` or ``optuna.db`` race on it
("Online migration expected to match one row ..."). A lock file beside the database
(``<db>.lock``, held with ``filelock``, which also works where ``fcntl`` does not) serialises
that first touch; servers (PostgreSQL, MySQL, HTTP) need none. Afterwards SQLite still takes
one writer at a time, and a writer that waits too long gets SQLITE_BUSY ("database is
locked"): :func:`is_database_locked` recognises exactly that error, however MLflow or
SQLAlchemy wrapped it, so callers can retry it and nothing else.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from zsharp_sweeps.tracking.uris import sqlite_path

__all__ = ["is_database_locked", "sqlite_init_lock", "sqlite_initialised"]

# SQLITE_BUSY and SQLITE_LOCKED (sqlite3 exposes the names from Python 3.11 on).
_BUSY_CODES = (5, 6)
_BUSY_MESSAGES = ("database is locked", "database table is locked")


@contextlib.contextmanager
def sqlite_init_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<db>.lock`` while a SQLite store is opened/created.

    A no-op for any other store. Threads of one process exclude each other too (each call
    opens its own lock). A store whose schema exists is opened without the lock (opening it
    in parallel is safe; serialising it made N sweep workers start one after another, ~5 s
    each on a GPU host, where a first MLflow client spends that long importing and
    checking), but only once nobody holds the lock: the creator holds it through all of
    MLflow's (or Optuna's) migrations, and ``alembic_version`` has a row after the first of
    them, so "has a schema" alone let a second process into a half-migrated store
    (``duplicate column name: outputs``, ``CircularDependencyError``).
    """
    path = sqlite_path(url)
    if path is None:
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    if sqlite_initialised(path) and _creation_finished(lock_path):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    lock.acquire()
    if sqlite_initialised(path):  # made by the holder we waited for: open it unlocked
        lock.release()
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _creation_finished(lock_path: Path) -> bool:
    """Nobody holds ``lock_path`` (waits while someone does). Never creates the lock file:
    without one, no process of ours ever created or migrated this store."""
    if not lock_path.exists():
        return True
    with FileLock(str(lock_path)):  # held by a creator: wait until its migrations are done
        return True


def sqlite_initialised(path: Path) -> bool:
    """Whether the SQLite file at ``path`` already holds a migrated schema (MLflow and Optuna
    both record theirs in ``alembic_version``)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        # as_uri() escapes what a raw "file:" URI would misread ("?", "#", "%" in a path).
        with contextlib.closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro",
                                                uri=True, timeout=5)) as db:
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return False
    return row is not None


def _is_sqlite_busy(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return code & 0xFF in _BUSY_CODES  # extended codes keep the primary code in the low byte
    return str(exc).startswith(_BUSY_MESSAGES)


def is_database_locked(exc: BaseException) -> bool:
    """True if ``exc`` is SQLite's "database is locked" (SQLITE_BUSY/SQLITE_LOCKED).

    Looks through the wrappers it arrives in: ``sqlalchemy.exc.OperationalError`` (its
    ``orig``) and MLflow's ``MlflowException`` (raised ``from`` the SQLAlchemy error), by
    following ``orig``, ``__cause__`` and ``__context__``. Any other error, whatever its
    message says, is not a lock.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if _is_sqlite_busy(current):
            return True
        orig = getattr(current, "orig", None)
        todo += [orig if isinstance(orig, BaseException) else None, current.__cause__,
                 current.__context__]
    return False
