"""Sharpness metrics: SAM sharpness, Hessian top eigenvalue and Hessian trace.

These are the three measurements of docs/algorithms.md ("Sharpness metrics"), logged to MLflow as
``sharpness/sam``, ``sharpness/hessian_top_eig`` and ``sharpness/hessian_trace``.

Contract shared by every function here:

* ``batches`` is a list of ``(inputs, targets)`` already on the model's device, and
  ``loss_fn(outputs, targets)`` returns a scalar (mean-reduced) loss. The metrics are taken of the
  average of the per-batch losses, so the caller fixes the batches once and the numbers are
  comparable across epochs.
* The model is measured in eval mode: BatchNorm normalises with its running statistics and does
  not update them, dropout is off. Otherwise the metric would depend on the batch composition and
  on dropout noise, and measuring would change the model being trained.
* The model is left exactly as it was found: parameters and buffers are copied back from a saved
  snapshot (bit for bit, rather than undoing ``w + e`` by subtraction, which is not exact in
  floating point), every submodule's ``training`` flag, every parameter's ``requires_grad`` and
  ``.grad`` (the same tensor object, or ``None``). Gradients are taken with
  :func:`torch.autograd.grad`, which never accumulates into ``.grad``, so the caller's gradients
  (e.g. a half-done SAM step) are not touched. Call these between optimizer steps, not between a
  forward and its backward: the in-place restore bumps the parameters' version counters, which
  autograd would refuse in a graph built before the call.
* Derivatives are with respect to the parameters that require grad (frozen ones are constants),
  and parameters the loss does not depend on count as having zero gradient.
* Everything runs on the model's device; random vectors come from a seeded ``torch.Generator``
  on that device (so a seed reproduces on one device type, not across CPU and GPU). Scalars stay
  on the device until one ``.item()`` at the end; the power iteration additionally reads its
  eigenvalue estimate once per iteration, which its stopping rule needs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "compute_sharpness",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "sam_sharpness",
]

LossFn = Callable[[Any, Any], Tensor]
Batch = tuple[Any, Any]

# docs/algorithms.md: e = rho * g / (||g|| + 1e-12), the same epsilon as the SAM optimizers use.
_SAM_EPS = 1e-12


@contextlib.contextmanager
def _measuring(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Put ``model`` in eval mode for a measurement and restore its whole state afterwards.

    Yields the parameters that require grad (the variables of the loss). Restoration runs in a
    ``finally`` so that an exception (an out-of-memory error in the double backward, say) still
    leaves the model as it was found and training can continue.
    """
    modes = [(module, module.training) for module in model.modules()]
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    with torch.no_grad():
        saved_params = [p.detach().clone() for p in params]
        buffers = list(model.buffers())
        saved_buffers = [b.detach().clone() for b in buffers]
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("model has no parameter with requires_grad=True: nothing to measure")
    try:
        model.eval()
        with torch.enable_grad():
            yield trainable
    finally:
        with torch.no_grad():
            for p, saved in zip(params, saved_params, strict=True):
                p.copy_(saved)
            for b, saved in zip(buffers, saved_buffers, strict=True):
                b.copy_(saved)
        for p, flag, grad in zip(params, requires_grad, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        # Set each flag directly: module.train(mode) would recurse and overwrite the children's
        # own flags (a frozen BatchNorm kept in eval inside a model in train mode, for example).
        for module, training in modes:
            module.training = training


def _check_batches(batches: Sequence[Batch]) -> None:
    """Refuse an empty batch list, which would otherwise give a 0/0 average."""
    if len(batches) == 0:
        raise ValueError("batches is empty: pass at least one (inputs, targets) pair")


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype that all ``tensors`` promote to (parameters may mix float32 and bfloat16)."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The l2 norm of all ``tensors`` taken together, as a 0-d tensor (no host sync)."""
    dtype = _common_dtype(tensors)
    norms = torch.stack([torch.linalg.vector_norm(t).to(dtype) for t in tensors])
    return torch.linalg.vector_norm(norms)


def _global_dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """The inner product of two lists of tensors viewed as one flat vector, as a 0-d tensor."""
    dtype = _common_dtype([*xs, *ys])
    return torch.stack([(x * y).sum().to(dtype) for x, y in zip(xs, ys, strict=True)]).sum()


def _loss_and_grads(
    model: nn.Module, loss_fn: LossFn, batch: Batch, params: Sequence[Tensor], create_graph: bool
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The loss on ``batch`` and its gradient with respect to ``params`` (zeros where unused)."""
    inputs, targets = batch
    loss = loss_fn(model(inputs), targets)
    grads = torch.autograd.grad(
        loss, params, create_graph=create_graph, allow_unused=True, materialize_grads=True
    )
    return loss, grads


def _hvp(
    grads: Sequence[Tensor], params: Sequence[Tensor], vector: Sequence[Tensor], retain_graph: bool
) -> tuple[Tensor, ...]:
    """H v by double backward: the gradient of <g(w), v> with respect to w (v held constant).

    ``grads`` must have been built with ``create_graph=True``. A loss that is linear in the
    parameters leaves ``<g, v>`` without a graph; its Hessian is zero.
    """
    dot = _global_dot(grads, vector)
    if not dot.requires_grad:
        return tuple(torch.zeros_like(p) for p in params)
    return torch.autograd.grad(
        dot, params, retain_graph=retain_graph, allow_unused=True, materialize_grads=True
    )


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``, so random vectors need no host transfer."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _rademacher(params: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """Independent +-1 entries shaped like ``params``: E[v v^T] = I, the least-variance choice."""
    return [
        torch.randint(0, 2, p.shape, generator=generator, device=p.device, dtype=p.dtype) * 2 - 1
        for p in params
    ]


def sam_sharpness(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], rho: float) -> float:
    """Mean over ``batches`` of L_b(w + rho g_b / ||g_b||) - L_b(w), with g_b = grad L_b(w).

    This is the quantity SAM's inner maximisation approximates (a first-order worst case within a
    ball of radius ``rho``), measured per batch as SAM itself does rather than with a gradient of
    the full set. ||g|| is the global norm over all parameters that require grad, with the
    1e-12 epsilon of the SAM optimizers, so a zero gradient gives zero sharpness.
    """
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho!r}")
    _check_batches(batches)
    with _measuring(model) as params:
        snapshot = [p.detach().clone() for p in params]
        total: Tensor | None = None
        for batch in batches:
            loss, grads = _loss_and_grads(model, loss_fn, batch, params, create_graph=False)
            scale = rho / (_global_norm(grads) + _SAM_EPS)
            inputs, targets = batch
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.add_(g * scale.to(g.dtype))
                perturbed = loss_fn(model(inputs), targets)
                # Back to w from the copy before the next batch: each batch is perturbed from w.
                for p, saved in zip(params, snapshot, strict=True):
                    p.copy_(saved)
            diff = perturbed.detach() - loss.detach()
            total = diff if total is None else total + diff
        assert total is not None
        return (total / len(batches)).item()


def hessian_top_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
) -> float:
    """The Hessian eigenvalue of largest magnitude of the average loss over ``batches``.

    Power iteration on Hessian-vector products, H v = (1/n) sum_b H_b v, from a seeded Gaussian
    start; it stops after ``iters`` products or once the Rayleigh quotient changes by less than
    ``tol`` relative to the previous one, and returns that Rayleigh quotient v^T H v (||v|| = 1).
    Near a minimum the top eigenvalue is the largest positive one; where the Hessian has a
    negative eigenvalue of larger magnitude, that is what power iteration finds.

    Convergence is geometric in lambda_2 / lambda_1, so a small gap can stop it early on the
    relative-change rule: raise ``iters`` and lower ``tol`` for a tighter estimate.

    With a single batch the first-order graph is built once and reused for every product
    (``retain_graph``), saving a forward and a backward per iteration; with several, it is
    rebuilt per batch and iteration so that memory stays that of one batch.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters!r}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    _check_batches(batches)
    with _measuring(model) as params:
        generator = _generator(params[0].device, seed)
        vector = [
            torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            for p in params
        ]
        norm = _global_norm(vector)
        vector = [v / norm.to(v.dtype) for v in vector]

        reused: tuple[Tensor, ...] | None = None
        if len(batches) == 1:
            _, reused = _loss_and_grads(model, loss_fn, batches[0], params, create_graph=True)

        def hvp(v: Sequence[Tensor]) -> list[Tensor]:
            if reused is not None:
                return list(_hvp(reused, params, v, retain_graph=True))
            total: list[Tensor] | None = None
            for batch in batches:
                _, grads = _loss_and_grads(model, loss_fn, batch, params, create_graph=True)
                hv = _hvp(grads, params, v, retain_graph=False)
                total = list(hv) if total is None else [t.add_(h) for t, h in zip(total, hv, strict=True)]
            assert total is not None
            return [t / len(batches) for t in total]

        eigenvalue: float | None = None
        for _ in range(iters):
            hv = hvp(vector)
            estimate = _global_dot(vector, hv).item()  # Rayleigh quotient; the stopping rule reads it
            previous, eigenvalue = eigenvalue, estimate
            if previous is not None and abs(estimate - previous) <= tol * abs(previous):
                break
            hv_norm = _global_norm(hv)
            vector = [h / (hv_norm.to(h.dtype) + torch.finfo(h.dtype).tiny) for h in hv]
        assert eigenvalue is not None
        return eigenvalue


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    samples: int = 100,
    seed: int = 0,
) -> float:
    """Hutchinson's estimate of tr(H) for the average loss: (1/S) sum_s v_s^T H v_s.

    The v_s are Rademacher vectors from a generator seeded with ``seed``. The loops are ordered
    batch-outer: since (1/S) sum_s v_s^T ((1/n) sum_b H_b) v_s = (1/n) sum_b (1/S) sum_s
    v_s^T H_b v_s, each batch's first-order graph is built once and reused for all S products,
    and the generator is re-seeded per batch so every batch sees the same S vectors. The estimate
    is the one defined above, with the memory of one batch, and each product skips a forward and
    a backward (about a third of a fresh product's time on a CIFAR ResNet-56 on CPU). Its
    standard error is sqrt(2 sum_{i != j} H_ij^2 / S).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples!r}")
    _check_batches(batches)
    with _measuring(model) as params:
        total: Tensor | None = None
        for batch in batches:
            _, grads = _loss_and_grads(model, loss_fn, batch, params, create_graph=True)
            generator = _generator(params[0].device, seed)
            for s in range(samples):
                v = _rademacher(params, generator)
                hv = _hvp(grads, params, v, retain_graph=s < samples - 1)
                quad = _global_dot(v, hv)
                total = quad if total is None else total + quad
            del grads  # free this batch's double-backward graph before building the next
        assert total is not None
        return (total / (samples * len(batches))).item()


def compute_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    *,
    sam_rho: float | None = None,
    top_eig: bool = False,
    trace: bool = False,
    eig_iters: int = 100,
    eig_tol: float = 1e-4,
    trace_samples: int = 100,
) -> dict[str, float]:
    """The requested sharpness metrics, keyed by their MLflow metric names (``sharpness/*``).

    ``sam_rho=None`` skips SAM sharpness; the result holds only the keys asked for, so a caller
    can pass it straight to the tracker. The Hessian metrics use their default seed (0), so the
    same batches give the same random vectors every epoch and the curves are not re-randomised.
    """
    results: dict[str, float] = {}
    if sam_rho is not None:
        results["sharpness/sam"] = sam_sharpness(model, loss_fn, batches, sam_rho)
    if top_eig:
        results["sharpness/hessian_top_eig"] = hessian_top_eigenvalue(
            model, loss_fn, batches, iters=eig_iters, tol=eig_tol
        )
    if trace:
        results["sharpness/hessian_trace"] = hessian_trace(
            model, loss_fn, batches, samples=trace_samples
        )
    return results
