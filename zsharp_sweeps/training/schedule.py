"""Learning-rate schedules, stepped once per epoch.

Why per epoch: the paper recipe (5 warm-up epochs, then StepLR every 30 epochs) and the
study recipes are all stated in epochs, and an epoch-indexed LambdaLR is exact and easy to
resume. Built on ``LambdaLR`` so it works on the SAM wrappers, whose ``param_groups`` are
the base optimizer's.
"""

from __future__ import annotations

import math

import torch

from zsharp_sweeps.config import TrainerConfig


def lr_factor(epoch: int, cfg: TrainerConfig) -> float:
    """Multiplier of the base lr for 0-based ``epoch``: linear warm-up, then the schedule."""
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        return (epoch + 1) / cfg.warmup_epochs
    t = epoch - cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1)
    if cfg.scheduler == "none":
        return 1.0
    if cfg.scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t / span))
    if cfg.scheduler == "step":
        return cfg.gamma ** (t // cfg.step_size)
    if cfg.scheduler == "multistep":
        return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    raise ValueError(f"trainer.scheduler={cfg.scheduler!r} is not a known schedule")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainerConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """An epoch-stepped scheduler; call ``.step()`` after each epoch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, cfg))
