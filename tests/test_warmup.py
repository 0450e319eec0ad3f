"""A sweep worker's warm-up (training/warmup.py): what it runs, that it changes no trial's
numbers, when it is on, and that a host's compiles take turns."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from omegaconf import DictConfig

from zsharp_sweeps.config import ConfigError, validate
from zsharp_sweeps.training.context import DataCache, RunContext
from zsharp_sweeps.training.run import run_training
from zsharp_sweeps.training.warmup import AUTO_CUDA_STEPS, _compile_turn, warm_up, warmup_steps

TINY = ["data=digits", "hardware=cpu", "model=mlp", "model.params.hidden=16", "tracking=off",
        "trainer.epochs=2", "trainer.progress=false", "sharpness.num_batches=1",
        "sharpness.batch_size=32", "optimizer=zsharp"]


def test_a_warm_up_changes_no_trial_numbers(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg([*TINY, "hardware.warmup_steps=3"], fast=False)
    cold = run_training(cfg, RunContext())

    cache = DataCache()
    result = warm_up(cfg, RunContext(data_cache=cache))
    assert result.steps == 3 and result.seconds > 0 and result.mode == "fp32"
    warm = run_training(cfg, RunContext(data_cache=cache))
    assert cache.hits == 1  # the trial trained on the data the warm-up built
    # Every epoch's numbers (losses, accuracies, sharpness) are the same as a cold start's.
    drop = ("epoch_time_s", "epoch_wall_s", "train_images_per_s")
    assert [{k: v for k, v in row.items() if k not in drop} for row in warm["history"]] == [
        {k: v for k, v in row.items() if k not in drop} for row in cold["history"]]
    assert warm["final_test_acc"] == cold["final_test_acc"]


def test_warm_up_is_on_for_cuda_only_unless_asked(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = validate(make_cfg(TINY, fast=False))
    assert cfg.hardware.warmup_steps is None
    assert warmup_steps(cfg, torch.device("cuda")) == AUTO_CUDA_STEPS
    assert warmup_steps(cfg, torch.device("cpu")) == 0
    assert warmup_steps(cfg, torch.device("mps")) == 0
    explicit = replace(cfg, hardware=replace(cfg.hardware, warmup_steps=5))
    assert warmup_steps(explicit, torch.device("cpu")) == 5
    off = replace(cfg, hardware=replace(cfg.hardware, warmup_steps=0))
    assert warmup_steps(off, torch.device("cuda")) == 0
    # On this CPU the default skips it, and says why.
    skipped = warm_up(cfg, RunContext())
    assert skipped.steps == 0 and "CUDA only" in skipped.reason
    with pytest.raises(ConfigError, match=r"hardware\.warmup_steps=-1.*>= 0"):
        validate(make_cfg([*TINY, "hardware.warmup_steps=-1"], fast=False))


def test_a_hosts_first_compile_of_a_model_runs_alone(
        make_cfg: Callable[..., DictConfig], tmp_path) -> None:
    cfg = validate(make_cfg(TINY, fast=False))
    compiled = replace(cfg, hardware=replace(cfg.hardware, compile=True,
                                             compile_cache=str(tmp_path / "cache")))
    inside: list[tuple[str, float, float]] = []

    def worker(name: str, config) -> None:
        with _compile_turn(config):
            start = time.perf_counter()
            time.sleep(0.3)
            inside.append((name, start, time.perf_counter()))

    def together(config) -> bool:
        inside.clear()
        threads = [threading.Thread(target=worker, args=(n, config)) for n in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        (_, s1, e1), (_, s2, _) = sorted(inside, key=lambda x: x[1])
        return s2 < e1

    # A cold cache: the second waits until the first has compiled (then loads its kernels).
    assert not together(compiled)
    assert len(list((tmp_path / "cache").glob("warmup-*.done"))) == 1
    # That shape is done on this host: later workers and sweeps warm up side by side.
    assert together(compiled)
    # Another model is another compile: one at a time again.
    other = replace(compiled, model=replace(compiled.model, params={"hidden": 8}))
    assert not together(other)
    # Without compile nothing waits (cuDNN and graphs are per process anyway).
    assert together(cfg)
