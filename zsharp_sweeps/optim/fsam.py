"""Friendly-SAM (Li et al., CVPR 2024), as nblt/F-SAM's ``utils.py`` computes it (checked).

Per tensor, with ``g`` the gradient at ``w``: on the first step ``m <- g`` and ``d = g``;
afterwards ``d = g - sigma * m`` and then ``m <- lmbda * m + (1 - lmbda) * g`` (the
un-modified ``g``). ``e = rho * d / (||d|| + 1e-12)`` with the norm over all tensors. The
official ZSharp code runs it with ``sigma = 1``, ``lmbda = 0.9``.

Differences from the official class, none of which change the numbers of a normal step:
it subtracts from ``p.grad`` in place (we leave ``.grad`` alone); it updates ``m`` inside
``first_step`` (we compute the new ``m`` there and store it when the step is actually taken,
so a step that GradScaler skips on inf/NaN does not poison ``m`` for the rest of training);
it iterates parameters without a gradient and crashes on them (we skip them).

``m`` is created once (a copy of the first ``g``) and from then on overwritten in place:
a CUDA graph that captured the step keeps reading the tensor it saw at capture, so storing a
new tensor instead (``state[p]["momentum"] = new_m``) would let every replay restart from the
captured step's ``m`` (measured: 6.3e-3 off eager after 30 steps of a 3-layer MLP).
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


class FriendlySAM(SAMBase):
    """Friendly-SAM: SAM whose ascent removes the gradient's running mean (``sigma * m``).

    ``adaptive=True`` scales like davda54's adaptive SAM (``w^2 * d / ||w * d||``), as the
    official class allows; the recipes leave it off.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if sigma < 0:
            raise ValueError(f"sigma={sigma!r} is invalid: allowed >= 0")
        if not 0 <= lmbda < 1:
            raise ValueError(f"lmbda={lmbda!r} is invalid: allowed [0, 1)")
        super().__init__(
            params,
            base_optimizer,
            sam_defaults={"rho": rho, "adaptive": adaptive},
            base_kwargs=base_kwargs,
        )
        self.sigma = sigma
        self.lmbda = lmbda
        # What _commit stores: (param, new momentum tensor) on a parameter's first step, and
        # (params, values) to copy into the existing momentum tensors on later steps.
        self._pending_new: list[tuple[Tensor, Tensor]] = []
        self._pending_update: tuple[list[Tensor], list[Tensor]] = ([], [])

    def _perturbation(self, groups: Groups) -> list[Tensor]:
        params = [p for _, ps in groups for p in ps]
        fresh = [p for p in params if "momentum" not in self.state[p]]
        seen = [p for p in params if "momentum" in self.state[p]]
        d: dict[Tensor, Tensor] = {p: p.grad for p in fresh}
        self._pending_new = [(p, p.grad.clone()) for p in fresh]
        self._pending_update = ([], [])
        if seen:
            grads = [p.grad for p in seen]
            ms = [self.state[p]["momentum"] for p in seen]
            for p, di in zip(seen, torch._foreach_sub(grads, torch._foreach_mul(ms, self.sigma)), strict=True):
                d[p] = di
            new_m = torch._foreach_add(
                torch._foreach_mul(ms, self.lmbda), torch._foreach_mul(grads, 1 - self.lmbda)
            )
            self._pending_update = (seen, list(new_m))
        if not params:
            return []
        scaled: list[Tensor] = []
        for group, ps in groups:
            ds = [d[p] for p in ps]
            scaled += torch._foreach_mul(ds, torch._foreach_abs(ps)) if group["adaptive"] else ds
        norm = global_norm(scaled)
        out: list[Tensor] = []
        for group, ps in groups:
            if not ps:
                continue
            e = torch._foreach_mul([d[p] for p in ps], group["rho"] / (norm + 1e-12))
            if group["adaptive"]:
                e = torch._foreach_mul(e, torch._foreach_mul(ps, ps))
            out += e
        return out

    def _commit(self) -> None:
        for p, m in self._pending_new:
            self.state[p]["momentum"] = m
        params, new_ms = self._pending_update
        if params:  # in place: the tensors a CUDA graph captured
            torch._foreach_copy_([self.state[p]["momentum"] for p in params], new_ms)
        self._pending_new, self._pending_update = [], ([], [])


@register_sam("fsam")
def _fsam(named: NamedParams, base: type[torch.optim.Optimizer], base_kwargs: dict[str, Any],
          cfg: OptimizerConfig) -> FriendlySAM:
    """``optimizer=fsam`` (zsharp_sweeps.optim.registry)."""
    return FriendlySAM(named, base, rho=cfg.rho, sigma=cfg.sigma, lmbda=cfg.lmbda, **base_kwargs)
