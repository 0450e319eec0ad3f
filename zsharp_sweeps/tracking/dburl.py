"""Checks of database URLs (MLflow's tracking store, Optuna's storage) before first use.

Why: MLflow and Optuna open their store lazily, deep inside the first call that needs it, and
a bad URL then surfaces as a long traceback that never names the setting (a KeyError for an
unknown scheme, ``ModuleNotFoundError: MySQLdb`` for a missing driver, ``unable to open
database file`` for an unwritable directory). These checks run first and raise one
``ConfigError`` line that names the setting, the value and what is allowed. They create
nothing: no directory, no database file, no connection to a server.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from pathlib import Path

from zsharp_sweeps.config import ConfigError

#: SQLAlchemy dialects both MLflow and Optuna accept, and the pip package of the default
#: driver of each (what ``mysql://`` etc. import when no ``+driver`` is named).
RDB_DRIVER_PACKAGES: dict[str, str] = {
    "postgresql": "psycopg2-binary (or write postgresql+psycopg:// and install psycopg)",
    "mysql": "mysqlclient (or write mysql+pymysql:// and install pymysql)",
    "mssql": "pyodbc",
    "sqlite": "",
}


def rdb_dialect(url: str) -> str | None:
    """``postgresql`` for ``postgresql+psycopg://...``; None if the URL is no RDB URL."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    dialect = scheme.split("+", 1)[0].lower()
    return dialect if dialect in RDB_DRIVER_PACKAGES else None


#: The tables that say whose database a file is: ``alembic_version`` is in both (each tool
#: records its own schema version there), these are each tool's own.
OWN_TABLES: dict[str, tuple[str, frozenset[str]]] = {
    "mlflow": ("an MLflow tracking store", frozenset({"experiments", "runs"})),
    "optuna": ("an Optuna study storage", frozenset({"studies", "trials", "version_info"})),
}


def check_rdb_url(url: str, setting: str, allowed: str, *, thorough: bool = True,
                  owner: str | None = None) -> None:
    """The URL parses, its dialect and Python driver import, and a SQLite file is usable.

    ``setting`` names where the URL came from (``MLFLOW_TRACKING_URI``,
    ``hydra.sweeper.storage``); ``allowed`` says what the setting accepts. ``thorough``
    reads a whole existing SQLite file (``PRAGMA quick_check``, finds truncation); without
    it only the header and schema are read, cheap enough to repeat for every run.
    ``owner`` (``mlflow`` or ``optuna``): an existing SQLite file that holds the other
    tool's tables is refused, before either tool writes its own into it.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        dialect_cls = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise ConfigError(
            f"{setting}={url!r} is invalid ({exc}): allowed {allowed}."
        ) from None
    try:
        dialect_cls.import_dbapi()
    except ImportError as exc:
        package = RDB_DRIVER_PACKAGES.get(parsed.get_backend_name(), "")
        hint = f"pip install {package}" if package and "+" not in parsed.drivername else (
            f"install the Python package of the {parsed.get_driver_name()!r} driver"
        )
        raise ConfigError(
            f"{setting}={_redact(url)!r} needs the Python database driver "
            f"{exc.name or parsed.get_driver_name()!r}, which is not installed: {hint}; "
            f"or use another store: allowed {allowed}."
        ) from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            check_sqlite_file(Path(database), setting, url, allowed, thorough=thorough,
                              owner=owner)
    else:
        probe_database_server(url, setting, allowed, owner=owner)


#: Seconds to wait for a database server (PostgreSQL, MySQL, SQL Server) before refusing it.
#: MLflow retries an unreachable server for about two minutes, printing each attempt's error.
RDB_PROBE_TIMEOUT_S = 3.0

#: The connect argument that bounds a driver's connection attempt, in seconds.
_CONNECT_TIMEOUT_ARG = {"psycopg": "connect_timeout", "psycopg2": "connect_timeout",
                        "pg8000": "timeout", "mysqldb": "connect_timeout",
                        "pymysql": "connect_timeout", "mysqlconnector": "connection_timeout",
                        "pyodbc": "timeout"}


def probe_database_server(url: str, setting: str, allowed: str,
                          timeout_s: float = RDB_PROBE_TIMEOUT_S, owner: str | None = None
                          ) -> None:
    """Connect once to the database server of ``url`` (and disconnect), within ``timeout_s``
    seconds, before MLflow or Optuna touch it; refuse one that cannot be reached, refuses the
    login or lacks the database. With ``owner``, also refuse a database that holds the other
    tool's tables (``OWN_TABLES``). Reads the table names, writes nothing."""
    import threading

    from sqlalchemy import create_engine, inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    parsed = make_url(url)
    arg = _CONNECT_TIMEOUT_ARG.get(parsed.get_driver_name())
    connect_args = {arg: max(1, round(timeout_s))} if arg else {}
    outcome: list[BaseException | None] = []
    tables: set[str] = set()

    def connect() -> None:
        try:
            engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
            try:
                with engine.connect() as connection:
                    if owner is not None:
                        tables.update(inspect(connection).get_table_names())
            finally:
                engine.dispose()
            outcome.append(None)
        except Exception as exc:  # any driver's error: reported below
            outcome.append(exc)

    # A thread bounds drivers that ignore their timeout (DNS, a half-open connection).
    thread = threading.Thread(target=connect, name="rdb-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    if outcome and outcome[0] is None:
        for other, (what, names) in OWN_TABLES.items():
            if owner is not None and other != owner and names <= tables:
                raise ConfigError(
                    f"{setting}={_redact(url)!r} is unusable: the database is {what} (tables "
                    f"{', '.join(sorted(names))}), not {OWN_TABLES[owner][0]}; it was left "
                    f"untouched. Allowed: {allowed}."
                )
        return
    if not outcome:
        reason = f"no answer within {timeout_s:g} s"
    else:
        exc = outcome[0]
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        reason = detail[0] if detail else type(exc).__name__
    raise ConfigError(
        f"{setting}={_redact(url)!r}: cannot connect ({reason}; waited at most "
        f"{timeout_s:g} s): start the database server or fix the host, port, user, password "
        f"or database name; allowed {allowed}."
    )


def _redact(url: str) -> str:
    """The URL without its password (it goes into an error message)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (where a mkdir -p would start)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def directory_problem(directory: Path) -> str | None:
    """Why files cannot be created in ``directory`` (made if missing), or None if they can.

    Tried for real (a temporary file in the nearest existing ancestor) rather than with
    ``os.access``: root passes every ``os.access`` check yet cannot write a read-only mount.
    """
    existing = nearest_existing(directory)
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        if existing == directory.absolute():
            return f"the directory {existing} is not writable ({exc.strerror or exc})"
        return (
            f"{directory.absolute()} cannot be created: {existing} is not writable "
            f"({exc.strerror or exc})"
        )
    return None


def check_sqlite_file(
    path: Path, setting: str, url: str, allowed: str, *, thorough: bool = True,
    owner: str | None = None,
) -> None:
    """The database's directory is writable, an existing file is a readable database and,
    with ``owner``, not the other tool's (``OWN_TABLES``)."""
    path = path.expanduser()
    problem = directory_problem(path.parent)
    if problem is None and path.exists():
        if path.is_dir():
            problem = f"{path.absolute()} is a directory, not a database file"
        elif not os.access(path, os.R_OK | os.W_OK):
            problem = f"{path.absolute()} is not readable and writable"
        else:
            problem = sqlite_file_problem(path, thorough=thorough)
            if problem is None and owner is not None:
                problem = foreign_tables_problem(path, owner)
    if problem is not None:
        raise ConfigError(f"{setting}={url!r} is unusable: {problem}. Allowed: {allowed}.")


def sqlite_file_problem(path: Path, *, thorough: bool = True) -> str | None:
    """None if ``path`` is a sound SQLite database (read-only check), else what is wrong.

    ``thorough``: ``PRAGMA quick_check`` reads every page (a truncated file is found);
    otherwise only the schema is read (a file that is no database is found), which costs
    the same for a large store as for a small one.
    """
    query = "PRAGMA quick_check" if thorough else "SELECT COUNT(*) FROM sqlite_master"
    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        ) as conn:
            result = conn.execute(query).fetchone()
    except sqlite3.DatabaseError as exc:
        return f"{path.absolute()} is not a usable SQLite database ({exc})"
    if thorough and (result is None or result[0] != "ok"):
        return f"{path.absolute()} is a damaged SQLite database (quick_check: {result})"
    return None


def sqlite_tables(path: Path) -> set[str]:
    """The tables of the SQLite database at ``path`` (opened read-only)."""
    with contextlib.closing(
        sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    ) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def foreign_tables_problem(path: Path, owner: str) -> str | None:
    """Why the database at ``path`` is not ``owner``'s to write: it holds the tables of the
    other tool (MLflow's ``experiments`` and ``runs``, Optuna's ``studies``, ``trials`` and
    ``version_info``). Both keep their schema version in ``alembic_version``, so the second
    tool to open such a file would write its tables beside the first's and then fail on a
    version it does not know."""
    own = OWN_TABLES[owner][0]
    try:
        tables = sqlite_tables(path)
    except sqlite3.Error as exc:
        return f"{path.absolute()} is not a usable SQLite database ({exc})"
    for other, (what, names) in OWN_TABLES.items():
        if other != owner and names <= tables:
            return (f"{path.absolute()} is {what} (tables {', '.join(sorted(names))}), not "
                    f"{own}; it was left untouched")
    return None
