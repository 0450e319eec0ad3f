"""Which torch device a run computes on, and the process-wide settings that go with it."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from zsharp_sweeps.config import ConfigError


def hardware_choice(overrides: Sequence[str]) -> str | None:
    """``hardware=gpu_fast`` if the command line chose the hardware option (the last such
    override wins, as in Hydra) and did not set ``hardware.device`` itself, else None."""
    chosen = None
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if sep and key == "hardware":
            chosen = f"hardware={value}"
        elif key == "hardware.device":
            return None
    return chosen


def cuda_available() -> bool:
    """Whether this machine has a CUDA device, asked without starting CUDA where NVML answers.

    Why not ``torch.cuda.is_available()``: it calls ``cudaGetDeviceCount``, which starts the
    CUDA driver in the asking process and marks it unsafe to fork. A sweep's process that
    asked it (checking ``hardware=cuda`` before the study exists) then forked workers that
    could not use CUDA at all ("Cannot re-initialize CUDA in forked subprocess"): every GPU
    sweep with ``hardware=cuda`` or ``gpu_fast`` failed so. ``torch.cuda.device_count()``
    asks NVML first and falls back to the runtime only where NVML has no answer.
    """
    return torch.cuda.device_count() > 0


def resolve_device(requested: str, chosen_by: str | None = None) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is missing is an error.

    A sweep worker passes its own device (``cuda:N``, or ``cpu:N``: a CPU worker's label).
    ``chosen_by`` is what the user typed that asked for the device (``hardware=gpu_fast``,
    whose ``hardware.device`` is ``cuda``): the error names it, and what to use instead.
    """
    if requested == "auto":
        if cuda_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    problem, allowed = None, "auto, cpu"
    if requested.startswith("cuda") and not cuda_available():
        problem = "CUDA is not available on this machine"
    elif requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        problem = f"this machine has {count} CUDA device(s)"
        allowed = f"cuda:0 .. cuda:{count - 1}"
    elif requested == "mps" and not torch.backends.mps.is_available():
        problem = "MPS is not available"
    if problem is None:
        return torch.device(requested)
    if chosen_by is not None:
        raise ConfigError(
            f"{chosen_by} (hardware.device={requested!r}) but {problem}: use hardware=auto "
            "(the fastest device this machine has) or hardware=cpu instead."
        )
    raise ConfigError(f"hardware.device={requested!r} but {problem}: allowed here: {allowed}")


def use_device(device: torch.device, num_threads: int = 0) -> None:
    """Make ``device`` the current CUDA device (streams, CUDA graphs and cuDNN work on the
    current one) and set torch's CPU threads (``hardware.num_threads``; 0 keeps torch's)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if num_threads:
        torch.set_num_threads(num_threads)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
