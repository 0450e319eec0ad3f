"""Build the optimizer a config asks for.

Why a factory: configs name optimizers by string; this is the one place that maps
``OptimizerConfig`` fields onto constructor arguments, so a sweep over ``optimizer.*`` keys
reaches the optimizer without any glue in the trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from zsharp_sweeps.optim.fsam import FriendlySAM
from zsharp_sweeps.optim.sam import ASAM, SAM, SAMDirection, SAMMagnitude
from zsharp_sweeps.optim.zsharp import ZSharp

if TYPE_CHECKING:  # the optimizers themselves need no Hydra/OmegaConf
    from zsharp_sweeps.config import OptimizerConfig

PLAIN = ("sgd", "adam", "adamw")


def base_optimizer(
    name: str, cfg: OptimizerConfig, capturable: bool = False
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The torch optimizer class for ``name`` and its keyword arguments from ``cfg``.

    ``adam`` is ``torch.optim.Adam`` with coupled L2 weight decay: what the ZSharp paper calls
    its "AdamW" baseline. ``adamw`` is ``torch.optim.AdamW`` (decoupled decay).
    ``capturable``: keep Adam's step count on the device so a CUDA graph can replay the step.
    """
    if name == "sgd":
        return torch.optim.SGD, {
            "lr": cfg.lr,
            "momentum": cfg.momentum,
            "nesterov": cfg.nesterov,
            "weight_decay": cfg.weight_decay,
        }
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls, {
            "lr": cfg.lr,
            "betas": (float(cfg.betas[0]), float(cfg.betas[1])),
            "eps": cfg.eps,
            "weight_decay": cfg.weight_decay,
            **({"capturable": True} if capturable else {}),
        }
    raise ValueError(f"optimizer.base={name!r} is invalid: allowed one of {', '.join(PLAIN)}")


def build_optimizer(
    cfg: OptimizerConfig, model: nn.Module, *, capturable: bool = False
) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` describes, over ``model``'s trainable parameters.

    Plain optimizers (``sgd``, ``adam``, ``adamw``) are picked by ``cfg.name`` (``cfg.base`` is
    ignored for them); SAM-family ones wrap ``cfg.base``. SAM-family optimizers receive
    ``model.named_parameters()`` so ASAM can apply its rule by parameter name.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    if cfg.name in PLAIN:
        cls, kwargs = base_optimizer(cfg.name, cfg, capturable)
        return cls([p for _, p in named], **kwargs)
    base_cls, base_kwargs = base_optimizer(cfg.base, cfg, capturable)
    if cfg.name == "sam":
        return SAM(named, base_cls, rho=cfg.rho, adaptive=cfg.adaptive, **base_kwargs)
    if cfg.name == "asam":
        return ASAM(named, base_cls, rho=cfg.rho, eta=cfg.eta, **base_kwargs)
    if cfg.name == "fsam":
        return FriendlySAM(
            named, base_cls, rho=cfg.rho, sigma=cfg.sigma, lmbda=cfg.lmbda, **base_kwargs
        )
    if cfg.name == "zsharp":
        return ZSharp(
            named,
            base_cls,
            rho=cfg.rho,
            percentile=cfg.percentile,
            filter=cfg.filter,
            filter_seed=cfg.filter_seed,
            threshold_method=cfg.threshold_method,
            stats_streams=cfg.stats_streams,
            kernels=cfg.kernels,
            **base_kwargs,
        )
    if cfg.name == "sam_magnitude":
        return SAMMagnitude(named, base_cls, rho=cfg.rho, **base_kwargs)
    if cfg.name == "sam_direction":
        return SAMDirection(named, base_cls, rho=cfg.rho, **base_kwargs)
    raise ValueError(f"optimizer.name={cfg.name!r} is not a known optimizer")
