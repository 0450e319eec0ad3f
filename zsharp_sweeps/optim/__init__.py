"""The SAM family of optimizers, the factory that builds one from config, and one train step.

Usable without Hydra::

    from zsharp_sweeps.optim import ZSharp, train_step
    opt = ZSharp(model.named_parameters(), torch.optim.SGD, rho=0.05, percentile=0.95,
                 lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss, logits = train_step(model, opt, loss_fn, x, y)
"""

from zsharp_sweeps.optim.base import SAMBase, disable_running_stats, enable_running_stats
from zsharp_sweeps.optim.factory import base_optimizer, build_optimizer
from zsharp_sweeps.optim.fsam import FriendlySAM
from zsharp_sweeps.optim.sam import ASAM, SAM, SAMDirection, SAMMagnitude
from zsharp_sweeps.optim.step import is_sam_family, train_step
from zsharp_sweeps.optim.threshold import zscore_masks
from zsharp_sweeps.optim.zsharp import ZSharp

FSAM = FriendlySAM

__all__ = [
    "ASAM",
    "FSAM",
    "SAM",
    "FriendlySAM",
    "SAMBase",
    "SAMDirection",
    "SAMMagnitude",
    "ZSharp",
    "base_optimizer",
    "build_optimizer",
    "disable_running_stats",
    "enable_running_stats",
    "is_sam_family",
    "train_step",
    "zscore_masks",
]
