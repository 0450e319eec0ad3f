"""A real sweep over two GPUs: two workers, more trials than workers, ZSharp's Triton
kernels on (``optimizer.kernels=auto`` picks them on CUDA). Every trial runs on its worker's
GPU, and no worker crashes when its second trial starts on the same device. Each worker
process sees only its own GPU (``CUDA_VISIBLE_DEVICES`` set to that card's UUID)."""

from __future__ import annotations

from pathlib import Path

import torch
from optuna.trial import TrialState

from ...sweep_helpers import load_study, mlflow_runs, run_sweep


def test_two_workers_on_two_gpus_run_more_trials_than_workers(tmp_path: Path) -> None:
    run_sweep(
        tmp_path, "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2", "hardware=cuda",
        "hardware.precision=bf16", "hardware.cuda_graph=true", "optimizer=zsharp",
        "model=resnet20", "trainer.epochs=1", "data.batch_size=128",
        base=("--multirun", "+sweep=zsharp_rho_qp_lr", "data=digits", "trainer.progress=false",
              "sharpness.num_batches=1", "sharpness.batch_size=32"),
    )
    trials = load_study(tmp_path, "zsharp_rho_qp_lr-resnet20-digits").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    devices = {t.user_attrs["worker"]["device"] for t in trials}
    assert devices == {"cuda:0", "cuda:1"}
    for trial in trials:  # alone with its card: computes on cuda:0, read back as the right card
        worker = trial.user_attrs["worker"]
        uuid = str(torch.cuda.get_device_properties(int(worker["device"][5:])).uuid)
        assert worker["gpu"].removeprefix("GPU-") == uuid.removeprefix("GPU-"), worker
        assert worker["compute_device"] == "cuda:0", worker
    _, parents, children = mlflow_runs(tmp_path)
    assert [p.info.status for p in parents] == ["FINISHED"]
    by_number = {int(c.data.tags["trial_number"]): c for c in children}
    for trial in trials:  # the MLflow device tag is the worker's GPU
        assert by_number[trial.number].data.tags["device"] == trial.user_attrs["worker"]["device"]
    per_worker = {}
    for trial in trials:
        per_worker.setdefault(trial.user_attrs["worker"]["index"], []).append(trial.number)
    # A worker's second trial on its GPU is where the batch launcher used to crash.
    assert len(per_worker) == 2 and max(len(v) for v in per_worker.values()) >= 2, per_worker
