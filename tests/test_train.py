"""The entry point end to end: runs recorded in MLflow, learning on digits, bad input rejected.

Tracking does not depend on the optimizer: one tracked run pins what MLflow receives, and
every optimizer runs through ``run_training`` untracked.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from zsharp_sweeps import train
from zsharp_sweeps.config import OPTIMIZER_SCHEMAS
from zsharp_sweeps.training.engine import NonFiniteLossError
from zsharp_sweeps.training.run import run_training

from .conftest import REPO

OPTIMIZERS = tuple(OPTIMIZER_SCHEMAS)

EPOCH_METRICS = [
    "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr",
    "epoch_time_s", "train_images_per_s", "sharpness/sam",
]
FINAL_METRICS = ["best_val_acc", "final_test_acc"]


def _runs(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return client, client.search_runs([exp.experiment_id])


#: The class each optimizer name builds (a SAM-family one over its base, SGD here).
BUILDS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "sam": "SAM", "asam": "ASAM",
          "fsam": "FriendlySAM", "zsharp": "ZSharp", "sam_magnitude": "SAMMagnitude",
          "sam_direction": "SAMDirection"}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains_through_the_entry_point(
    optimizer: str, make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zsharp_sweeps.training.build as build

    built: list[str] = []
    real = build.build_optimizer

    def spy(*args, **kwargs):
        opt = real(*args, **kwargs)
        built.append(type(opt).__name__)
        return opt

    monkeypatch.setattr(build, "build_optimizer", spy)
    cfg = make_cfg([f"optimizer={optimizer}", "model=resnet20", "trainer.epochs=1",
                    "trainer.max_steps_per_epoch=2", "sharpness=none", "tracking=off"])
    summary = run_training(cfg)
    assert built == [BUILDS[optimizer]]  # the run trained with the optimizer it names
    assert summary["run_id"] is None  # tracking off: nothing recorded
    for key in ("final_test_loss", "best_val_acc", "final_test_acc"):
        assert math.isfinite(summary[key]), key
    assert 0.0 <= summary["final_test_acc"] <= 1.0


@pytest.mark.slow  # the session's first MLflow store: its schema migrations take seconds
def test_short_digits_run_records_every_metric(
    make_cfg, mlflow_uri: str, experiment_name: str
) -> None:
    optimizer = "zsharp"
    cfg = make_cfg([f"optimizer={optimizer}", "model=resnet20", "trainer.max_steps_per_epoch=3"])
    summary = run_training(cfg)

    client, runs = _runs(mlflow_uri, experiment_name)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_id == summary["run_id"]
    for key in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key
    for key in FINAL_METRICS:
        assert key in run.data.metrics
    # Throughput counts exactly the images trained on: 3 full batches per epoch here.
    times = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "epoch_time_s")}
    for m in client.get_metric_history(run.info.run_id, "train_images_per_s"):
        assert m.value * times[m.step] == pytest.approx(3 * cfg.data.batch_size, rel=1e-3)
    assert 0.0 <= run.data.metrics["final_test_acc"] <= 1.0
    # Set-up (data, model, optimizer) is part of the run's time, before any epoch.
    assert 0 < run.data.metrics["setup_s"] < run.data.metrics["train_time_s"] - sum(times.values())
    assert run.data.params["optimizer.name"] == optimizer
    assert run.data.params["data.name"] == "digits"
    assert run.data.tags["optimizer"] == optimizer
    assert run.data.tags["model"] == "resnet20"
    assert run.data.tags["dataset"] == "digits"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert artifacts == {"config/resolved.yaml", "config/overrides.txt"}
    assert "curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_resnet20_learns_digits_in_the_demo_recipe(make_cfg) -> None:
    """The README demo: ZSharp + ResNet-20, 3 epochs on digits: far above 10 % chance."""
    cfg = make_cfg(["optimizer=zsharp", "model=resnet20", "trainer.epochs=3"])
    summary = run_training(cfg)
    assert summary["best_val_acc"] > 0.8
    assert summary["final_test_acc"] > 0.8


def test_a_run_that_raises_ends_failed(make_cfg, mlflow_uri: str, experiment_name: str) -> None:
    """A run that diverges mid-training: the run ends FAILED with the error as a tag."""
    cfg = make_cfg(["model=mlp", "optimizer=sgd", "optimizer.lr=1e30", "trainer.epochs=1",
                    "trainer.max_steps_per_epoch=3", "sharpness=none"])
    with pytest.raises(NonFiniteLossError, match="optimizer.lr=1e"):
        run_training(cfg)
    _, runs = _runs(mlflow_uri, experiment_name)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["error"].startswith(
        "NonFiniteLossError: the run diverged: training loss nan at epoch 1 (first at step 2 of 3")


def test_a_diverged_run_says_so_in_one_line_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    mlflow_uri: str, experiment_name: str,
) -> None:
    """What diverged, where and what to try, in one line on stderr (it was Hydra's "Error
    executing job" and a traceback); exit status 1; the MLflow run ends FAILED."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [
        "zsharp_sweeps.train", "data=digits", "hardware=cpu", "model=mlp",
        "model.params.hidden=16", "optimizer=sgd", "optimizer.lr=1e30", "trainer.epochs=1",
        "trainer.max_steps_per_epoch=3", "sharpness=none", f"tracking.uri={mlflow_uri}",
        f"tracking.experiment={experiment_name}"])
    with pytest.raises(SystemExit) as info:
        train.main()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Error executing job" not in err, err
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("error: the run diverged: training loss nan at epoch 1 (first at "
                           "step 2 of 3, global step 2) with optimizer.lr=1e+30; try a smaller "
                           "optimizer.lr (e.g. optimizer.lr=1e+29)"), line
    assert line.endswith("(the MLflow run ends FAILED)")
    _, runs = _runs(mlflow_uri, experiment_name)
    assert [r.info.status for r in runs] == ["FAILED"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "zsharp_sweeps.train", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)  # a new MLflow store and a training in a fresh interpreter
def test_cli_run_writes_to_the_default_store_under_mlruns(tmp_path: Path) -> None:
    proc = _cli(
        ["data=digits", "hardware=cpu", "trainer.epochs=1", "trainer.max_steps_per_epoch=2",
         "model=mlp", "model.params.hidden=16", "optimizer=sgd", "sharpness=none",
         "trainer.progress=false"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = tmp_path / "mlruns" / "mlflow.db"
    assert db.exists()
    _, runs = _runs(f"sqlite:///{db}", "zsharp-sweeps")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert (tmp_path / "mlruns" / "artifacts").is_dir()


@pytest.mark.parametrize(
    ("override", "status", "expected"),
    [
        ("optimizer.rho=-0.05", 2, "error: optimizer.rho=-0.05 is invalid"),
        ("optimizer.percentile=70", 2, "Did you mean 0.7?"),
        ("optimizer.lr=0", 2, "error: optimizer.lr=0.0 is invalid"),
        ("trainer.epochs=0", 2, "error: trainer.epochs=0 is invalid"),
        ("optimizer=nope", 2, "Could not find 'optimizer/nope'"),  # Hydra's composition error: bad input too
    ],
)
def test_entry_point_bad_input_exits_nonzero_and_writes_nothing(
    override: str, status: int, expected: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """``main()`` in-process, as the shell runs it (the shell's view of the exit status is
    test_errors.py's subprocess test): a bad value stops before any MLflow store exists."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["zsharp_sweeps.train", "data=digits", "hardware=cpu",
                                      override])
    with pytest.raises(SystemExit) as info:
        train.main()
    assert info.value.code == status
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "mlruns").exists()


def test_a_bad_model_parameter_exits_2_and_leaves_no_mlflow_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    mlflow_uri: str, experiment_name: str,
) -> None:
    """model.params is checked (the model built on the meta device) before any MLflow run
    opens: the store holds no run, FAILED or otherwise."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [
        "zsharp_sweeps.train", "data=digits", "hardware=cpu", "model=mlp",
        "model.params.hidden=0", f"tracking.uri={mlflow_uri}",
        f"tracking.experiment={experiment_name}"])
    with pytest.raises(SystemExit) as info:
        train.main()
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: model.params.hidden=0 is invalid: allowed an int >= 1.")
    experiment = MlflowClient(mlflow_uri).get_experiment_by_name(experiment_name)
    assert experiment is None or not MlflowClient(mlflow_uri).search_runs(
        [experiment.experiment_id])


def test_seeds_repeat_a_configuration_and_report_mean_and_std(
    make_cfg, mlflow_uri: str, experiment_name: str
) -> None:
    from zsharp_sweeps.config import validate
    from zsharp_sweeps.training.run import objective_values, run_experiment

    cfg = validate(make_cfg(["model=mlp", "model.params.hidden=32", "optimizer=sgd",
                             "study.n_seeds=2", "sharpness=none"]))
    summary = run_experiment(cfg)

    client, runs = _runs(mlflow_uri, experiment_name)
    groups = [r for r in runs if r.data.tags.get("n_seeds") == "2"]
    seeds = [r for r in runs if "seed" in r.data.tags]
    assert len(groups) == 1 and len(seeds) == 2
    group = groups[0]
    assert {r.data.tags["mlflow.parentRunId"] for r in seeds} == {group.info.run_id}
    assert sorted(r.data.params["seed"] for r in seeds) == ["52", "53"]
    per_seed = [r.data.metrics["best_val_acc"] for r in seeds]
    assert summary["best_val_acc"] == pytest.approx(sum(per_seed) / 2)
    assert group.data.metrics["best_val_acc"] == pytest.approx(sum(per_seed) / 2)
    assert group.data.metrics["best_val_acc_std"] == pytest.approx(
        abs(per_seed[0] - per_seed[1]) / 2**0.5
    )
    assert objective_values(cfg, summary) == pytest.approx(summary["best_val_acc"])
    # The group run holds the per-epoch mean curve.
    assert [m.step for m in client.get_metric_history(group.info.run_id, "val_acc")] == [1, 2]
