"""What a new user meets first, through the real entry point: every bad input is one line on
stderr naming the setting (exit status 2) and leaves nothing behind; output is quiet; the
Optuna storage is checked before a sweep touches it.

Most entry-point tests call ``zsharp_sweeps.train.main`` in-process with ``sys.argv`` set
(the same Hydra parsing, composition and error paths, without a new interpreter's start-up);
the slow ones start ``python -m zsharp_sweeps.train`` to pin what a shell sees.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from zsharp_sweeps.config import ConfigError
from zsharp_sweeps.data import sources
from zsharp_sweeps.sweep.storage import check_storage_url
from zsharp_sweeps.tracking import HTTP_PROBE_TIMEOUT_S

from .cli_helpers import run_main
from .conftest import REPO
from .data_fixtures import _idx_bytes, write_mnist

SMALL_RUN = ["data=digits", "model=mlp", "model.params.hidden=16", "hardware=cpu",
             "trainer.epochs=1", "trainer.progress=false", "sharpness=none"]


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ---- tracking store ------------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "expected"), [
    ("notascheme://foo", "is invalid: unknown scheme 'notascheme://'"),
    ("mysql://host/db", "needs the Python database driver 'MySQLdb'"),
    ("mssql://host/db", "needs the Python database driver 'pyodbc'"),
    ("http://127.0.0.1:9", "does not answer"),
])
def test_bad_tracking_uri_is_one_line_and_creates_nothing(
    uri: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = _refused_tracking_uri(uri, tmp_path, monkeypatch, capsys)
    assert line.startswith(f"error: MLFLOW_TRACKING_URI='{uri}'")
    assert expected in line and "allowed" in line.lower()


def _refused_tracking_uri(uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> str:
    """A small run with ``MLFLOW_TRACKING_URI=uri``: refused within the probe's time limit,
    exit 2, no default store made; returns the one error line."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    code, stderr = run_main(SMALL_RUN, tmp_path, monkeypatch, capsys)
    assert time.monotonic() - started < HTTP_PROBE_TIMEOUT_S + 5
    assert code == 2
    assert not (tmp_path / "mlruns").exists()
    return _one_line(stderr)


def test_read_only_default_store_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """mlruns/ on a read-only file system (sysfs: even root cannot write there)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlruns").symlink_to("/sys")
    code, stderr = run_main(SMALL_RUN, tmp_path, monkeypatch, capsys)
    assert code == 2
    line = _one_line(stderr)
    assert line.startswith("error: tracking.uri (unset: the default)='sqlite:////sys/mlflow.db'")
    assert "the directory /sys is not writable" in line


@pytest.mark.slow
def test_a_shell_sees_exit_status_2_and_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "zsharp_sweeps.train", *SMALL_RUN], cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": "mysql://host/db"},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert _one_line(proc.stderr).startswith("error: MLFLOW_TRACKING_URI='mysql://host/db'")


# ---- Optuna storage ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def optuna_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real study's database: three finished trials."""
    import optuna

    path = tmp_path_factory.mktemp("optuna") / "optuna.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{path}")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    return path


def _storage_refusal(url: str) -> str:
    with pytest.raises(ConfigError) as info:
        check_storage_url(url)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"hydra.sweeper.storage={url!r}")
    return message


def test_storage_that_optuna_can_use_passes(optuna_db: Path, tmp_path: Path) -> None:
    check_storage_url(f"sqlite:///{optuna_db}")
    check_storage_url(f"sqlite:///{tmp_path}/new/optuna.db")
    assert os.listdir(tmp_path) == []


def test_storage_without_driver() -> None:
    message = _storage_refusal("mysql://x")
    assert "needs the Python database driver 'MySQLdb'" in message
    assert "pip install mysqlclient" in message


def test_storage_that_is_no_database_url() -> None:
    assert "not a database URL" in _storage_refusal("redis://localhost")


def test_storage_in_an_unwritable_place(tmp_path: Path) -> None:
    assert "the directory /sys is not writable" in _storage_refusal("sqlite:////sys/optuna.db")
    (tmp_path / "multirun").write_text("")
    assert f"{tmp_path}/multirun is not a directory" in _storage_refusal(
        f"sqlite:///{tmp_path}/multirun/s/optuna.db"
    )


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda b: b[: len(b) // 2], "database disk image is malformed"),
    (lambda b: b[:100], "database disk image is malformed"),
    (lambda b: b"not a database at all " * 50, "file is not a database"),
])
def test_damaged_study_database(optuna_db: Path, tmp_path: Path, damage, expected: str) -> None:
    bad = tmp_path / "optuna.db"
    bad.write_bytes(damage(optuna_db.read_bytes()))
    message = _storage_refusal(f"sqlite:///{bad}")
    assert expected in message and str(bad) in message


def test_empty_study_database_is_refused_not_silently_restarted(tmp_path: Path) -> None:
    empty = tmp_path / "optuna.db"
    empty.touch()
    message = _storage_refusal(f"sqlite:///{empty}")
    assert "is empty (0 bytes)" in message
    assert "delete the file or pick another hydra.sweeper.study_name" in message
    assert empty.stat().st_size == 0


# ---- data that cannot be had, or does not fit ----------------------------------------------


@pytest.mark.timeout(120)
def test_offline_cifar10_is_one_line_with_url_and_path_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    mlflow_uri: str, experiment_name: str,
) -> None:
    """``model=vit`` with the default data (CIFAR-10) on a machine without network."""
    calls: list[Path] = []
    real_download = sources._download

    def counted(name: str, root: Path) -> None:
        calls.append(root)
        real_download(name, root)  # no network here: fails on its own

    monkeypatch.setattr(sources, "_download", counted)
    monkeypatch.setattr(sources, "DOWNLOAD_STALL_TIMEOUT_S", 5.0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    code, stderr = run_main(["model=vit", "hardware=cpu", f"tracking.experiment={experiment_name}"],
                            tmp_path, monkeypatch, capsys)
    assert code == 2
    line = _one_line(stderr)
    assert calls == [tmp_path / "data"]
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in line
    assert f"so that {tmp_path}/data/cifar-10-batches-py/ holds the batch files" in line
    assert f"put the archive itself at {tmp_path}/data/cifar-10-python.tar.gz and rerun " in line
    assert "set data.download=true" not in line and "with data.download=true" not in line
    assert not (tmp_path / "data").exists()
    assert MlflowClient(mlflow_uri).get_experiment_by_name(experiment_name) is None


def test_mnist_pair_of_different_lengths_is_refused_naming_both_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    mlflow_uri: str, experiment_name: str,
) -> None:
    """600 images with 300 labels used to train silently on 300."""
    write_mnist(tmp_path, n_train=600)
    raw = tmp_path / "MNIST" / "raw"
    labels = raw / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx_bytes(sources.read_idx(labels)[:300]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    code, stderr = run_main(
        ["data=mnist", f"data.root={tmp_path}", "data.val_size=50", "model=mlp",
         "hardware=cpu", f"tracking.experiment={experiment_name}"],
        tmp_path, monkeypatch, capsys,
    )
    assert code == 2
    line = _one_line(stderr)
    assert f"{raw / 'train-images-idx3-ubyte'} with {labels}: 600 images but 300 labels" in line
    # The files are read inside the run (its FAILED record names the file too).
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment_name).experiment_id])
    assert run.info.status == "FAILED" and "600 images but 300 labels" in run.data.tags["error"]


# ---- quiet output --------------------------------------------------------------------------


@pytest.mark.slow
def test_help_is_quiet_and_offers_no_schema_options(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-m", "zsharp_sweeps.train", "--help"], cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0
    assert proc.stderr == ""  # no Hydra15MigrationWarning (or any other warning)
    groups = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "model: mlp, resnet110," in groups
    assert "_schema" not in groups


def test_every_option_starts_from_its_group_schema() -> None:
    """The schemas live at the root (``/<group>_schema``), so no group offers ``_schema``."""
    from hydra.core.config_store import ConfigStore

    from zsharp_sweeps.config import GROUP_SCHEMAS, register_configs

    register_configs()
    repo = ConfigStore.instance().repo
    for group in GROUP_SCHEMAS:
        assert "_schema.yaml" not in repo.get(group, {})
        for option in (REPO / "conf" / group).glob("*.yaml"):
            # One schema per optimizer: each optimizer option starts from its own.
            name = f"{group}_{option.stem}_schema" if group == "optimizer" else f"{group}_schema"
            assert f"{name}.yaml" in repo
            assert f"  - /{name}\n" in option.read_text(), option


def test_progress_off_a_terminal_is_one_log_line_per_epoch(
    make_cfg, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from zsharp_sweeps.training.run import run_training

    cfg = make_cfg(["model=mlp", "model.params.hidden=16", "trainer.progress=true",
                    "trainer.max_steps_per_epoch=2", "sharpness=none", "tracking=off"])
    caplog.set_level("INFO", logger="zsharp_sweeps.training.engine")
    run_training(cfg)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err and "it/s" not in err
    lines = [r.getMessage() for r in caplog.records if r.name == "zsharp_sweeps.training.engine"]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("train_loss=" in line and "val_acc=" in line for line in lines)


def test_progress_bars_only_on_a_terminal() -> None:
    from zsharp_sweeps.training.console import show_progress_bars

    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    assert show_progress_bars(True, Stream(True)) is True
    assert show_progress_bars(True, Stream(False)) is False
    assert show_progress_bars(False, Stream(True)) is False
    assert show_progress_bars(True, object()) is False  # type: ignore[arg-type]


def test_sqlite_files_checked_read_only(optuna_db: Path, tmp_path: Path) -> None:
    """The checks never write: a study database is byte for byte the same afterwards."""
    copy = tmp_path / "optuna.db"
    shutil.copy(optuna_db, copy)
    before = copy.read_bytes()
    check_storage_url(f"sqlite:///{copy}")
    assert copy.read_bytes() == before
    with sqlite3.connect(copy) as conn:
        assert conn.execute("SELECT COUNT(*) FROM trials").fetchone() == (3,)


# ---- defaults that learn, and runs that do not --------------------------------------------

# The headline command's model, narrowed so that the test runs in seconds on a CPU: the
# optimizer defaults it exercises are picked by the model's name (conf/model/optimizer/).
HEADLINE = ["optimizer=zsharp", "model=vit", "data=digits", "hardware=cpu"]
NARROW_VIT = ["model.params.depth=3", "model.params.hidden=96", "model.params.heads=4",
              "model.params.mlp_hidden=96"]


def test_a_vit_comes_with_an_optimizer_that_trains_it(make_cfg) -> None:
    """``--cfg job`` of the headline command: Adam at 1e-3 (the paper's ViT recipe), not
    SGD at 0.1; other models keep their optimizer's defaults; the command line still wins."""
    vit = make_cfg(HEADLINE).optimizer
    assert (vit.name, vit.base, vit.lr, vit.weight_decay, vit.rho) == (
        "zsharp", "adam", 1e-3, 5e-5, 0.05)
    for optimizer in ("sam", "asam", "fsam", "sam_magnitude", "sam_direction"):
        assert make_cfg(["model=vit", f"optimizer={optimizer}"]).optimizer.base == "adam"
    resnet = make_cfg(["optimizer=zsharp", "model=resnet20"]).optimizer
    assert (resnet.base, resnet.lr) == ("sgd", 0.1)
    assert make_cfg([*HEADLINE, "optimizer.lr=0.05"]).optimizer.lr == 0.05
    assert make_cfg([*HEADLINE, "optimizer.base=sgd"]).optimizer.base == "sgd"
    plain_sgd = make_cfg(["model=vit", "optimizer=sgd"]).optimizer
    assert (plain_sgd.name, plain_sgd.lr) == ("sgd", 0.1)  # a baseline is what it says
    assert "base" not in plain_sgd  # plain SGD has no base: it is the base


@pytest.mark.slow
def test_the_headline_vit_learns_digits_with_its_defaults(make_cfg) -> None:
    from zsharp_sweeps.training.run import run_training

    cfg = make_cfg([*HEADLINE, *NARROW_VIT, "trainer.epochs=6", "sharpness=none",
                    "tracking=off"])
    summary = run_training(cfg)
    assert summary["best_val_acc"] >= 0.5  # chance is 0.1


def test_a_run_stuck_at_chance_warns_and_is_tagged(
    make_cfg, mlflow_uri: str, experiment_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    from zsharp_sweeps.training.run import run_training

    cfg = make_cfg(["model=mlp", "model.params.hidden=16", "optimizer=sgd", "optimizer.lr=1e-7",
                    "trainer.max_steps_per_epoch=2", "sharpness=none"])
    caplog.set_level("WARNING", logger="zsharp_sweeps.train")
    summary = run_training(cfg)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "the run did not learn: best val_acc" in warning
    assert "is at chance (1/10 = 0.1000" in warning
    run = MlflowClient(mlflow_uri).get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["learning"] == "stuck_at_chance"
    assert run.data.tags["learning_warning"] == warning.split(": ", 1)[1]


def test_a_run_that_learns_is_not_flagged(make_cfg, caplog: pytest.LogCaptureFixture) -> None:
    from zsharp_sweeps.training.run import run_training

    cfg = make_cfg(["model=mlp", "model.params.hidden=64", "sharpness=none", "tracking=off"])
    caplog.set_level("WARNING", logger="zsharp_sweeps.train")
    assert run_training(cfg)["best_val_acc"] > 0.5
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_learning_verdicts() -> None:
    from zsharp_sweeps.training.health import chance_band, learning_problem

    assert chance_band(10, 200) == pytest.approx(0.1 + 3 * (0.09 / 200) ** 0.5)
    at_chance = [{"train_loss": 2.30, "val_acc": 0.11}, {"train_loss": 2.30, "val_acc": 0.12}]
    assert learning_problem(at_chance, 10, 200, 1000).verdict == "stuck_at_chance"
    learning = [{"train_loss": 2.0, "val_acc": 0.12}, {"train_loss": 1.2, "val_acc": 0.60}]
    assert learning_problem(learning, 10, 200, 1000) is None
    # Accuracy above chance but a loss far above ln(10) = 2.30: worse than guessing.
    diverging = [{"train_loss": 9.0, "val_acc": 0.3}]
    assert learning_problem(diverging, 10, 200, 1000).verdict == "loss_above_chance"
    # Without a validation split the training accuracy is judged, on the training images.
    no_val = [{"train_loss": 2.3, "train_acc": 0.105}]
    problem = learning_problem(no_val, 10, 0, 5000)
    assert problem.verdict == "stuck_at_chance" and "train_acc" in problem.message


# ---- Hydra's own errors: one line, exit status 2 -------------------------------------------


@pytest.mark.parametrize(("argv", "expected"), [
    (["hardware=gpu"], "error: hardware=gpu is invalid: In 'config': Could not find "
     "'hardware/gpu'. Available options in 'hardware': auto, cpu, cuda, gpu_fast, mps"),
    (["optimizer.rh=0.1"], "error: Could not override 'optimizer.rh': Key 'rh' not in "
     "'ZSharpConfig'. Did you mean: 'rho'? To append to your config use +optimizer.rh=0.1"),
    (["--multirun", "+sweep=percentile_grid", "--cfg", "job"],
     "error: Only one of --run, --multirun, --cfg, --info and --shell_completion can be "
     "specified"),
])
def test_a_config_that_does_not_compose_is_one_line_and_exit_2(
    argv: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Hydra's message (its list of options, its "Did you mean") kept, on one line."""
    code, stderr = run_main(argv, tmp_path, monkeypatch, capsys)
    assert code == 2
    assert _one_line(stderr) == expected
    assert os.listdir(tmp_path) == []


def test_the_verdict_command_shares_the_edge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from zsharp_sweeps.verdict.__main__ import entry_point

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["zsharp_sweeps.verdict", "verdict=nope"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        entry_point()
    assert info.value.code == 2
    assert _one_line(capsys.readouterr().err).startswith(
        "error: verdict=nope is invalid: In 'verdict': Could not find 'verdict/nope'. "
        "Available options in 'verdict': equal_budget, review_grid")


# ---- sweeper settings: checked before anything is created ----------------------------------

GRID_SWEEP = ["--multirun", "+sweep=percentile_grid", "data=digits", "hardware=cpu",
              "model=mlp", "tracking=off"]


@pytest.mark.parametrize(("setting", "expected"), [
    ("hydra.sweeper.n_trials=0", "error: hydra.sweeper.n_trials=0 is invalid: allowed an int >= 1"),
    ("hydra.sweeper.n_trials=-3", "error: hydra.sweeper.n_trials=-3 is invalid: allowed an int >= 1"),
    ("hydra.sweeper.n_jobs=0", "error: hydra.sweeper.n_jobs=0 is invalid: allowed an int >= 1"),
    ("hydra.sweeper.max_failure_rate=-1",
     "error: hydra.sweeper.max_failure_rate=-1.0 is invalid: allowed a fraction in [0, 1]"),
    ("hydra.sweeper.study_name=../../x",
     "error: hydra.sweeper.study_name='../../x' is invalid: it names the sweep's folder"),
    # Used to create the study and fail every trial on a machine without CUDA, exit 0.
    ("hardware=gpu_fast", "error: hardware=gpu_fast (hardware.device='cuda') but CUDA is not "
                          "available on this machine: use hardware=auto"),
    ("hydra.sweeper.devices=[cuda:0,cuda:1]",
     "error: hydra.sweeper.devices=['cuda:0', 'cuda:1']: hardware.device='cuda:0' but CUDA is "
     "not available on this machine: allowed here: auto, cpu"),
])
def test_a_sweeper_setting_out_of_range_is_one_line_and_creates_nothing(
    setting: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """n_trials=0 used to exit 0 with an empty study, n_jobs=0 to start one worker,
    study_name=../../x to put the sweep's folder two levels above multirun/."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on this CPU machine
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    code, stderr = run_main([*GRID_SWEEP, setting], cwd, monkeypatch, capsys)
    assert code == 2
    assert _one_line(stderr).startswith(expected)
    assert os.listdir(cwd) == [] and sorted(os.listdir(tmp_path)) == ["a"]


# ---- two stores pointed at each other: refused before either is written --------------------


def test_tracking_pointed_at_a_study_database_is_refused_and_left_untouched(
    optuna_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """MLflow used to write its tables into optuna.db, then fail with a traceback."""
    study_db = tmp_path / "optuna.db"
    shutil.copy(optuna_db, study_db)
    before = study_db.read_bytes()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{study_db}")
    code, stderr = run_main(SMALL_RUN, tmp_path, monkeypatch, capsys)
    assert code == 2
    line = _one_line(stderr)
    assert line.startswith(f"error: MLFLOW_TRACKING_URI='sqlite:///{study_db}' is unusable: ")
    assert "is an Optuna study storage (tables studies, trials, version_info)" in line
    assert study_db.read_bytes() == before
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("tracking", ["tracking=off", "tracking=mlflow"])
def test_study_storage_pointed_at_the_mlflow_database_is_refused_and_left_untouched(
    tracking: str, mlflow_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """hydra.sweeper.storage=sqlite:///mlruns/mlflow.db: an MLflow store by its tables, and
    (tracking on) the tracking store's own file."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template, db)
    before = db.read_bytes()
    argv = [*GRID_SWEEP[:-1], tracking, "hydra.sweeper.storage=sqlite:///mlruns/mlflow.db"]
    code, stderr = run_main(argv, tmp_path, monkeypatch, capsys)
    assert code == 2
    line = _one_line(stderr)
    assert line.startswith(f"error: hydra.sweeper.storage='sqlite:///{db}' ")
    expected = ("is the MLflow tracking store's database" if tracking == "tracking=mlflow"
                else "is an MLflow tracking store (tables experiments, runs)")
    assert expected in line
    assert db.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["mlruns"] and os.listdir(db.parent) == ["mlflow.db"]


# ---- tracking servers and database servers: one line within seconds -----------------------


@pytest.fixture
def not_mlflow_server() -> str:
    """A plain HTTP server (what ``python -m http.server`` is): 404 for every MLflow call."""
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # not on the stderr under test
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_http_server_that_is_not_mlflow_is_refused(
    not_mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It passed the old probe (any HTTP answer), then MLflow failed with a 404 traceback."""
    line = _refused_tracking_uri(not_mlflow_server, tmp_path, monkeypatch, capsys)
    assert line.startswith(f"error: MLFLOW_TRACKING_URI='{not_mlflow_server}' answers, but not "
                           "as an MLflow tracking server (HTTP 404 non-JSON")


@pytest.mark.parametrize("setting", ["MLFLOW_TRACKING_URI", "hydra.sweeper.storage"])
def test_an_unreachable_database_server_is_refused_within_seconds(
    setting: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """MLflow retried an unreachable PostgreSQL for ~110 s, printing 200 lines."""
    from zsharp_sweeps.tracking.dburl import RDB_PROBE_TIMEOUT_S

    url = "postgresql+psycopg://u:secret@127.0.0.1:1/db"
    if setting == "MLFLOW_TRACKING_URI":
        monkeypatch.setenv(setting, url)
        argv = SMALL_RUN
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        argv = [*GRID_SWEEP, f"{setting}={url}"]
    started = time.monotonic()
    code, stderr = run_main(argv, tmp_path, monkeypatch, capsys)
    assert time.monotonic() - started < RDB_PROBE_TIMEOUT_S + 5
    assert code == 2
    line = _one_line(stderr)
    assert line.startswith(f"error: {setting}='postgresql+psycopg://u:***@127.0.0.1:1/db'"
                           ": cannot connect (")
    assert "Connection refused" in line and "secret" not in line
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "multirun").exists()


# ---- a hardware option this machine cannot run ---------------------------------------------


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_option_without_cuda_names_what_was_typed_and_what_to_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """hardware=gpu_fast used to say only ``hardware.device='cuda' but CUDA is not available``."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, stderr = run_main([*SMALL_RUN, "hardware=gpu_fast"], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert _one_line(stderr) == (
        "error: hardware=gpu_fast (hardware.device='cuda') but CUDA is not available on this "
        "machine: use hardware=auto (the fastest device this machine has) or hardware=cpu "
        "instead.")
    assert not (tmp_path / "mlruns").exists()
