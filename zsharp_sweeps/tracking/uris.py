"""SQLite store URLs (``sqlite:///path``) for MLflow and Optuna: the one parser.

Why one: the MLflow store, the Optuna storage, the first-touch lock and the report all need
"which file is this database, and is it absolute?". Four hand-written prefix checks used to
disagree on the details (a ``+pysqlite`` driver, a ``?timeout=`` query, ``:memory:``); these
helpers follow SQLAlchemy's URL form, which both MLflow and Optuna hand their URL to:

- ``sqlite:///relative/path.db`` (three slashes): relative to the current directory;
- ``sqlite:////abs/path.db`` (four slashes): absolute;
- ``sqlite://`` or ``sqlite:///:memory:``: an in-memory database, no file;
- an optional driver (``sqlite+pysqlite:///...``) and query (``...?timeout=30``).

Pure string handling: no SQLAlchemy import, nothing touched on disk.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SQLITE_PREFIX = "sqlite:///"

# scheme (sqlite or sqlite+driver), then "://", then an optional "/" + database, then a query.
_SQLITE_URL = re.compile(r"^(?P<scheme>sqlite(?:\+\w+)?)://(?:/(?P<database>[^?]*))?(?P<query>\?.*)?$")


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, as written (relative stays relative).

    None for any other store (PostgreSQL, MySQL, an MLflow server, a file path that is not a
    URL) and for in-memory SQLite databases, which have no file.
    """
    match = _SQLITE_URL.match(url)
    if match is None:
        return None
    database = match.group("database")
    if not database or database == ":memory:":
        return None
    return Path(database)


def absolute_sqlite_url(url: str) -> str:
    """``url`` with a relative SQLite path made absolute against the current directory.

    Why: sweep trials run in other processes and other working directories (Hydra's
    ``hydra.job.chdir``); a relative ``sqlite:///optuna.db`` would then name another file.
    Driver and query are kept; any other URL is returned unchanged.
    """
    path = sqlite_path(url)
    if path is None or path.is_absolute():
        return url
    match = _SQLITE_URL.match(url)
    assert match is not None  # sqlite_path matched it
    return f"{match.group('scheme')}:///{path.resolve()}{match.group('query') or ''}"


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """The absolute ``sqlite:///`` URL of a database file."""
    return f"{SQLITE_PREFIX}{Path(path).resolve()}"
