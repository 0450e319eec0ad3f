"""Optimizer names -> builders: the one table that ``optimizer.name`` and ``optimizer.base``
are resolved against.

Why a registry: the config schema (which names and settings are allowed), the factory (how a
name becomes an optimizer) and the error messages must agree. Each optimizer registers its own
builder next to its class, so adding one is its module (class + ``@register_sam``), its import
in ``zsharp_sweeps/optim/__init__.py``, its schema and ``conf/optimizer/<name>.yaml``; nothing
else lists names but the schema (``zsharp_sweeps.config.OPTIMIZER_SCHEMAS``, one per
optimizer), which every registered name must have. The builders receive that optimizer's
config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from zsharp_sweeps.config import OptimizerConfig

NamedParams = list[tuple[str, Tensor]]
#: ``(torch optimizer class, its keyword arguments)`` for a base optimizer.
BaseSpec = tuple[type[torch.optim.Optimizer], dict[str, Any]]
#: ``(cfg, capturable) -> BaseSpec``; ``capturable``: state a CUDA graph can replay.
BaseBuilder = Callable[["OptimizerConfig", bool], BaseSpec]
#: ``(named params, base class, base kwargs, cfg) -> optimizer`` for a SAM-family optimizer.
SamBuilder = Callable[
    [NamedParams, type[torch.optim.Optimizer], dict[str, Any], "OptimizerConfig"],
    torch.optim.Optimizer,
]
B = TypeVar("B", bound=Callable[..., Any])

#: Base optimizers: valid as ``optimizer.base`` and, on their own, as ``optimizer.name``.
BASES: dict[str, BaseBuilder] = {}
#: Two-pass (SAM-family) optimizers, built around ``optimizer.base``.
SAM_FAMILY: dict[str, SamBuilder] = {}


def _register(table: dict[str, Any], name: str) -> Callable[[B], B]:
    from zsharp_sweeps.config import OPTIMIZER_SCHEMAS

    def add(builder: B) -> B:
        if name in BASES or name in SAM_FAMILY:
            raise ValueError(f"optimizer {name!r} is registered twice")
        if name not in OPTIMIZER_SCHEMAS:
            raise ValueError(
                f"optimizer {name!r} has no schema: add its settings to OPTIMIZER_SCHEMAS in "
                "zsharp_sweeps/config/schema.py (and conf/optimizer/<name>.yaml)")
        table[name] = builder
        return builder

    return add


def register_base(name: str) -> Callable[[B], B]:
    """Register a base optimizer's ``(cfg, capturable) -> (class, kwargs)`` under ``name``."""
    return _register(BASES, name)


def register_sam(name: str) -> Callable[[B], B]:
    """Register a SAM-family ``(named, base_cls, base_kwargs, cfg) -> optimizer`` builder."""
    return _register(SAM_FAMILY, name)


def optimizer_names() -> tuple[str, ...]:
    """Every valid ``optimizer.name``: the bases, then the SAM family, in registration order."""
    return (*BASES, *SAM_FAMILY)
