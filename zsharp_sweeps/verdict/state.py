"""The verdict's own state, kept in the same Optuna storage as its stages' studies.

Why there: one storage is all a resume (or another host) needs. A study named after the
verdict holds no trials, only user attributes: the protocol's fingerprint (a resume with
other settings is refused), the MLflow parent run, each arm's chosen configuration, the
device time each stage cost and whether the analysis is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from zsharp_sweeps.sweep.progress import progress
from zsharp_sweeps.sweep.quiet import optuna_experimental
from zsharp_sweeps.tracking.uris import sqlite_path


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The storage, created if new (SQLite: its folder too, first touch under a lock)."""
    from zsharp_sweeps.tracking.locks import sqlite_init_lock

    path = sqlite_path(url)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}
    with sqlite_init_lock(url), optuna_experimental():
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


class VerdictState:
    """Attributes of the verdict's bookkeeping study, and its stages' studies."""

    def __init__(self, storage: optuna.storages.RDBStorage, name: str) -> None:
        self.storage = storage
        self.name = name
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.meta = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                        direction="maximize")

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.user_attrs.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.meta.set_user_attr(key, value)

    def add(self, key: str, amount: float) -> None:
        """Accumulate a number over runs (device seconds, wall seconds)."""
        self.set(key, float(self.get(key, 0.0)) + float(amount))

    def study(self, name: str) -> optuna.Study | None:
        """A stage's study if it exists yet."""
        try:
            return optuna.load_study(study_name=name, storage=self.storage)
        except KeyError:
            return None

    def finished(self, name: str) -> int:
        """Trials of a stage that count toward its size (complete, pruned, failed)."""
        study = self.study(name)
        return 0 if study is None else progress(study).finished

    def done(self, name: str, n_trials: int) -> bool:
        study = self.study(name)
        return study is not None and progress(study).done(n_trials)
