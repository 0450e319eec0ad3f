"""Triton kernels for ZSharp's full-buffer passes: ``|z|`` in one pass, ``e`` in two.

Why: after the per-tensor statistics, ZSharp's remaining extra cost over SAM on a GPU is a
dozen elementwise passes over the packed gradient buffer (``|z|``: subtract, divide, abs,
pad; ``e``: mask, where, norm, multiply, divide, scale, where), each a separate kernel
that reads and writes the whole buffer (25 MB per pass on ViT-CIFAR). These kernels do the
same arithmetic in three passes.

Exactness: ``|z|`` must be bit for bit the official ``(g - mean) / (std + 1e-12)`` (docs/algorithms.md:
the boundary entry must match), so the kernel does exactly those IEEE operations: one
round-to-nearest subtraction and one round-to-nearest division (``tl.div_rn``, not Triton's
default approximate division); the mean and ``std + 1e-12`` come from the same PyTorch
kernels as before. ``e`` only has to be the same up to rounding: the kept-entry norm is a
deterministic per-segment sum of squares (one partial per chunk, summed in chunk order)
rather than ``torch.linalg.vector_norm``'s order, so ``e`` can differ from the PyTorch path
in the last bit.

Used for the z-score filter by ``ZSharp(kernels="triton")`` (the path before issue 23; "auto" now
picks the multi-tensor kernels of :mod:`zsharp_sweeps.optim.multitensor`);
tests run the same kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from zsharp_sweeps.optim.threshold import nan_segments

#: Elements per Triton block; chunks (the packed layout's rows) are a multiple of it.
BLOCK = 1024


def available(device: torch.device) -> bool:
    """Whether the fused kernels can run on ``device`` (CUDA with Triton importable)."""
    return device.type == "cuda" and _triton_importable()


@functools.cache
def _triton_importable() -> bool:
    """Checked once, not on every optimizer step."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels() -> dict[str, Any]:
    """The kernels, imported (and so decorated) on first use: a test can set
    ``TRITON_INTERPRET=1`` before that to run them on the CPU."""
    from zsharp_sweeps.optim import _fused_kernels as k

    return {"abs_z": k.abs_z_kernel, "kept_sumsq": k.kept_sumsq_kernel,
            "segment_sum": k.segment_sum_kernel, "perturb": k.perturb_kernel}


def _block(chunk: int) -> int:
    if chunk % BLOCK and chunk > BLOCK:
        raise ValueError(f"fused kernels need a chunk that is a multiple of {BLOCK}, got {chunk}")
    return min(chunk, BLOCK)


def abs_zscores(packed: Tensor, layout: Any, means: Tensor, stds: Tensor) -> tuple[Tensor, Tensor]:
    """Same result and contract as :func:`zsharp_sweeps.optim.threshold.abs_zscores`."""
    denoms = stds + 1e-12  # the same PyTorch add as the reference path
    bits = torch.empty(packed.shape, dtype=torch.int32, device=packed.device)
    _kernels()["abs_z"][(layout.num_chunks,)](
        packed, bits, layout.chunk_seg, layout.chunk_valid, means, denoms,
        CHUNK=layout.chunk, BLOCK=_block(layout.chunk),
    )
    return bits.view(torch.float32), nan_segments(means, stds)


def perturbation(
    packed: Tensor, absz: Tensor, tau: Tensor, layout: Any, rho: Tensor, norm: Tensor
) -> Tensor:
    """ZSharp's ``e`` for every packed segment: ``rho * g_f / (||g_f|| + 1e-12)`` where the
    segment keeps something, else ``g * rho / (G + 1e-12)``. ``rho`` is per segment ``[k]``,
    ``norm`` the 0-dim global gradient norm G. Returns the packed ``[num_chunks, chunk]`` e."""
    kernels = _kernels()
    block = _block(layout.chunk)
    partial = torch.empty(layout.num_chunks, dtype=torch.float32, device=packed.device)
    kernels["kept_sumsq"][(layout.num_chunks,)](
        packed, absz, layout.chunk_seg, tau, partial, CHUNK=layout.chunk, BLOCK=block
    )
    sumsq = torch.empty(layout.k, dtype=torch.float32, device=packed.device)
    kernels["segment_sum"][(layout.k,)](
        partial, layout.seg_first_chunk, layout.seg_chunks, sumsq, BLOCK=256
    )
    kept = sumsq.sqrt()
    e = torch.empty_like(packed)
    kernels["perturb"][(layout.num_chunks,)](
        packed, absz, e, layout.chunk_seg, tau, kept, rho, norm.reshape(1),
        CHUNK=layout.chunk, BLOCK=block,
    )
    return e
