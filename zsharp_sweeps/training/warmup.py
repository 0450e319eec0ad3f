"""A sweep worker's warm-up: a few real training steps before its first trial.

Why: a worker's first trial used to pay, inside its first epoch, for everything a process
does once (measured on an H200, 4 workers, ResNet-20 trials: about 31 s in graph mode and
49 s with ``torch.compile``): the dataset built on the device, cuDNN's algorithm search for
every convolution shape, the first CUDA-graph capture, Triton's compile of ZSharp's fused
kernels, Dynamo and Inductor. Those all stay warm in the process afterwards, so paying them
once, before the worker asks for a trial, leaves every trial (the first included) with only
its own epochs; pruning compares first and later trials on equal terms, and the
``overhead_s`` a sweep reports stops hiding set-up in trial time.

What runs, whatever the device: the tracking store's first connection (MLflow checks its
schema: seconds) and the dataset put on the device. Then, where ``hardware.warmup_steps``
asks for them (by default on CUDA only: a CPU has nothing to tune or compile), training steps:
the sweep's base configuration (its fixed settings; swept ones at their config
defaults) on the worker's device, resolved exactly as a trial resolves it (``hardware=auto``
included), on a throwaway model: ``hardware.warmup_steps`` optimizer steps (enough for a
CUDA graph's eager steps, its capture and replays), one evaluation of the validation and test
splits (their batch shapes; a compiled model's eval graph) and one sharpness measurement. The
data bundle goes into the worker's ``DataCache``, where the first trial finds it. Trials
reseed everything, so a warm-up changes no trial's numbers (``tests/test_warmup.py``).

With ``torch.compile`` on, the first warm-up of a model and shape on a host compiles alone (a
lock file in the compile cache) and the host's other workers wait for it, then load its
kernels from the on-disk cache side by side: the compile is paid once per host and shape, not
once per worker (a later sweep finds the shape done and waits for nothing).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from filelock import FileLock
from omegaconf import DictConfig

from zsharp_sweeps.config import TrainConfig, validate
from zsharp_sweeps.tracking import Tracker
from zsharp_sweeps.training.build import build_parts, build_step
from zsharp_sweeps.training.context import DataCache, RunContext
from zsharp_sweeps.training.device import seed_everything, use_device
from zsharp_sweeps.training.engine import evaluate
from zsharp_sweeps.training.hardware import compile_cache_dir
from zsharp_sweeps.training.run import prepare, sharpness_fn
from zsharp_sweeps.training.signals import check_stop

log = logging.getLogger(__name__)

#: ``hardware.warmup_steps=null`` (auto): steps on CUDA (a graph's 3 eager steps, its
#: capture, replays); none elsewhere (a CPU has no kernels to compile or tune).
AUTO_CUDA_STEPS = 8


@dataclass(frozen=True)
class WarmupResult:
    """What a warm-up did: ``steps`` taken (0: skipped, ``reason`` says why), in
    ``seconds``, of which ``waited_s`` waiting for another worker's compile."""

    steps: int
    seconds: float
    mode: str = ""
    waited_s: float = 0.0
    reason: str = ""

    def line(self, who: str) -> str:
        if not self.steps:
            return (f"{who} opened the tracking store and loaded the data in "
                    f"{self.seconds:.1f}s (no training steps: {self.reason})")
        waited = (f", {self.waited_s:.1f}s of it waiting for the host's compile"
                  if self.waited_s >= 0.1 else "")
        return (f"{who} warmed up in {self.seconds:.1f}s ({self.steps} steps, {self.mode}"
                f"{waited}); its trials start warm")


def warmup_steps(cfg: TrainConfig, device: torch.device) -> int:
    """``hardware.warmup_steps``, with null resolved for ``device``."""
    steps = cfg.hardware.warmup_steps
    if steps is None:
        return AUTO_CUDA_STEPS if device.type == "cuda" else 0
    return steps


@contextlib.contextmanager
def _compile_turn(cfg: TrainConfig) -> Iterator[float]:
    """With compile on, wait until this model and shape is in the host's compile cache
    (yields the seconds spent waiting); a no-op otherwise.

    The first worker of a host to get here compiles while holding a lock file in the cache,
    and marks the shape done; the others wait for that, then load from the cache side by
    side (measured on an H100, 4 workers: holding the lock through every worker's warm-up
    made the last wait 84 s; a warm cache needs no turns at all)."""
    cache = compile_cache_dir(cfg.hardware.compile_cache) if cfg.hardware.compile else None
    if cache is None:
        yield 0.0
        return
    shape = repr((cfg.model, cfg.data.name, cfg.data.batch_size, cfg.data.image_size,
                  cfg.hardware.precision, cfg.hardware.channels_last, cfg.hardware.cuda_graph,
                  type(cfg.optimizer).__name__, torch.__version__))
    key = hashlib.sha1(shape.encode()).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    done = Path(cache) / f"warmup-{key}.done"
    if done.exists():
        yield 0.0
        return
    start = time.perf_counter()
    lock = FileLock(str(Path(cache) / f"warmup-{key}.lock"))
    lock.acquire()
    waited = time.perf_counter() - start
    if done.exists():  # compiled by the worker we waited for: load side by side
        lock.release()
        yield waited
        return
    try:
        yield waited
        done.touch()
    finally:
        lock.release()


def warm_up(cfg: DictConfig | TrainConfig, context: RunContext) -> WarmupResult:
    """Open ``cfg``'s tracking store, put its data on ``context.device`` (kept in
    ``context.data_cache``) and run its first ``hardware.warmup_steps`` steps on a throwaway
    model (see the module docstring)."""
    started = time.perf_counter()
    train_cfg = cfg if isinstance(cfg, TrainConfig) else validate(cfg)
    prepared = prepare(train_cfg, context)
    tcfg, device = prepared.cfg, prepared.device
    use_device(device, tcfg.hardware.num_threads)
    # What every process pays once whatever the device: the store's first connection (its
    # schema check takes seconds) and the dataset on the device.
    Tracker(tcfg.tracking)
    cache = context.data_cache if context.data_cache is not None else DataCache()
    data = cache.get(tcfg.data, device, tcfg.seed)
    steps = warmup_steps(tcfg, device)
    mode = prepared.tags.get("hardware_mode", tcfg.hardware.precision)
    if steps == 0:
        why = ("hardware.warmup_steps=0" if tcfg.hardware.warmup_steps == 0
               else f"hardware.warmup_steps=null trains steps on CUDA only, this is {device.type}")
        return WarmupResult(0, time.perf_counter() - started, mode, reason=why)
    with _compile_turn(tcfg) as waited:
        seed_everything(tcfg.seed, tcfg.hardware.deterministic)
        data, model, optimizer = build_parts(tcfg, device, data=data)
        run_step = build_step(tcfg, model, optimizer)
        model.train()
        taken = 0
        for inputs, targets in islice(data.train, steps):
            check_stop()  # Ctrl-C and SIGTERM act here as between a trial's steps
            run_step(inputs, targets)
            taken += 1
        hw = tcfg.hardware
        for split in (data.val, data.test):
            if split is not None:
                evaluate(run_step.model, split, amp_dtype=run_step.amp_dtype,
                         channels_last=hw.channels_last)
        measure = sharpness_fn(tcfg, data)
        if measure is not None:
            measure(model, 1, False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return WarmupResult(taken, time.perf_counter() - started, mode, waited)
