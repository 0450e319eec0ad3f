"""Everything MLflow: where the store is, one run per training, nothing left RUNNING.

Why a thin wrapper rather than calling ``mlflow`` everywhere: the store location rule
(``$MLFLOW_TRACKING_URI`` wins, else an SQLite database under ``./mlruns``), the run
lifecycle (FAILED on an exception, KILLED on Ctrl-C) and the flattening of the config into
dotted params are decisions, and they live in one place. With ``tracking.enabled=false``
every call is a no-op, so the fit loop never branches on tracking.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from zsharp_sweeps.config import ConfigError, TrackingConfig
from zsharp_sweeps.tracking.locks import is_database_locked, sqlite_init_lock
from zsharp_sweeps.tracking.uris import sqlite_path, sqlite_url

log = logging.getLogger(__name__)

DEFAULT_STORE_DIR = "mlruns"
#: Tags every experiment gets. MLflow 3's UI opens an experiment without a kind on its
#: (empty) GenAI traces page; this kind opens it on the runs table.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def default_tracking_uri(base_dir: str | os.PathLike | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set (MLflow's own convention), else SQLite under mlruns/."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return sqlite_url(Path(base_dir or os.getcwd()) / DEFAULT_STORE_DIR / "mlflow.db")


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or default_tracking_uri()


def tracking_uri_setting(cfg: TrackingConfig) -> str:
    """Where ``resolve_tracking_uri(cfg)`` comes from, as an error message names it."""
    if cfg.uri:
        return "tracking.uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "MLFLOW_TRACKING_URI"
    return "tracking.uri (unset: the default)"


#: What ``MLFLOW_TRACKING_URI`` / ``tracking.uri`` may be (said in every refusal).
ALLOWED_TRACKING_URIS = (
    "sqlite:///<path>.db (a writable directory), postgresql://, mysql:// or mssql:// with "
    "their Python driver installed, http(s)://<host>:<port> of a running MLflow server, "
    "databricks (unset, it is sqlite:///<cwd>/mlruns/mlflow.db)"
)
#: Seconds to wait for an HTTP tracking server before refusing it (MLflow itself retries
#: for minutes before its first error).
HTTP_PROBE_TIMEOUT_S = 3.0
_NO_PROBE_SCHEMES = ("databricks", "databricks-uc", "uc")


def _uri_setting(uri: str) -> str:
    """Which setting a URI came from, for the error message."""
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") == uri else "tracking.uri"


def check_tracking_uri(uri: str, setting: str | None = None) -> None:
    """Refuse a tracking URI MLflow could not use, before anything is created.

    Raises ``ConfigError`` with one line naming ``setting`` (by default
    ``MLFLOW_TRACKING_URI`` when the URI is that variable's value, else ``tracking.uri``)
    and what is allowed, for: an unknown scheme, a database URL whose Python driver is not
    installed, a SQLite file in a directory that cannot be written (or a damaged database),
    an HTTP server that does not answer within ``HTTP_PROBE_TIMEOUT_S`` seconds, and the
    file store (``./mlruns`` paths), which MLflow 3 refuses unless
    ``MLFLOW_ALLOW_FILE_STORE=true``. Single runs call it when their ``Tracker`` is built;
    the sweeper calls it before it creates its study.
    """
    from urllib.parse import urlparse

    from zsharp_sweeps.tracking.dburl import check_rdb_url, directory_problem, rdb_dialect

    setting = setting or _uri_setting(uri)
    scheme = urlparse(uri).scheme.lower() if "://" in uri or uri.startswith("file:") else ""
    if uri in _NO_PROBE_SCHEMES or scheme in _NO_PROBE_SCHEMES:
        return  # credentials live in the profile; MLflow reports its own errors there
    if rdb_dialect(uri) is not None:
        # Header and schema only: this runs for every run, and a store grows large.
        check_rdb_url(uri, setting, ALLOWED_TRACKING_URIS, thorough=False, owner="mlflow")
    elif scheme in ("http", "https"):
        _probe_http(uri, setting)
    elif scheme in ("", "file"):
        allow = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true", "yes")
        if not allow:
            raise ConfigError(
                f"{setting}={uri!r} is a file store, which MLflow 3 refuses (maintenance mode): "
                f"allowed {ALLOWED_TRACKING_URIS} (or set MLFLOW_ALLOW_FILE_STORE=true)."
            )
        path = Path(urlparse(uri).path if scheme == "file" else uri)
        problem = directory_problem(path)
        if problem is not None:
            raise ConfigError(
                f"{setting}={uri!r} is unusable: {problem}. Allowed: {ALLOWED_TRACKING_URIS}."
            )
    else:
        raise ConfigError(
            f"{setting}={uri!r} is invalid: unknown scheme {scheme + '://'!r}; allowed "
            f"{ALLOWED_TRACKING_URIS}."
        )


#: The MLflow REST call the probe makes: cheap, read-only, answered by every MLflow >= 2 server.
HTTP_PROBE_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"


def _probe_http(uri: str, setting: str) -> None:
    """``uri`` must answer an MLflow REST call within ``HTTP_PROBE_TIMEOUT_S`` seconds: JSON
    from ``GET /api/2.0/mlflow/experiments/search``, an MLflow error (JSON with an
    ``error_code``) or 401/403 (a server behind a login; MLflow then reports its own error).
    Refused: no answer, a refused connection, an unknown host, and a server that answers but
    is not MLflow's (a 404 page, HTML), which MLflow would only discover after a traceback."""
    import json
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + HTTP_PROBE_PATH
    try:
        with urllib.request.urlopen(url, timeout=HTTP_PROBE_TIMEOUT_S) as response:
            status, body = response.status, response.read(1 << 16)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(1 << 16) if exc.fp is not None else b""
        if status in (401, 403):
            return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"{setting}={uri!r} does not answer ({reason}; waited at most "
            f"{HTTP_PROBE_TIMEOUT_S:g} s for {url}): start the MLflow server (mlflow server "
            f"--host ... --port ...) or allowed {ALLOWED_TRACKING_URIS}."
        ) from None
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and (status == 200 or "error_code" in answer):
        return
    raise ConfigError(
        f"{setting}={uri!r} answers, but not as an MLflow tracking server (HTTP {status} "
        f"{'JSON' if answer is not None else 'non-JSON'} for GET {url}): point it at an "
        f"MLflow server (mlflow server --host ... --port ...) or allowed {ALLOWED_TRACKING_URIS}."
    )


def _artifact_root_for(uri: str) -> str | None:
    """Artifacts beside a local SQLite database (``mlruns/artifacts``); servers choose their own."""
    db = sqlite_path(uri)
    return None if db is None else (db.parent / "artifacts").resolve().as_uri()


def override_param_key(override_key: str) -> str:
    """Any key as an MLflow param/metric/tag name: ``+sweep`` -> ``sweep``; MLflow allows
    only alphanumerics, ``_-. :/`` in names. Every key the Tracker writes goes through it."""
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


class TrackingReadError(RuntimeError):
    """The MLflow store could not answer a read (a run that is gone, a store that is not
    MLflow's): readers above this floor handle it without importing MLflow."""


@contextlib.contextmanager
def _read_errors() -> Iterator[None]:
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise TrackingReadError(str(exc)) from exc


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
            # One clear line instead of MLflow's traceback, before anything is created.
            check_tracking_uri(self.uri, tracking_uri_setting(cfg))
            mlflow.set_tracking_uri(self.uri)
            with sqlite_init_lock(self.uri):  # first use creates/migrates the schema
                self._client = MlflowClient(self.uri)
                self.experiment_id = _retry(self._get_or_create_experiment, cfg.experiment)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def _get_or_create_experiment(self, name: str) -> str:
        """The experiment's id; created with (or given, if made elsewhere) the kind tag."""
        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self._client.create_experiment(
                    name, artifact_location=_artifact_root_for(self.uri),
                    tags=EXPERIMENT_TAGS,
                )
            except Exception:  # another process created it first
                exp = self._client.get_experiment_by_name(name)
                if exp is None:
                    raise
        for key, value in EXPERIMENT_TAGS.items():
            if exp.tags.get(key) is None:
                self._client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

    @contextlib.contextmanager
    def run(
        self,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        resume_run_id: str | None = None,
    ) -> Iterator[Tracker]:
        """Open a run; it ends FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM.

        The tag ``run_state`` says COMPLETE, FAILED, KILLED or, for an exception class that
        defines ``run_state``/``mlflow_status`` (a pruned trial), PRUNED with status KILLED.
        SIGTERM reaches here as ``zsharp_sweeps.training.signals.Terminated`` (a KeyboardInterrupt)
        inside ``graceful_stop()``; the tag ``killed_by`` names the signal. What was logged before stays (every log call is written through at once). The exception is
        re-raised.
        """
        if not self.enabled:
            yield self
            return
        all_tags = dict(tags or {})
        all_tags.update(self.cfg.tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        # A resumed training (zsharp_sweeps.training.checkpoint) continues in the run it started in;
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
        except KeyboardInterrupt as exc:
            status, state = "KILLED", "KILLED"
            with contextlib.suppress(BaseException):
                self.set_tags({"killed_by": str(exc) or "KeyboardInterrupt"})
            raise
        except BaseException as exc:
            status = getattr(exc, "mlflow_status", "FAILED")
            state = getattr(exc, "run_state", "FAILED")
            with contextlib.suppress(Exception):
                self.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
            raise
        finally:
            self._end_run(status, state)

    def _end_run(self, status: str, state: str) -> None:
        """Record the end state even if a second signal interrupts the first attempt."""
        for _ in range(3):
            try:
                with contextlib.suppress(Exception):
                    self.set_tags({"run_state": state})
                _retry(self._client.set_terminated, self.run_id, status=status)
                return
            except KeyboardInterrupt:  # another Ctrl-C/SIGTERM while ending: try again
                continue

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

    # A sweep's parent run spans the whole sweep (and its resumes), not one ``with`` block.
    def start(self, run_name: str, tags: Mapping[str, str]) -> str:
        """Create a run that ``end`` closes; returns its id. ``tracking.parent_run_id``
        nests it (a verdict's stage sweeps under the verdict's run)."""
        all_tags = {**tags, **self.cfg.tags}
        if self.cfg.parent_run_id:
            all_tags["mlflow.parentRunId"] = self.cfg.parent_run_id
        run = _retry(self._client.create_run, self.experiment_id, run_name=run_name,
                     tags=all_tags)
        self.run_id = run.info.run_id
        return self.run_id

    def reopen(self, run_id: str) -> bool:
        """Continue the existing run ``run_id`` (set RUNNING again); False if it is gone."""
        return self._reopen(run_id, {}) is not None

    def _running(self, tags: Mapping[str, str]) -> list[Any]:
        """This experiment's runs that carry ``tags`` and still say RUNNING."""
        terms = [f"tags.{override_param_key(k)} = '{v}'" for k, v in tags.items()]
        terms.append("attributes.status = 'RUNNING'")
        return _retry(self._client.search_runs, [self.experiment_id],
                      filter_string=" and ".join(terms))

    def oldest_running(self, tags: Mapping[str, str]) -> str | None:
        """The first created RUNNING run with ``tags`` (ties: the smallest id): which of the
        parent runs that hosts started together create for one new study all of them keep."""
        if not self.enabled:
            return None
        runs = self._running(tags)
        if not runs:
            return None
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id

    def end_running_runs(self, tags: Mapping[str, str]) -> list[str]:
        """End KILLED the runs with ``tags`` that still say RUNNING: their process died (a
        SIGKILLed sweep worker, a lost host) before it could end them. Returns their ids."""
        if not self.enabled:
            return []
        ended = []
        for run in self._running(tags):
            run_id = run.info.run_id
            _retry(self._client.set_tag, run_id, "run_state", "KILLED")
            _retry(self._client.set_terminated, run_id, status="KILLED")
            log.warning(f"MLflow run {run_id} ({', '.join(f'{k}={v}' for k, v in tags.items())})"
                        " was left RUNNING by a process that died: ended KILLED")
            ended.append(run_id)
        return ended

    def child_runs(self, parent_run_id: str) -> list[Any]:
        """Every run whose MLflow parent is ``parent_run_id``, in any experiment's store
        (all result pages). ``TrackingReadError`` if the store cannot answer."""
        if not self.enabled:
            return []
        with _read_errors():
            experiment_id = _retry(self._client.get_run, parent_run_id).info.experiment_id
            runs, token = [], None
            while True:
                page = _retry(self._client.search_runs, [experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=1000, page_token=token)
                runs += list(page)
                token = page.token
                if not token:
                    return runs

    def metric_history(self, run_id: str, key: str) -> list[Any]:
        """Every logged value of metric ``key`` of run ``run_id`` (MLflow ``Metric``s)."""
        if not self.enabled:
            return []
        with _read_errors():
            return list(_retry(self._client.get_metric_history, run_id, key))

    def discard(self, run_id: str) -> None:
        """Delete a run that should not have been made (a duplicate sweep parent run)."""
        _retry(self._client.delete_run, run_id)
        if self.run_id == run_id:
            self.run_id = None

    def end(self, status: str) -> None:
        """Close the run opened by ``start``/``reopen`` with MLflow ``status``."""
        state = {"FINISHED": "COMPLETE"}.get(status, status)
        self._end_run(status, state)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(override_param_key(k), str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            _retry(self._client.log_batch, self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(override_param_key(k), float(v), now, step) for k, v in metrics.items()]
        _retry(self._client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        items = [RunTag(override_param_key(k), str(v)) for k, v in tags.items()]
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

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """``rows`` as an MLflow table artifact (``MlflowClient.log_table``: the UI shows it
        as a table, ``mlflow.load_table`` reads it back)."""
        if self.enabled and rows:
            import pandas as pd

            _retry(self._client.log_table, self.run_id, pd.DataFrame(list(rows)), artifact_file)

    def publish_view(self, view: Any) -> str | None:
        """Write ``view`` (a ``tracking.view.SweepView``) as a saved view of this run's
        experiment and tag this run with its key (``tracking.view.VIEW_KEY_TAG``); returns
        the link to it (``tracking.view.view_url``), None when tracking is off."""
        if not self.enabled:
            return None
        from zsharp_sweeps.tracking import view as views

        key = _retry(views.publish, self._client, self.experiment_id, view)
        self.set_tags({views.VIEW_KEY_TAG: key})
        return views.view_url(views.ui_base_url(self.uri), self.experiment_id, key)
