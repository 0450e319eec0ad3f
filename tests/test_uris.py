"""SQLite store URLs: the one parser (zsharp_sweeps.uris) and the first-touch lock beside it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from zsharp_sweeps.locks import sqlite_init_lock
from zsharp_sweeps.uris import absolute_sqlite_url, sqlite_path, sqlite_url


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


def test_init_lock_is_a_no_op_for_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with sqlite_init_lock("postgresql://db/optuna"):
        pass
    assert list(tmp_path.iterdir()) == []
