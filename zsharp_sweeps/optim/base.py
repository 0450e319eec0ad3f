"""The two-pass machinery every SAM-family optimizer shares, and BatchNorm helpers.

Interface (davda54/sam's, which users paste into their loops)::

    loss_fn(model(x), y).backward()          # gradient g at w
    optimizer.first_step(zero_grad=True)      # w <- w + e(g)
    disable_running_stats(model)              # optional: keep BN statistics out of pass 2
    loss_fn(model(x), y).backward()          # gradient g' at w + e
    enable_running_stats(model)
    optimizer.second_step(zero_grad=True)     # w <- w, base optimizer steps with g'

Design choices (and why):

* ``param_groups`` are the base optimizer's own list of dicts, so LR schedulers, ``lr`` edits
  and checkpoints made through the wrapper act on the base optimizer.
* The weights are restored from a backup, as davda54/sam does since it stopped subtracting
  ``e`` (``(w + e) - e`` is not ``w`` in floating point, and a skipped fp16 step must leave
  the weights exactly as they were); copied in place rather than by rebinding ``p.data``
  (davda54's ``p.data = old_p``), so a parameter keeps the storage a CUDA graph captured.
* Transient buffers (the backup, ZSharp's layouts, the stored first gradient) live outside
  ``self.state`` so ``state_dict()`` holds only what must survive a restart (the base
  optimizer's state, FSAM's momentum, ZSharp's random-filter generator).
* Everything runs with ``torch._foreach_*`` ops over all tensors; nothing reads a tensor value
  on the host, so a step queues on the GPU without synchronising.
* Capture-safe state: once created (in the first step), every tensor a step reads from one
  step to the next (the base optimizer's buffers, FSAM's momentum, the backup, the stored
  first gradient and its norm) is updated in place (``copy_``, ``mul_``, ...), never rebound
  to a new tensor. A CUDA graph (:mod:`zsharp_sweeps.graphs`) records the addresses it reads;
  a rebound tensor would be invisible to its replays, which would keep reading the stale one.
  Random draws use generators listed by :meth:`SAMBase.graph_generators`, which the graph
  registers so that each replay advances them. ``tests/test_capture_safety.py`` pins both.
* Parameters may be given as ``model.named_parameters()`` (pairs ``(name, tensor)``); names are
  kept in ``param_names`` for rules that need them (ASAM's "weight" rule) and stripped before
  the parameters reach ``torch.optim.Optimizer`` (so any PyTorch >= 2.4 works).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from zsharp_sweeps.optim.checks import check_rho

#: ``(param_group, [its parameters that have a gradient])`` for every group, in order: what
#: :meth:`SAMBase._perturbation` receives.
Groups = list[tuple[dict[str, Any], list[Tensor]]]

_FLAG = "_sam_running_stats_frozen"

# idle -> first_step -> ascended -> restore -> restored -> descent gradients -> prepared -> idle
_IDLE, _ASCENDED, _RESTORED, _PREPARED = "idle", "ascended", "restored", "prepared"


def disable_running_stats(model: nn.Module) -> None:
    """Stop BatchNorm layers from updating running statistics (for SAM's second pass).

    davda54/sam sets ``momentum = 0``; we switch ``track_running_stats`` off instead, which in
    training mode normalises with batch statistics exactly the same way but leaves
    ``running_mean``, ``running_var`` *and* ``num_batches_tracked`` untouched (momentum 0 still
    counts batches, breaks ``momentum=None`` layers, and turns NaN batch statistics into NaN
    running statistics through ``0 * NaN``). Undo with :func:`enable_running_stats`.
    """
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            module.track_running_stats = False
            setattr(module, _FLAG, True)


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats` (only on the layers it switched off)."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and getattr(module, _FLAG, False):
            module.track_running_stats = True
            delattr(module, _FLAG)


def _is_named(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)


def split_named_params(params: Iterable[Any]) -> tuple[list[Any], dict[Tensor, str]]:
    """Accept tensors, ``(name, tensor)`` pairs, or group dicts of either; return plain groups
    (what ``torch.optim.Optimizer`` takes) and a tensor -> name map (empty without names)."""
    names: dict[Tensor, str] = {}

    def strip(items: Iterable[Any]) -> list[Tensor]:
        out = []
        for item in items:
            if _is_named(item):
                names[item[1]] = item[0]
                out.append(item[1])
            else:
                out.append(item)
        return out

    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors, named tensors or dicts")
    items = list(params)
    if items and isinstance(items[0], dict):
        groups = []
        for group in items:
            group = dict(group)
            ps = group["params"]
            group["params"] = [ps] if isinstance(ps, Tensor) else strip(ps)
            groups.append(group)
        return groups, names
    return strip(items), names


def global_norm(tensors: list[Tensor]) -> Tensor:
    """L2 norm over all tensors together, on the first tensor's device (0-dim)."""
    device = tensors[0].device
    norms = [n.to(device) for n in torch._foreach_norm(tensors)]
    return torch.linalg.vector_norm(torch.stack(norms))


class SAMBase(torch.optim.Optimizer):
    """Shared machinery of the SAM family: perturb, restore exactly, delegate the step.

    Subclasses implement :meth:`_perturbation` (the ascent ``e`` for each parameter) and may
    override :meth:`_descent_gradients` (turn ``g'`` into the gradient the base optimizer
    uses) and :meth:`_commit` (state updates that must only happen when the step is taken).
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        *,
        sam_defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
    ) -> None:
        check_rho(sam_defaults.get("rho", 0.0))
        groups, self.param_names = split_named_params(params)
        self._ready = False
        super().__init__(groups, {**sam_defaults, **base_kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._ready = True
        self._backup: dict[Tensor, Tensor] = {}
        self._perturbed: list[Tensor] = []
        self._phase = _IDLE

    # --- the two steps --------------------------------------------------------------------
    def _with_grads(self) -> Groups:
        return [
            (group, [p for p in group["params"] if p.grad is not None])
            for group in self.param_groups
        ]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + e`` using the gradient now in ``.grad`` (and remember ``w``)."""
        groups = self._with_grads()
        params = [p for _, ps in groups for p in ps]
        self._perturbed = params
        self._phase = _ASCENDED
        if params:
            backups = [self._backup_for(p) for p in params]
            torch._foreach_copy_(backups, params)
            e = self._perturbation(groups)
            torch._foreach_add_(params, [ei.to(p.dtype) for ei, p in zip(e, params, strict=True)])
        if zero_grad:
            self.zero_grad()

    def _backup_for(self, p: Tensor) -> Tensor:
        buf = self._backup.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
            buf = torch.empty_like(p, memory_format=torch.preserve_format)
            self._backup[p] = buf
        return buf

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the exact weights ``w`` saved by :meth:`first_step` (idempotent)."""
        if self._phase == _ASCENDED:
            if self._perturbed:
                torch._foreach_copy_(self._perturbed, [self._backup[p] for p in self._perturbed])
            self._phase = _RESTORED

    @torch.no_grad()
    def prepare_descent(self) -> None:
        """Restore ``w`` and turn the second-pass gradient into the descent gradient.

        :meth:`second_step` calls it; call it yourself when something must happen between
        the second backward pass and the base step (gradient clipping, a GradScaler that may
        skip the step): afterwards the weights are ``w`` whatever happens next.
        """
        if self._phase == _ASCENDED:
            self.restore()
        if self._phase == _RESTORED:
            self._descent_gradients()
            self._phase = _PREPARED

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and let the base optimizer step with the second-pass gradient."""
        if self._phase == _IDLE:
            raise RuntimeError("second_step() called without first_step() since the last step")
        self.prepare_descent()
        self.base_optimizer.step()
        self._commit()
        self._phase = _IDLE
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Without a closure: finish a step begun with :meth:`first_step` (what
        ``GradScaler.step(optimizer)`` calls). With a closure (davda54/sam's convention): the
        gradient at ``w`` must already be in ``.grad``; the closure does the second
        forward-backward pass and its return value is returned.
        """
        if closure is None:
            if self._phase == _IDLE:
                raise RuntimeError(
                    f"{type(self).__name__}.step() needs first_step() before it, or a closure "
                    "that runs the second forward-backward pass (the gradient at w must "
                    "already be in .grad)"
                )
            self.second_step()
            return None
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    # --- hooks ----------------------------------------------------------------------------
    def _perturbation(self, groups: Groups) -> list[Tensor]:
        """The ascent ``e`` for every parameter with a gradient, in ``groups`` order."""
        raise NotImplementedError

    def _descent_gradients(self) -> None:
        """Rewrite ``.grad`` (holding ``g'``) into the gradient the base optimizer uses."""

    def _commit(self) -> None:
        """Persist state computed in :meth:`first_step`; runs only when the step is taken."""

    # --- plumbing -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Groups added after construction go to the base optimizer (the shared list)."""
        if not getattr(self, "_ready", False):
            super().add_param_group(param_group)
            return
        group, names = split_named_params([param_group])
        self.param_names.update(names)
        group = group[0]
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self.base_optimizer.add_param_group(group)

    def graph_generators(self) -> list[torch.Generator]:
        """The generators a step draws random numbers from (none here; ZSharp's random filter
        has one). A CUDA graph must register them, or its replays would repeat the draws."""
        return []

    def _extra_state(self) -> dict[str, Any]:
        """Non-tensor-keyed state to checkpoint (e.g. a generator's state)."""
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        """Inverse of :meth:`_extra_state`."""

    def state_dict(self) -> dict[str, Any]:
        """The wrapper's own persistent state, its groups and the base optimizer's state."""
        state = super().state_dict()
        state["base_optimizer"] = self.base_optimizer.state_dict()
        state["extra"] = self._extra_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load both levels and re-share ``param_groups`` with the base optimizer."""
        state_dict = dict(state_dict)
        base = state_dict.pop("base_optimizer")
        extra = state_dict.pop("extra", {})
        super().load_state_dict(state_dict)
        self.base_optimizer.load_state_dict(base)
        self.base_optimizer.param_groups = self.param_groups
        self._load_extra_state(extra)
        self._phase = _IDLE

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_optimizer={self.base_optimizer!r})"
