"""Build the optimizer a config asks for, from the registry (``zsharp_sweeps.optim.registry``).

Why a factory: configs name optimizers by string; this is where ``OptimizerConfig`` fields
become constructor arguments, so a sweep over ``optimizer.*`` keys reaches the optimizer
without any glue in the trainer. The base optimizers (torch's own classes) are registered
here; each SAM-family optimizer registers its builder next to its class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from zsharp_sweeps.optim.registry import BASES, SAM_FAMILY, optimizer_names, register_base

if TYPE_CHECKING:  # the optimizers themselves need no Hydra/OmegaConf
    from zsharp_sweeps.config import OptimizerConfig


@register_base("sgd")
def _sgd(cfg: OptimizerConfig, capturable: bool) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    return torch.optim.SGD, {
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "nesterov": cfg.nesterov,
        "weight_decay": cfg.weight_decay,
    }


def _adam_kwargs(cfg: OptimizerConfig, capturable: bool) -> dict[str, Any]:
    return {
        "lr": cfg.lr,
        "betas": (float(cfg.betas[0]), float(cfg.betas[1])),
        "eps": cfg.eps,
        "weight_decay": cfg.weight_decay,
        **({"capturable": True} if capturable else {}),
    }


@register_base("adamw")
def _adamw(cfg: OptimizerConfig, capturable: bool) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    return torch.optim.AdamW, _adam_kwargs(cfg, capturable)


@register_base("adam")
def _adam(cfg: OptimizerConfig, capturable: bool) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    return torch.optim.Adam, _adam_kwargs(cfg, capturable)


def base_optimizer(
    name: str, cfg: OptimizerConfig, capturable: bool = False
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The torch optimizer class for ``name`` and its keyword arguments from ``cfg``.

    ``adam`` is ``torch.optim.Adam`` with coupled L2 weight decay: what the ZSharp paper calls
    its "AdamW" baseline. ``adamw`` is ``torch.optim.AdamW`` (decoupled decay).
    ``capturable``: keep Adam's step count on the device so a CUDA graph can replay the step.
    """
    if name not in BASES:
        raise ValueError(f"optimizer.base={name!r} is invalid: allowed one of {', '.join(BASES)}")
    return BASES[name](cfg, capturable)


def build_optimizer(
    cfg: OptimizerConfig, model: nn.Module, *, capturable: bool = False
) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` describes, over ``model``'s trainable parameters.

    Plain optimizers (the bases: ``sgd``, ``adam``, ``adamw``) are picked by ``cfg.name``
    (``cfg.base`` is ignored for them); SAM-family ones wrap ``cfg.base``. SAM-family
    optimizers receive ``model.named_parameters()`` so ASAM can apply its rule by name.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    if cfg.name in BASES:
        cls, kwargs = base_optimizer(cfg.name, cfg, capturable)
        return cls([p for _, p in named], **kwargs)
    if cfg.name not in SAM_FAMILY:
        raise ValueError(
            f"optimizer.name={cfg.name!r} is invalid: allowed one of {', '.join(optimizer_names())}"
        )
    base_cls, base_kwargs = base_optimizer(cfg.base, cfg, capturable)
    return SAM_FAMILY[cfg.name](named, base_cls, base_kwargs, cfg)
