"""Per-epoch checkpoints: a run killed after epoch 2 and resumed ends with the numbers of the
run that was never interrupted, in the same MLflow run, each epoch logged once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from zsharp_sweeps.config import ConfigError, TrainerConfig, validate
from zsharp_sweeps.training.build import build_parts
from zsharp_sweeps.training.checkpoint import (
    Checkpointer,
    TrainingState,
    checkpoint_dir_for,
    config_differences,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore,
    save_atomic,
    snapshot,
)
from zsharp_sweeps.training.device import seed_everything
from zsharp_sweeps.training.engine import fit
from zsharp_sweeps.training.run import run_training, sharpness_fn
from zsharp_sweeps.training.schedule import build_scheduler

from .conftest import REPO

# Small and deterministic: digits, 4 epochs of 4 steps.
TINY = [
    "hardware.deterministic=true", "hardware.num_threads=1", "trainer.epochs=4",
    "trainer.max_steps_per_epoch=4", "data.batch_size=32",
]


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """hardware.num_threads=1 (same reductions in the subprocess and here) is process-wide."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _numbers(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """Everything but wall-clock measurements (``epoch_time_s``, ``train_images_per_s``...)."""
    return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in history]


class _Killed(Exception):
    """Stands for the process dying right after a checkpoint was written."""


class _DieAfter(Checkpointer):
    def __init__(self, *args, epoch: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.die_epoch = epoch

    def save(self, epoch: int, state: TrainingState) -> Path:
        path = super().save(epoch, state)
        if epoch == self.die_epoch:
            raise _Killed(epoch)
        return path


@pytest.mark.parametrize(
    "overrides",
    [
        # ZSharp's random-filter control: its generator state is in the optimizer's checkpoint.
        ["optimizer=zsharp", "optimizer.filter=random", "model=mlp", "model.params.hidden=32"],
        # Friendly-SAM's momentum and AdamW's moments under the wrapper.
        ["optimizer=fsam", "optimizer.base=adamw", "optimizer.lr=0.003", "model=mlp",
         "model.params.hidden=32"],
        # Dropout draws from torch's global generator: the RNG states must come back.
        ["optimizer=sam", "model=vit", "model.params.hidden=16", "model.params.depth=1",
         "model.params.heads=2", "model.params.mlp_hidden=16", "model.params.dropout=0.3",
         "trainer.warmup_epochs=1"],
    ],
    ids=["zsharp-random-filter", "fsam-adamw", "sam-vit-dropout"],
)
def test_fit_resumed_after_epoch_2_equals_the_uninterrupted_fit(
    overrides: list[str], make_cfg, tmp_path: Path
) -> None:
    cfg = validate(make_cfg([*TINY, *overrides]))
    device = torch.device("cpu")

    def parts():
        seed_everything(cfg.seed, deterministic=True)
        data, model, optimizer = build_parts(cfg, device)
        return data, model, optimizer

    data, model, optimizer = parts()
    whole = fit(model, optimizer, data, cfg, sharpness_fn=sharpness_fn(cfg, data),
                checkpointer=Checkpointer(tmp_path / "whole"))
    whole_params = {k: v.clone() for k, v in model.state_dict().items()}

    data, model, optimizer = parts()
    with pytest.raises(_Killed):
        fit(model, optimizer, data, cfg, sharpness_fn=sharpness_fn(cfg, data),
            checkpointer=_DieAfter(tmp_path / "killed", epoch=2))
    assert latest_checkpoint(tmp_path / "killed").name == "epoch-0002.pt"

    # A fresh process: new parts, generators somewhere else entirely.
    data, model, optimizer = parts()
    torch.manual_seed(12345), random.seed(12345), np.random.seed(12345)
    seen: list[int] = []
    resumed = fit(
        model, optimizer, data, cfg, sharpness_fn=sharpness_fn(cfg, data),
        on_epoch_end=[lambda epoch, _: seen.append(epoch)],
        checkpointer=Checkpointer(tmp_path / "killed"),
        resume=load_checkpoint(latest_checkpoint(tmp_path / "killed")),
    )
    assert seen == [3, 4]  # callbacks (MLflow logging, pruning) see the remaining epochs only
    assert _numbers(resumed.history) == _numbers(whole.history)
    assert resumed.summary == whole.summary
    for key, value in model.state_dict().items():
        assert torch.equal(value, whole_params[key]), key


def test_snapshot_restores_scheduler_scaler_history_and_every_generator() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = build_scheduler(optimizer, TrainerConfig(epochs=10, warmup_epochs=2))
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(torch.ones(()))  # the scale tensor exists from the first use
    scaler.update(1024.0)
    for _ in range(3):
        scheduler.step()
    state = TrainingState(model, optimizer, scheduler, scaler, [{"epoch": 1, "val_acc": 0.5}])
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    payload = snapshot(3, state, run_id="abc", config={"seed": 1})
    expected = (torch.rand(3), random.random(), np.random.rand(3))

    other_model = torch.nn.Linear(3, 2)
    other_opt = torch.optim.SGD(other_model.parameters(), lr=0.1, momentum=0.9)
    other_sched = build_scheduler(other_opt, TrainerConfig(epochs=10, warmup_epochs=2))
    other = TrainingState(other_model, other_opt, other_sched, torch.amp.GradScaler("cpu"), [])
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    assert restore(payload, other) == 3
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.array_equal(np.random.rand(3), expected[2])
    assert other.scheduler.last_epoch == 3 and other_opt.param_groups[0]["lr"] == pytest.approx(
        optimizer.param_groups[0]["lr"]
    )
    assert other.scaler.get_scale() == 1024.0
    assert other.history == [{"epoch": 1, "val_acc": 0.5}]
    assert torch.equal(other_model.weight, model.weight)


def _fake_history(val_accs: list[float]) -> list[dict[str, float]]:
    return [{"epoch": i + 1, "val_acc": v} for i, v in enumerate(val_accs)]


@pytest.mark.parametrize(
    ("keep", "left"), [("last", [4]), ("best", [2]), ("none", [])],
)
def test_keep_checkpoints_prunes_what_the_setting_says(
    keep: str, left: list[int], tmp_path: Path
) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainingState(model, optimizer, build_scheduler(optimizer, TrainerConfig(epochs=4)))
    directory = tmp_path / "ckpt"
    writer = Checkpointer(directory, keep=keep)
    accs = [0.5, 0.9, 0.7, 0.8]
    during = []
    for epoch in range(1, 5):
        state.history[:] = _fake_history(accs[:epoch])
        writer.save(epoch, state)
        during.append([e for e, _ in list_checkpoints(directory)])
    # While running: the latest (to resume from) and the best so far (for keep=best).
    assert during == [[1], [2], [2, 3], [2, 4]]
    remaining = writer.finish()
    assert [e for e, _ in list_checkpoints(directory)] == left
    assert [p.name for p in remaining] == [f"epoch-{e:04d}.pt" for e in left]
    assert directory.exists() == bool(left)  # none: the emptied directory goes too


def test_an_interrupted_write_leaves_the_previous_checkpoint_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "epoch-0001.pt"
    save_atomic({"format": 1, "epoch": 1}, path)
    before = path.read_bytes()

    def torn_write(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"format": 1, "epoch": 2}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001.pt"]


def test_resume_settings_are_checked_with_clear_errors(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.keep_checkpoints='all' is invalid: allowed "
                                          r"one of last, best, none"):
        validate(make_cfg(["trainer.keep_checkpoints=all"]))
    with pytest.raises(ConfigError, match=r"trainer.resume=.*nothing exists at that path"):
        resolve_resume(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"trainer.resume=.*format"):
        bogus = tmp_path / "bogus.pt"
        torch.save({"weights": torch.zeros(1)}, bogus)
        load_checkpoint(bogus)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_resume(empty) is None  # nothing to resume yet: the run starts at epoch 1
    assert config_differences(
        {"optimizer": {"lr": 0.1}, "study": {"trial_number": 3}, "trainer": {"resume": None}},
        {"optimizer": {"lr": 0.2}, "study": {"trial_number": 9}, "trainer": {"resume": "x"}},
    ) == ["optimizer.lr"]


def test_checkpoint_dir_defaults(make_cfg, tmp_path: Path) -> None:
    assert checkpoint_dir_for(validate(make_cfg())) is None  # no Hydra run, no directory
    cfg = validate(make_cfg([f"trainer.checkpoint_dir={tmp_path}"]))
    assert checkpoint_dir_for(cfg) == tmp_path
    cfg = validate(make_cfg([f"trainer.checkpoint_dir={tmp_path}", "study.n_seeds=3", "seed=5"]))
    assert checkpoint_dir_for(cfg) == tmp_path / "seed-5"
    cfg = validate(make_cfg([f"trainer.checkpoint_dir={tmp_path}", "trainer.checkpoint=false"]))
    assert checkpoint_dir_for(cfg) is None


def test_resume_under_another_config_is_refused_before_any_run_opens(
    make_cfg, mlflow_uri: str, experiment_name: str, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    base = [*TINY, "model=mlp", "model.params.hidden=16", "optimizer=sgd", "trainer.epochs=1",
            "sharpness=none", f"trainer.checkpoint_dir={ckpt}"]
    run_training(make_cfg(base))
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(experiment_name)
    assert len(client.search_runs([exp.experiment_id])) == 1
    with pytest.raises(ConfigError, match=r"trainer.resume=.*optimizer.lr: checkpoint 0.1 vs "
                                          r"now 0.2"):
        run_training(make_cfg([*base, "optimizer.lr=0.2", f"trainer.resume={ckpt}"]))
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_resuming_a_run_the_store_lost_starts_a_new_run_with_the_whole_history(
    make_cfg, mlflow_uri: str, experiment_name: str, tmp_path: Path
) -> None:
    """The checkpoint's MLflow run was deleted: a new run, tagged resumed_from, gets the
    earlier epochs from the checkpoint. Here the checkpoint is the last epoch's, so nothing
    is trained again and the summary is the finished run's."""
    ckpt = tmp_path / "ckpt"
    base = [*TINY, "model=mlp", "model.params.hidden=16", "optimizer=sgd", "trainer.epochs=2",
            "sharpness=none", f"trainer.checkpoint_dir={ckpt}"]
    first = run_training(make_cfg(base))
    client = MlflowClient(mlflow_uri)
    client.delete_run(first["run_id"])

    again = run_training(make_cfg([*base, f"trainer.resume={ckpt}"]))
    assert again["run_id"] != first["run_id"]
    run = client.get_run(again["run_id"])
    assert run.data.tags["resumed_from"] == first["run_id"]
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(again["run_id"], "val_acc")] == [1, 2]
    for key in ("best_val_acc", "final_test_acc"):
        assert again[key] == first[key]


def test_a_retried_trial_with_another_trials_per_gpu_resumes_from_its_checkpoints(
    make_cfg, mlflow_uri: str, experiment_name: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sweep resumed with another hardware.trials_per_gpu (where trials run, not what they
    compute) continues its retried trials from their checkpoints, as a sweep worker hands
    them over (RunContext.resume_from); another optimizer.lr starts them at epoch 1."""
    from zsharp_sweeps.training.context import RunContext

    ckpt = tmp_path / "ckpt"
    base = [*TINY, "model=mlp", "model.params.hidden=16", "optimizer=sgd", "trainer.epochs=2",
            "sharpness=none", f"trainer.checkpoint_dir={ckpt}"]
    first = run_training(make_cfg(base))
    retry = RunContext(resume_from=ckpt, checkpoint_dir=tmp_path / "retry",
                       new_run_on_resume=True, run_name="t1 retry")
    with caplog.at_level("INFO"):
        again = run_training(make_cfg([*base, "hardware.trials_per_gpu=2"]), retry)
    assert "resuming from" in caplog.text and "after epoch 2" in caplog.text
    client = MlflowClient(mlflow_uri)
    assert client.get_run(again["run_id"]).data.tags["resumed_from"] == first["run_id"]
    assert again["best_val_acc"] == first["best_val_acc"]  # nothing trained again

    caplog.clear()
    with caplog.at_level("WARNING"):
        fresh = run_training(make_cfg([*base, "optimizer.lr=0.2"]), retry)
    assert "t1 retry starts at epoch 1" in caplog.text and "optimizer.lr" in caplog.text
    assert "resumed_from" not in client.get_run(fresh["run_id"]).data.tags


def _mlflow_epochs(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# Runs the real entry point; pauses right after the checkpoint of epoch PAUSE is on disk so
# the kill lands there and not a little later (epoch 3 would otherwise race the signal).
_PAUSING_ENTRY = """
import sys, time
import zsharp_sweeps.training.checkpoint as ck
_save = ck.Checkpointer.save
def save(self, epoch, state):
    path = _save(self, epoch, state)
    if epoch == {pause}:
        time.sleep(600)  # the test SIGKILLs the process here
    return path
ck.Checkpointer.save = save
from zsharp_sweeps.train import main
sys.argv = ["zsharp_sweeps.train", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_run_sigkilled_after_epoch_2_resumes_into_the_same_mlflow_run(
    make_cfg, mlflow_uri: str, experiment_name: str, tmp_path: Path
) -> None:
    overrides = [
        *TINY, "data=digits", "hardware=cpu", "model=mlp", "model.params.hidden=32",
        "optimizer=zsharp", "trainer.progress=false", "sharpness.num_batches=1",
        "sharpness.batch_size=32",
    ]
    # The run that is never interrupted.
    whole_dir = tmp_path / "whole"
    whole = run_training(make_cfg([*overrides, f"trainer.checkpoint_dir={whole_dir}"]))

    # The real entry point in a subprocess, SIGKILLed once epoch 2's checkpoint exists.
    out = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSING_ENTRY.format(pause=2), *overrides,
         f"hydra.run.dir={out}", f"tracking.uri={mlflow_uri}",
         f"tracking.experiment={experiment_name}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    checkpoints = out / "checkpoints"  # the default: <Hydra output dir>/checkpoints
    deadline = time.monotonic() + 240
    try:
        while not (checkpoints / "epoch-0002.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of epoch 2 after 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(checkpoints).name == "epoch-0002.pt"

    client = MlflowClient(mlflow_uri)
    killed_id = load_checkpoint(checkpoints / "epoch-0002.pt")["run_id"]
    assert client.get_run(killed_id).info.status == "RUNNING"  # SIGKILL: nobody ended it
    assert [s for s, _ in _mlflow_epochs(client, killed_id, "val_acc")] == [1, 2]

    resumed = run_training(make_cfg([
        *overrides, f"trainer.checkpoint_dir={checkpoints}", f"trainer.resume={checkpoints}",
    ]))
    assert resumed["run_id"] == killed_id  # the same MLflow run, reopened
    run = client.get_run(killed_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_after_epoch"] == "2"
    for key in ("val_acc", "val_loss", "train_loss", "test_acc", "lr", "sharpness/sam"):
        logged = _mlflow_epochs(client, killed_id, key)
        assert [s for s, _ in logged] == [1, 2, 3, 4], key  # each epoch exactly once
        assert logged == _mlflow_epochs(client, whole["run_id"], key), key
    for key in ("final_test_acc", "best_val_acc", "final_val_loss"):
        assert resumed[key] == whole[key], key
    final = load_checkpoint(checkpoints / "epoch-0004.pt")["model"]
    reference = load_checkpoint(whole_dir / "epoch-0004.pt")["model"]
    for key, value in reference.items():
        assert torch.equal(final[key], value), key
    assert [e for e, _ in list_checkpoints(checkpoints)] == [4]  # keep_checkpoints=last
