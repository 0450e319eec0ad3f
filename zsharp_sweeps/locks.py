"""Cross-process locks for the first touch of a local SQLite store.

Why: MLflow and Optuna create their SQLite schemas (and run migrations) on first use. Two
sweep workers that start together against a new ``mlflow.db`` or ``optuna.db`` race on it
("Online migration expected to match one row ..."). A lock file beside the database
(``<db>.lock``, held with ``filelock``, which also works where ``fcntl`` does not) serialises
that first touch; servers (PostgreSQL, MySQL, HTTP) need none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from filelock import FileLock

from zsharp_sweeps.uris import sqlite_path

__all__ = ["sqlite_init_lock", "sqlite_path"]


@contextlib.contextmanager
def sqlite_init_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<db>.lock`` while a SQLite store is opened/created.

    A no-op for any other store. Threads of one process exclude each other too (each call
    opens its own lock), which the one-process stream launcher relies on.
    """
    path = sqlite_path(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(path.name + ".lock"))):
        yield
