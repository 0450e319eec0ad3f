"""Cross-process locks for the first touch of a local SQLite store.

Why: MLflow and Optuna create their SQLite schemas (and run migrations) on first use. Two
sweep workers that start together against a new ``mlflow.db`` or ``optuna.db`` race on it
("Online migration expected to match one row ..."). An advisory lock on a file beside the
database serialises that first touch; servers (PostgreSQL, MySQL, HTTP) need none.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

SQLITE_PREFIX = "sqlite:///"


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL, or None for any other store."""
    if url.startswith(SQLITE_PREFIX):
        return Path(url[len(SQLITE_PREFIX):])
    return None


@contextlib.contextmanager
def sqlite_init_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<db>.lock`` while a SQLite store is opened/created."""
    path = sqlite_path(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
