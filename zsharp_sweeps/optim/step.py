"""One full training step for any optimizer here, in fp32, bf16 or fp16 with a GradScaler.

Why one function: SAM-family optimizers need two forward-backward passes with bookkeeping in
between (perturb, freeze BatchNorm statistics, unscale, restore); getting that right with mixed
precision is easy to get subtly wrong, so the trainer and the benchmark call this.

fp16 with ``GradScaler`` across both passes:

1. pass 1 is scaled; ``scaler.unscale_(optimizer)`` unscales ``g`` and records whether it had
   inf/NaN (the ascent must use the true ``g``: FSAM's momentum and the magnitude/direction
   variants use its scale);
2. ``first_step``; pass 2 is scaled with the same scale;
3. ``g'`` is unscaled into the *same* found-inf record (so an overflow in either pass skips
   the step and backs the scale off), the weights are restored to exactly ``w``, and
   ``scaler.step(optimizer)`` takes the descent step only if both passes were finite.

The only host synchronisation is the one inside ``GradScaler.step`` (reading found-inf).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from zsharp_sweeps.optim.base import SAMBase, disable_running_stats, enable_running_stats

LossFn = Callable[[Tensor, Tensor], Tensor]


def is_sam_family(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers that need two passes per step (SAM, ASAM, FSAM, ZSharp, ...)."""
    return isinstance(optimizer, SAMBase)


def _forward(
    model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, amp_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    ctx = (
        # No weight-cast cache: it would outlive a CUDA-graph capture of the step.
        torch.autocast(device_type=inputs.device.type, dtype=amp_dtype, cache_enabled=False)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    with ctx:
        logits = model(inputs)
        loss = loss_fn(logits, targets)
    return loss, logits


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def _unscale_again(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """Unscale the second pass's gradients into the found-inf record of the first.

    ``GradScaler.unscale_`` may run once per step and optimizer, and ``GradScaler.step``
    decides on that record; so we unscale ``g'`` with the same kernel GradScaler uses and
    accumulate its inf/NaN flag into the same tensors (private attributes, stable since
    PyTorch 1.6; a clear error if they ever change).
    """
    try:
        record = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        scale = scaler._scale
    except (AttributeError, KeyError) as exc:  # pragma: no cover - depends on torch internals
        raise RuntimeError(
            "GradScaler internals changed: cannot unscale SAM's second pass"
        ) from exc
    if scale is None:
        raise RuntimeError("GradScaler has no scale yet: call scaler.scale(loss) first")
    inv_scale = scale.double().reciprocal().float()
    by_device: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in _params(optimizer):
        by_device.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for (device, _), grads in by_device.items():
        if device not in record:
            record[device] = torch.zeros((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(
            grads, record[device], inv_scale.to(device)
        )


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    freeze_bn_second_pass: bool = True,
    grad_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Run one optimizer step on a batch; return ``(loss, logits)`` of the first pass, detached.

    ``amp_dtype``: run forward passes under ``torch.autocast`` with this dtype (bf16 or fp16).
    ``scaler``: a ``torch.amp.GradScaler`` for fp16; ``scaler.update()`` is called here.
    ``freeze_bn_second_pass``: keep BatchNorm running statistics out of the perturbed pass
    (davda54/sam's advice; the official ZSharp code updates them in both passes).
    ``grad_clip``: clip the gradient the base optimizer steps with to this global L2 norm.
    The model must already be in training mode.
    """
    use_scaler = scaler is not None and scaler.is_enabled()
    optimizer.zero_grad(set_to_none=True)
    loss, logits = _forward(model, loss_fn, inputs, targets, amp_dtype)
    (scaler.scale(loss) if use_scaler else loss).backward()

    if not is_sam_family(optimizer):
        if use_scaler:
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(_params(optimizer), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(_params(optimizer), grad_clip)
            optimizer.step()
        return loss.detach(), logits.detach()

    assert isinstance(optimizer, SAMBase)
    if use_scaler:
        scaler.unscale_(optimizer)
    optimizer.first_step(zero_grad=True)
    if freeze_bn_second_pass:
        disable_running_stats(model)
    try:
        loss2, _ = _forward(model, loss_fn, inputs, targets, amp_dtype)
        (scaler.scale(loss2) if use_scaler else loss2).backward()
    except BaseException:
        optimizer.restore()  # never leave the model at w + e
        raise
    finally:
        if freeze_bn_second_pass:
            enable_running_stats(model)
    if use_scaler:
        _unscale_again(scaler, optimizer)
    optimizer.prepare_descent()  # weights back to w even if the scaler skips the step
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(_params(optimizer), grad_clip)
    if use_scaler:
        scaler.step(optimizer)  # -> optimizer.step() -> second_step(), only if finite
        scaler.update()
    else:
        optimizer.step()
    return loss.detach(), logits.detach()
