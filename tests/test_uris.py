"""SQLite stores: the one URL parser (zsharp_sweeps.tracking.uris), the first-touch lock and the
"database is locked" check (zsharp_sweeps.tracking.locks) that the MLflow retry relies on."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from zsharp_sweeps.tracking import _retry
from zsharp_sweeps.tracking.locks import is_database_locked, sqlite_init_lock, sqlite_initialised
from zsharp_sweeps.tracking.uris import absolute_sqlite_url, sqlite_path, sqlite_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///mlruns/mlflow.db", Path("mlruns/mlflow.db")),
        ("sqlite:////abs/dir/optuna.db", Path("/abs/dir/optuna.db")),
        ("sqlite+pysqlite:////abs/optuna.db", Path("/abs/optuna.db")),
        ("sqlite:///optuna.db?timeout=30", Path("optuna.db")),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("postgresql+psycopg://user@db:5432/optuna", None),
        ("http://127.0.0.1:5000", None),
        ("mlruns/mlflow.db", None),
    ],
)
def test_sqlite_path(url: str, expected: Path | None) -> None:
    assert sqlite_path(url) == expected


def test_absolute_sqlite_url_resolves_relative_paths_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    assert absolute_sqlite_url("sqlite:///optuna.db") == f"sqlite:///{here}/optuna.db"
    assert absolute_sqlite_url("sqlite+pysqlite:///a/b.db?timeout=5") == (
        f"sqlite+pysqlite:///{here}/a/b.db?timeout=5"
    )
    for unchanged in ("sqlite:////abs/optuna.db", "sqlite://", "postgresql://db/optuna"):
        assert absolute_sqlite_url(unchanged) == unchanged
    # The absolute form parses back to the same file.
    assert sqlite_path(absolute_sqlite_url("sqlite:///x.db")) == here / "x.db"


def test_sqlite_url_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert sqlite_url("mlruns/mlflow.db") == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert sqlite_path(sqlite_url("a.db")) == tmp_path.resolve() / "a.db"


def test_init_lock_serialises_threads_and_creates_the_parent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/new/dir/optuna.db"
    inside: list[int] = []
    overlaps: list[int] = []

    def hold(i: int) -> None:
        with sqlite_init_lock(url):
            inside.append(i)
            overlaps.append(len(inside))
            time.sleep(0.05)
            inside.remove(i)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1]  # never two holders at once
    assert (tmp_path / "new" / "dir" / "optuna.db.lock").exists()
    assert not (tmp_path / "new" / "dir" / "optuna.db").exists()  # the lock creates no store


def test_init_lock_waits_while_another_process_migrates_a_store(tmp_path: Path) -> None:
    """Two sweeps started together on a new MLflow store: the first holds the lock through
    all of MLflow's migrations, but alembic_version has a row after the first of them. The
    second used to see "initialised" there, open the half-migrated store unlocked and run
    the same migrations at once (``duplicate column name: outputs``); it must wait."""
    from filelock import FileLock

    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:  # one migration in
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.execute("INSERT INTO alembic_version VALUES ('451aebb31d03')")
    creator = FileLock(str(db.with_name("mlflow.db.lock")))
    creator.acquire()  # the first sweep, mid-migration
    entered = threading.Event()

    def second_sweep() -> None:
        with sqlite_init_lock(f"sqlite:///{db}"):
            entered.set()

    thread = threading.Thread(target=second_sweep, daemon=True)
    thread.start()
    assert not entered.wait(0.5), "opened a store whose migrations were still running"
    creator.release()  # migrations done
    assert entered.wait(5)
    thread.join(5)
    # A finished store that nobody locks is opened at once, and in parallel.
    inside: list[int] = []
    with sqlite_init_lock(f"sqlite:///{db}"):
        inside.append(1)
        with sqlite_init_lock(f"sqlite:///{db}"):
            inside.append(2)
    assert inside == [1, 2]


def test_init_lock_is_a_no_op_for_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with sqlite_init_lock("postgresql://db/optuna"):
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def locked_db(tmp_path: Path) -> Iterator[Path]:
    """A database another connection holds an exclusive write lock on."""
    db = tmp_path / "busy.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    yield db
    holder.execute("ROLLBACK")
    holder.close()


def _locked_errors(db: Path) -> list[BaseException]:
    """The same lock as sqlite3, SQLAlchemy and MLflow (its SQL store's wrapping) raise it."""
    errors: list[BaseException] = []
    conn = sqlite3.connect(db, timeout=0)
    with pytest.raises(sqlite3.OperationalError) as raw:
        conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    errors.append(raw.value)
    engine = sqlalchemy.create_engine(f"sqlite:///{db}", connect_args={"timeout": 0})
    with pytest.raises(sqlalchemy.exc.OperationalError) as wrapped:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text("INSERT INTO t VALUES (1)"))
    engine.dispose()
    errors.append(wrapped.value)
    try:  # what mlflow/store/db/utils.py does with an OperationalError
        raise MlflowException(message=wrapped.value, error_code=TEMPORARILY_UNAVAILABLE) \
            from wrapped.value
    except MlflowException as exc:
        errors.append(exc)
    return errors


def test_a_locked_database_is_recognised_through_its_wrappers(locked_db: Path) -> None:
    errors = _locked_errors(locked_db)
    assert [type(e).__name__ for e in errors] == [
        "OperationalError", "OperationalError", "MlflowException",
    ]
    assert all(is_database_locked(e) for e in errors)


def test_other_errors_are_not_locks(tmp_path: Path) -> None:
    assert not is_database_locked(MlflowException("experiment 'locked' does not exist"))
    assert not is_database_locked(RuntimeError("database is locked"))  # words, not the error
    conn = sqlite3.connect(tmp_path / "x.db")
    with pytest.raises(sqlite3.OperationalError) as missing:
        conn.execute("SELECT * FROM nowhere")
    assert not is_database_locked(missing.value)


def test_retry_retries_a_lock_and_nothing_else(locked_db: Path) -> None:
    lock = _locked_errors(locked_db)[-1]
    calls: list[int] = []

    def locked_twice() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise lock
        return "done"

    assert _retry(locked_twice) == "done"
    assert len(calls) == 3

    def fails() -> None:
        calls.append(1)
        raise MlflowException("RESOURCE_ALREADY_EXISTS: the store says locked")

    calls.clear()
    with pytest.raises(MlflowException, match="RESOURCE_ALREADY_EXISTS"):
        _retry(fails)
    assert len(calls) == 1


@pytest.mark.parametrize("folder", ["plain", "with #hash", "with ?query", "with %25"])
def test_sqlite_initialised_needs_a_migrated_schema(tmp_path: Path, folder: str) -> None:
    db = tmp_path / folder / "store.db"
    db.parent.mkdir()
    assert not sqlite_initialised(db)  # no file
    db.touch()
    assert not sqlite_initialised(db)  # empty file
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num TEXT)")
    assert not sqlite_initialised(db)  # schema table, no version yet
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO alembic_version VALUES ('abc')")
    assert sqlite_initialised(db)


@pytest.mark.long
@pytest.mark.timeout(180)
def test_two_processes_creating_one_mlflow_store_both_succeed(tmp_path: Path) -> None:
    """The real race: the second Tracker starts once the first has run one of MLflow's
    migrations; before the fix it exited 1 with ``duplicate column name`` when its imports
    ended before the first's migrations did (timing: not every run). The deterministic pin
    is ``test_init_lock_waits_while_another_process_migrates_a_store``."""
    import subprocess
    import sys

    db = tmp_path / "mlflow.db"
    code = ("from zsharp_sweeps.config import TrackingConfig; "
            "from zsharp_sweeps.tracking import Tracker; "
            f"Tracker(TrackingConfig(uri='sqlite:///{db}', experiment='e'))")
    first = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not sqlite_initialised(db) and time.monotonic() < deadline:  # a migration in
        time.sleep(0.005)
    second = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    for proc in (first, second):
        _, err = proc.communicate(timeout=150)
        assert proc.returncode == 0, err[-2000:]
