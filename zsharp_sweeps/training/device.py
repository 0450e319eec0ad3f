"""Which torch device a run computes on, and the process-wide settings that go with it."""

from __future__ import annotations

import random

import numpy as np
import torch

from zsharp_sweeps.config import ConfigError


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is missing is an error.

    A sweep worker passes its own device (``cuda:N``, or ``cpu:N``: a CPU worker's label).
    """
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"hardware.device={requested!r} but CUDA is not available on this machine: "
            "allowed here: auto, cpu"
        )
    if requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
        raise ConfigError(
            f"hardware.device={requested!r} but this machine has {torch.cuda.device_count()} "
            f"CUDA device(s): allowed cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
        )
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("hardware.device='mps' but MPS is not available: allowed here: auto, cpu")
    return torch.device(requested)


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
