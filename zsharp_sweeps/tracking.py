"""Everything MLflow: where the store is, one run per training, nothing left RUNNING.

Why a thin wrapper rather than calling ``mlflow`` everywhere: the store location rule
(``$MLFLOW_TRACKING_URI`` wins, else an SQLite database under ``./mlruns``), the run
lifecycle (FAILED on an exception, KILLED on Ctrl-C) and the flattening of the config into
dotted params are decisions, and they live in one place. With ``tracking.enabled=false``
every call is a no-op, so the fit loop never branches on tracking.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from zsharp_sweeps.config import TrackingConfig
from zsharp_sweeps.locks import is_database_locked, sqlite_init_lock
from zsharp_sweeps.uris import sqlite_path, sqlite_url

DEFAULT_STORE_DIR = "mlruns"


def default_tracking_uri(base_dir: str | os.PathLike | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set (MLflow's own convention), else SQLite under mlruns/."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return sqlite_url(Path(base_dir or os.getcwd()) / DEFAULT_STORE_DIR / "mlflow.db")


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or default_tracking_uri()


def _artifact_root_for(uri: str) -> str | None:
    """Artifacts beside a local SQLite database (``mlruns/artifacts``); servers choose their own."""
    db = sqlite_path(uri)
    return None if db is None else (db.parent / "artifacts").resolve().as_uri()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys (``optimizer.rho``), lists kept as their string form."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def override_param_key(override_key: str) -> str:
    """A Hydra override key as an MLflow param name: ``+sweep`` -> ``sweep``; MLflow allows
    only alphanumerics, ``_-. :/`` in names."""
    return re.sub(r"[^\w\-. :/]", "_", override_key.lstrip("+~"))


def overrides_as_params(overrides: Sequence[str]) -> dict[str, str]:
    """``["a.b=1", "+sweep=x"]`` -> ``{"a.b": "1", "sweep": "x"}``."""
    pairs = (o.split("=", 1) for o in overrides if "=" in o)
    return {override_param_key(key): value for key, value in pairs}


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The repository's HEAD commit, or None outside a git checkout."""
    here = Path(path or Path(__file__).resolve().parent)
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _retry(fn, *args, attempts: int = 8, **kwargs):
    """SQLite takes one writer at a time: parallel trials can briefly see 'database is locked'
    (retried with back-off); any other error is raised at once."""
    delay = 0.1
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # MlflowException from SQLAlchemy from sqlite3: see locks
            if not is_database_locked(exc) or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


class Tracker:
    """One MLflow run's handle; a disabled tracker accepts every call and records nothing."""

    def __init__(self, cfg: TrackingConfig) -> None:
        self.cfg = cfg
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client = None
        if cfg.enabled:
            import mlflow
            from mlflow.tracking import MlflowClient

            self.uri = resolve_tracking_uri(cfg)
            mlflow.set_tracking_uri(self.uri)
            with sqlite_init_lock(self.uri):  # first use creates/migrates the schema
                self._client = MlflowClient(self.uri)
                self.experiment_id = _retry(self._get_or_create_experiment, cfg.experiment)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def _get_or_create_experiment(self, name: str) -> str:
        exp = self._client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self._client.create_experiment(
                name, artifact_location=_artifact_root_for(self.uri)
            )
        except Exception:  # another process created it first
            exp = self._client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    @contextlib.contextmanager
    def run(
        self,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        resume_run_id: str | None = None,
    ) -> Iterator[Tracker]:
        """Open a run; it ends FINISHED, FAILED on an exception, KILLED on Ctrl-C.

        The tag ``run_state`` says COMPLETE, FAILED, KILLED or, for an exception class that
        defines ``run_state``/``mlflow_status`` (a pruned trial), PRUNED with status KILLED.
        The exception is re-raised.
        """
        if not self.enabled:
            yield self
            return
        all_tags = dict(tags or {})
        all_tags.update(self.cfg.tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        # A resumed training (zsharp_sweeps.checkpoint) continues in the run it started in;
        # if the store no longer has that run, a new one says where it came from.
        run = self._reopen(resume_run_id, all_tags) if resume_run_id else None
        if run is None:
            if resume_run_id:
                all_tags["resumed_from"] = resume_run_id
            run = _retry(
                self._client.create_run, self.experiment_id, run_name=run_name, tags=all_tags
            )
        self.run_id = run.info.run_id
        status, state = "FINISHED", "COMPLETE"
        try:
            yield self
        except KeyboardInterrupt:
            status, state = "KILLED", "KILLED"
            raise
        except BaseException as exc:
            status = getattr(exc, "mlflow_status", "FAILED")
            state = getattr(exc, "run_state", "FAILED")
            with contextlib.suppress(Exception):
                self.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
            raise
        finally:
            with contextlib.suppress(Exception):
                self.set_tags({"run_state": state})
            _retry(self._client.set_terminated, self.run_id, status=status)

    def _reopen(self, run_id: str, tags: Mapping[str, str]):
        """The existing, not deleted run ``run_id``, set RUNNING again with ``tags`` added;
        None if this store does not have it."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException:
            return None
        if run.info.lifecycle_stage != "active":
            return None
        _retry(self._client.update_run, run_id, status="RUNNING")
        self.run_id = run_id
        self.set_tags(tags)
        return run

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            _retry(self._client.log_batch, self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        _retry(self._client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        _retry(self._client.log_batch, self.run_id, tags=items)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            _retry(self._client.log_text, self.run_id, text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.enabled:
            _retry(self._client.log_figure, self.run_id, figure, artifact_file)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled:
            _retry(self._client.log_artifact, self.run_id, str(path), artifact_path)
