"""SAM, ASAM and the two "direction vs magnitude" variants of SAM's descent step.

Formulas (docs/algorithms.md), with ``g`` the gradient at ``w`` and norms over all parameters together:

* SAM (Foret et al.; davda54/sam): ``e = rho * g / (||g|| + 1e-12)``. With ``adaptive=True``
  it is davda54's adaptive form: ``e = rho * w^2 * g / (||w * g|| + 1e-12)`` on every parameter.
* ASAM (Kwon et al.; SamsungLabs/ASAM ``asam.py``, checked): ``T = |w| + eta`` for parameters
  whose *name* contains ``"weight"`` (norm-layer scales included), ``T = 1`` otherwise;
  ``e = rho * T^2 * g / (||T * g|| + 1e-16)``.
* SAM-magnitude: descend along ``||g'|| * g / ||g||`` (SAM's magnitude, SGD's direction).
* SAM-direction: descend along ``||g|| * g' / ||g'||`` (SAM's direction, SGD's magnitude).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from zsharp_sweeps.optim.base import Groups, SAMBase, global_norm
from zsharp_sweeps.optim.registry import NamedParams, register_sam

if TYPE_CHECKING:
    from zsharp_sweeps.config import OptimizerConfig


class SAM(SAMBase):
    """Sharpness-Aware Minimization around any base optimizer (davda54/sam's interface).

    ``SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)``: keyword
    arguments other than ``rho``/``adaptive`` go to the base optimizer.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            base_optimizer,
            sam_defaults={"rho": rho, "adaptive": adaptive},
            base_kwargs=base_kwargs,
        )

    def _perturbation(self, groups: Groups) -> list[Tensor]:
        return self._ascent(groups)[0]

    def _ascent(self, groups: Groups) -> tuple[list[Tensor], Tensor | None]:
        """``e`` for every parameter with a gradient, and the norm it was divided by
        (``||g||``, or ``||w * g||`` when adaptive; None without gradients)."""
        # davda54: scale = rho / (||(|w| if adaptive) * g|| + 1e-12); e = (w^2 if adaptive) * g * scale
        scaled: list[Tensor] = []
        for group, ps in groups:
            grads = [p.grad for p in ps]
            scaled += torch._foreach_mul(grads, torch._foreach_abs(ps)) if group["adaptive"] else grads
        if not scaled:
            return [], None
        norm = global_norm(scaled)
        out: list[Tensor] = []
        for group, ps in groups:
            if not ps:
                continue
            scale = group["rho"] / (norm + 1e-12)
            e = torch._foreach_mul([p.grad for p in ps], scale)
            if group["adaptive"]:
                e = torch._foreach_mul(e, torch._foreach_mul(ps, ps))
            out += e
        return out, norm


class ASAM(SAMBase):
    """Adaptive SAM (Kwon et al. 2021) as SamsungLabs/ASAM's ``asam.py`` computes it.

    The official code rescales by ``T = |w| + eta`` every parameter whose name contains
    ``"weight"`` (so BatchNorm/LayerNorm scales too) and leaves the others (biases) at
    ``T = 1``. Pass ``model.named_parameters()`` to get exactly that rule (``build_optimizer``
    does). Without names the rule falls back to ``T = |w| + eta`` for tensors with more than
    one dimension (conv/linear/embedding weights) and ``T = 1`` for 1-D tensors, which differs
    from the official code only on norm-layer scales.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.5,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        if eta < 0:
            raise ValueError(f"eta={eta!r} is invalid: allowed >= 0")
        super().__init__(
            params,
            base_optimizer,
            sam_defaults={"rho": rho, "eta": eta, "adaptive": True},
            base_kwargs=base_kwargs,
        )

    def _is_weight(self, p: Tensor) -> bool:
        name = self.param_names.get(p)
        return ("weight" in name) if name is not None else p.ndim > 1

    def _perturbation(self, groups: Groups) -> list[Tensor]:
        # Official: g *= T; norm = ||T g|| + 1e-16; g *= T; eps = T^2 g * (rho / norm).
        parts = []
        tg_all: list[Tensor] = []
        for group, ps in groups:
            w_ps = [p for p in ps if self._is_weight(p)]
            o_ps = [p for p in ps if not self._is_weight(p)]
            t = torch._foreach_add(torch._foreach_abs(w_ps), group["eta"]) if w_ps else []
            tg = list(torch._foreach_mul([p.grad for p in w_ps], t)) if w_ps else []
            parts.append((group, w_ps, o_ps, t, tg))
            tg_all += tg + [p.grad for p in o_ps]
        if not tg_all:
            return []
        norm = global_norm(tg_all) + 1e-16
        e_by_param: dict[Tensor, Tensor] = {}
        for group, w_ps, o_ps, t, tg in parts:
            scale = group["rho"] / norm
            if w_ps:
                for p, e in zip(w_ps, torch._foreach_mul(torch._foreach_mul(tg, t), scale), strict=True):
                    e_by_param[p] = e
            if o_ps:
                for p, e in zip(o_ps, torch._foreach_mul([p.grad for p in o_ps], scale), strict=True):
                    e_by_param[p] = e
        return [e_by_param[p] for _, ps in groups for p in ps]


class _StoredFirstGradient(SAM):
    """SAM's ascent, remembering ``g`` and ``||g||`` for a rescaled descent step.

    Both live in buffers created once and overwritten in place every step (``copy_``), so a
    CUDA graph that captured the step reads this step's values when it replays.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho=rho, adaptive=False, **base_kwargs)
        self._first_grads: dict[Tensor, Tensor] = {}
        self._first_norm: Tensor | None = None

    def _perturbation(self, groups: Groups) -> list[Tensor]:
        e, norm = self._ascent(groups)
        params = [p for _, ps in groups for p in ps]
        if norm is None:
            return e
        bufs = []
        for p in params:
            buf = self._first_grads.get(p)
            if buf is None or buf.shape != p.grad.shape or buf.dtype != p.grad.dtype:
                buf = torch.empty_like(p.grad)
                self._first_grads[p] = buf
            bufs.append(buf)
        torch._foreach_copy_(bufs, [p.grad for p in params])
        if (
            self._first_norm is None
            or self._first_norm.device != norm.device
            or self._first_norm.dtype != norm.dtype
        ):
            self._first_norm = torch.empty_like(norm)
        self._first_norm.copy_(norm)
        return e

    def _second_grads(self) -> tuple[list[Tensor], Tensor | None]:
        with_grad = [p for p in self._perturbed if p.grad is not None]
        return with_grad, (global_norm([p.grad for p in with_grad]) if with_grad else None)


class SAMMagnitude(_StoredFirstGradient):
    """SAM's ascent; descent along ``||g'|| * g / (||g|| + 1e-12)``: SGD's direction with
    SAM's magnitude (the direction-vs-magnitude study). The ``1e-12`` guards ``g = 0``."""

    def _descent_gradients(self) -> None:
        with_grad, norm2 = self._second_grads()
        if norm2 is None:
            return
        ratio = norm2 / (self._first_norm + 1e-12)
        for p in self._perturbed:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_copy_(
            [p.grad for p in self._perturbed],
            torch._foreach_mul([self._first_grads[p] for p in self._perturbed], ratio),
        )


class SAMDirection(_StoredFirstGradient):
    """SAM's ascent; descent along ``||g|| * g' / (||g'|| + 1e-12)``: SAM's direction with
    SGD's magnitude (the direction-vs-magnitude study). The ``1e-12`` guards ``g' = 0``."""

    def _descent_gradients(self) -> None:
        with_grad, norm2 = self._second_grads()
        if norm2 is None:
            return
        torch._foreach_mul_([p.grad for p in with_grad], self._first_norm / (norm2 + 1e-12))


# --- builders from a config (zsharp_sweeps.optim.registry) -----------------------------------
@register_sam("sam")
def _sam(named: NamedParams, base: type[torch.optim.Optimizer], base_kwargs: dict[str, Any],
         cfg: OptimizerConfig) -> SAM:
    return SAM(named, base, rho=cfg.rho, adaptive=cfg.adaptive, **base_kwargs)


@register_sam("asam")
def _asam(named: NamedParams, base: type[torch.optim.Optimizer], base_kwargs: dict[str, Any],
          cfg: OptimizerConfig) -> ASAM:
    return ASAM(named, base, rho=cfg.rho, eta=cfg.eta, **base_kwargs)


@register_sam("sam_magnitude")
def _sam_magnitude(named: NamedParams, base: type[torch.optim.Optimizer],
                   base_kwargs: dict[str, Any], cfg: OptimizerConfig) -> SAMMagnitude:
    return SAMMagnitude(named, base, rho=cfg.rho, **base_kwargs)


@register_sam("sam_direction")
def _sam_direction(named: NamedParams, base: type[torch.optim.Optimizer],
                   base_kwargs: dict[str, Any], cfg: OptimizerConfig) -> SAMDirection:
    return SAMDirection(named, base, rho=cfg.rho, **base_kwargs)
