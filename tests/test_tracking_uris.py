"""check_tracking_uri: every store MLflow could not use is refused with one line, quickly,
before anything is created; experiments the tracker makes open on the MLflow UI's runs table."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from zsharp_sweeps.config import ConfigError, TrackingConfig
from zsharp_sweeps.tracking import (
    EXPERIMENT_TAGS,
    HTTP_PROBE_TIMEOUT_S,
    Tracker,
    check_tracking_uri,
)

# A directory that even root cannot write (sysfs refuses new files); Linux only.
READ_ONLY_DIR = Path("/sys")


def _refusal(uri: str, setting: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        check_tracking_uri(uri, setting)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_scheme_names_the_setting_and_what_is_allowed() -> None:
    message = _refusal("notascheme://foo")
    assert message.startswith("tracking.uri='notascheme://foo' is invalid: unknown scheme")
    assert "sqlite:///" in message and "http(s)://" in message


def test_the_environment_variable_is_named_when_the_uri_comes_from_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "notascheme://foo")
    assert _refusal("notascheme://foo").startswith("MLFLOW_TRACKING_URI='notascheme://foo'")


@pytest.mark.parametrize(("uri", "driver", "package"), [
    ("mysql://host/db", "MySQLdb", "mysqlclient"),
    ("mssql://host/db", "pyodbc", "pyodbc"),
])
def test_database_without_its_driver(uri: str, driver: str, package: str) -> None:
    message = _refusal(uri)
    assert f"needs the Python database driver '{driver}'" in message
    assert f"pip install {package}" in message


def test_password_stays_out_of_the_message() -> None:
    message = _refusal("mysql://user:hunter2@host/db")
    assert "hunter2" not in message and "***" in message


def test_http_server_that_does_not_answer_is_refused_within_the_probe_timeout() -> None:
    started = time.monotonic()
    message = _refusal("http://127.0.0.1:9")
    assert time.monotonic() - started < HTTP_PROBE_TIMEOUT_S + 1
    assert "does not answer" in message and "mlflow server" in message


def test_sqlite_in_a_read_only_directory(tmp_path: Path) -> None:
    message = _refusal(f"sqlite:///{READ_ONLY_DIR}/mlruns/mlflow.db")
    assert f"{READ_ONLY_DIR}/mlruns cannot be created: {READ_ONLY_DIR} is not writable" in message


def test_sqlite_where_a_file_stands_in_for_the_directory(tmp_path: Path) -> None:
    (tmp_path / "mlruns").write_text("not a directory")
    message = _refusal(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert f"{tmp_path}/mlruns is not a directory" in message
    assert (tmp_path / "mlruns").read_text() == "not a directory"


def test_sqlite_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").write_bytes(b"this is not sqlite" * 20)
    assert "(file is not a database)" in _refusal(f"sqlite:///{tmp_path}/mlflow.db")


def test_file_store_is_refused_unless_mlflow_allows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert "MLFLOW_ALLOW_FILE_STORE=true" in _refusal(str(tmp_path / "mlruns"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking_uri(str(tmp_path / "mlruns"))


@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/new/dir/mlflow.db", "sqlite:///:memory:",
                                 "databricks"])
def test_usable_uris_pass_and_create_nothing(uri: str, tmp_path: Path) -> None:
    check_tracking_uri(uri.format(tmp=tmp_path))
    assert os.listdir(tmp_path) == []


def test_tracker_refuses_a_bad_store_before_touching_anything(tmp_path: Path) -> None:
    (tmp_path / "mlruns").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db"))
    assert sorted(os.listdir(tmp_path)) == ["mlruns"]


def test_experiments_the_tracker_creates_open_on_the_runs_table(
    mlflow_uri: str, experiment_name: str
) -> None:
    assert EXPERIMENT_TAGS == {"mlflow.experimentKind": "custom_model_development"}
    tracker = Tracker(TrackingConfig(uri=mlflow_uri, experiment=experiment_name))
    exp = MlflowClient(mlflow_uri).get_experiment(tracker.experiment_id)
    assert exp.name == experiment_name
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_experiment_made_elsewhere_gets_the_tag_on_first_use(
    mlflow_uri: str, experiment_name: str
) -> None:
    client = MlflowClient(mlflow_uri)
    exp_id = client.create_experiment(experiment_name)
    assert "mlflow.experimentKind" not in client.get_experiment(exp_id).tags
    assert Tracker(TrackingConfig(uri=mlflow_uri, experiment=experiment_name)).experiment_id == exp_id
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_every_key_the_tracker_writes_is_made_a_valid_mlflow_name(
    mlflow_uri: str, experiment_name: str
) -> None:
    """Params, metrics and tags all go through ``override_param_key``: MLflow refuses
    ``+``, ``@`` or ``?`` in a name, so without it each of these calls would raise."""
    tracker = Tracker(TrackingConfig(uri=mlflow_uri, experiment=experiment_name))
    with tracker.run(run_name="keys"):
        tracker.log_params({"+sweep": "grid"})
        tracker.log_metrics({"loss@1": 0.5}, step=1)
        tracker.set_tags({"who?": "me"})
    data = MlflowClient(mlflow_uri).get_run(tracker.run_id).data
    assert data.params == {"sweep": "grid"}
    assert data.metrics == {"loss_1": 0.5}
    assert data.tags["who_"] == "me"
