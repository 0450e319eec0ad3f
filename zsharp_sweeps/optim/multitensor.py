"""ZSharp's z-score filter over all filtered tensors at once, in a handful of kernels.

``ZSharp(kernels="fused")`` (what ``kernels="auto"`` picks on CUDA with Triton). Why: after
``kernels="triton"`` (issue 8) ZSharp still cost 5-10 % more than SAM per step in a CUDA
graph and 35 % eager on ResNet-56 (issue 23): per step it launched two reductions per
filtered tensor, about 60 small kernels for the exact threshold (a row sort, four radix
passes of eight small ops each, the bookkeeping around them), and the per-chunk passes for
``|z|`` and ``e``. Here, after the per-tensor statistics:

1. one ``cat`` packs the gradients (in their memory order, so ``e`` comes back with the
   parameters' strides and the optimizer's ``_foreach_add_`` stays one multi-tensor kernel
   for channels-last weights too);
2. one kernel computes ``|z|`` (the same IEEE operations as before, bit for bit) and the
   first digit's histogram per segment; three more kernels finish a radix select of two
   ranks per segment (quantile's ``a_j`` and ``a_{j+1}``) with integer atomics, which are
   exact in any order; a small one reads both order statistics out;
3. ``torch.lerp`` makes ``tau`` exactly as ``torch.quantile`` does (the same op);
4. two kernels build ``e``: per-chunk sums of the kept squares, then ``e`` itself.

Ten kernels in all (with the zeroing of the histograms; plus the statistics), against about
75. The kept set is bit for bit that of ``kernels="torch"`` and of the official code
(``|z| > torch.quantile(|z|, Q_p)``); ``e`` equals it up to float32 rounding of the kept norm,
which sums in another order (a few ulp: 4e-6 relative on a 1.8M-entry tensor).

The statistics: ``z`` must use each tensor's own ``Tensor.mean()`` and ``Tensor.std()``
(one PyTorch reduction each: any other summation order moves boundary entries of ``z`` by an
ulp and changes the kept set; PyTorch's reduction order depends on the tensor's size and the
GPU's SM count, so no multi-tensor kernel can reproduce it), so they stay two kernels per
tensor, written straight into the filter's buffers (``out=``, no stack). What changes is when
they run: while a CUDA graph captures the step, :class:`EarlyStats` starts them from a
post-accumulate-grad hook, on one side stream, as soon as each gradient of the backward pass
at ``w`` exists, so in every replay they overlap the rest of the backward pass instead of
following it (one stream: each extra branch of the captured graph widened the gaps between
all its kernels; a compiled backward, whose gradients all come at its end, turns the hooks
off: ``ZSharp.gradients_come_together``). A statistic is used only if its gradient is the same tensor with the same
version counter when ``first_step`` runs; otherwise it is computed again there. Hooks act only
under capture because eager loops may rewrite gradients in place without bumping the version
counter (``GradScaler.unscale_`` does exactly that) and a captured step cannot (it would sync
with the host; a ``.data`` edit is not seen either); eagerly, ``first_step`` computes the statistics on the side streams as before.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from zsharp_sweeps.optim.threshold import SegmentLayout

#: Histogram bins per radix digit (the top digit uses 128 of them).
NBINS = 256
#: The digits of a float32 bit pattern (31 bits, sign clear): (shift, previous digit's shift).
PASSES = ((16, 24), (8, 16), (0, 8))
TOP_SHIFT = 24
#: The first radix pass that adds one atomic per matching entry instead of a block histogram:
#: after two digits (15 bits) few entries still share the wanted prefix. Measured on an H100
#: (scripts/profile_step_kernels.py, ViT): a block histogram of 256 bins for both ranks cost
#: 53 us a pass over 6.2M entries whether or not any entry matched.
SPARSE_FROM = 2
#: Elements per Triton block (the packed rows are a multiple of it).
BLOCK = 1024


@functools.cache
def _kernels() -> Any:
    """Imported on first use, as :mod:`zsharp_sweeps.optim.fused` does (Triton's interpreter
    is chosen when the kernels are decorated)."""
    from zsharp_sweeps.optim import _fused_kernels

    return _fused_kernels


# --- where a tensor's entries go ----------------------------------------------------------
def memory_order(t: Tensor) -> tuple[Tensor, bool]:
    """``t``'s entries as a flat tensor in memory order (a view) when ``t`` is dense and
    non-overlapping (contiguous, channels-last, any permutation), with True; else a copy in
    logical order, with False. The kept set does not depend on the order (an order statistic
    of the same values, and ``|z|`` entry by entry)."""
    if t.is_contiguous():
        return t.view(-1), True
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    permuted = t.permute(order)
    if permuted.is_contiguous():
        return permuted.reshape(-1), True
    return t.reshape(-1), False


def unpack_like(flat: Tensor, layout: SegmentLayout, like: Sequence[Tensor],
                in_memory_order: Sequence[bool]) -> list[Tensor]:
    """Views of a packed buffer shaped (and, for memory-order segments, strided) like ``like``."""
    out = []
    base = flat.reshape(-1)
    for t, off, n, mem in zip(like, layout.chunk_offsets, layout.numels, in_memory_order,
                              strict=True):
        start = off * layout.chunk
        if mem:
            out.append(base.as_strided(t.shape, t.stride(), base.storage_offset() + start))
        else:
            out.append(base[start : start + n].view(t.shape))
    return out


# --- per-layout buffers --------------------------------------------------------------------
@dataclass
class FilterBuffers:
    """Device buffers of one batch of filtered tensors (one layout and Q_p), created once and
    written in place every step (a captured CUDA graph reads them at fixed addresses)."""

    layout: SegmentLayout
    params: tuple[Tensor, ...]
    means: Tensor
    stds: Tensor
    mean_slots: list[Tensor]
    std_slots: list[Tensor]
    hist: Tensor  # int32 [passes, 2 ranks, k, NBINS]
    state: Tensor  # int32 [passes, (prefix, rank left) x 2 ranks, k]
    ranks: Tensor  # int32 [2, k]: 1-based ranks of a_j and a_{j+1} (capped at n)
    exact: Tensor  # int32 [k]: quantile's rank is an integer (a_c = a_j)
    weight: Tensor  # float32 [k]: quantile's lerp weight
    selected: Tensor  # int32 [2, k]: bit patterns of a_j and a_c
    partial: Tensor  # float32 [num_chunks]
    zeros: Tensor  # float32 [chunk]: the padding

    @classmethod
    def build(cls, layout: SegmentLayout, params: Sequence[Tensor], q: float) -> FilterBuffers:
        k, device = layout.k, layout.device
        info = layout.ranks(q)
        numels = torch.tensor(layout.numels, dtype=torch.int64)
        below = torch.tensor(info.below_list, dtype=torch.int64)
        ranks = torch.stack([below + 1, torch.minimum(below + 2, numels)]).to(torch.int32)
        means = torch.zeros(k, dtype=torch.float32, device=device)
        stds = torch.zeros_like(means)
        return cls(
            layout=layout,
            params=tuple(params),
            means=means,
            stds=stds,
            mean_slots=list(means.unbind()),
            std_slots=list(stds.unbind()),
            hist=torch.zeros((4, 2, k, NBINS), dtype=torch.int32, device=device),
            state=torch.zeros((4, 4, k), dtype=torch.int32, device=device),
            ranks=ranks.to(device),
            exact=info.exact.to(torch.int32),
            weight=info.weight,
            selected=torch.zeros((2, k), dtype=torch.int32, device=device),
            partial=torch.zeros(layout.num_chunks, dtype=torch.float32, device=device),
            zeros=torch.zeros(layout.chunk, dtype=torch.float32, device=device),
        )


# --- the statistics --------------------------------------------------------------------------
def launch_stats(g: Tensor, mean_out: Tensor, std_out: Tensor,
                 stream: torch.cuda.Stream | None) -> None:
    """``g.mean()`` and ``g.std()`` (the same reductions, written into ``*_out``), on
    ``stream`` after the work queued so far on the current stream (or on the current one)."""
    dims = list(range(g.dim()))
    if stream is None:
        torch.mean(g, dims, out=mean_out)
        torch.std(g, dims, out=std_out)
        return
    stream.wait_stream(torch.cuda.current_stream(g.device))
    with torch.cuda.stream(stream):
        torch.mean(g, dims, out=mean_out)
        torch.std(g, dims, out=std_out)


class EarlyStats:
    """Starts each filtered gradient's statistics from a post-accumulate-grad hook.

    ``watch(bufs)`` says which parameters belong to which buffers (once per layout); in
    ``first_step``, ``begin(bufs, grads)`` starts whatever a hook did not leave valid and
    ``join`` makes the current stream wait for the side streams. Only hooks that fire while ``armed()`` is true act (ZSharp: before
    ``first_step``, i.e. in the backward pass at ``w``, not the one at ``w + e``).
    """

    def __init__(self, owner: Any, streams: Any) -> None:
        self._owner = weakref.ref(owner)
        self._streams = streams  # device -> list of side streams (the owner's)
        self._slots: dict[Tensor, tuple[FilterBuffers, int]] = {}
        self._fresh: dict[Tensor, tuple[FilterBuffers, int, Any, int]] = {}
        self._used: set[Any] = set()
        self._hooked: set[int] = set()
        self._handles: list[Any] = []
        self.reused = 0  # statistics the last step took from hooks
        #: "capture": hooks act only while a CUDA graph captures the step (the default);
        #: "always": in every backward pass at ``w`` (tests; loops that never edit gradients
        #: between ``backward`` and ``first_step`` without bumping their version counter);
        #: "off": never (a compiled backward hands every gradient over at its end, where a
        #: hook gains no overlap and ``begin`` spreads the statistics over the streams).
        self.mode = "capture"

    def watch(self, bufs: FilterBuffers) -> None:
        for i, p in enumerate(bufs.params):
            self._slots[p] = (bufs, i)
            if id(p) not in self._hooked and p.requires_grad and p.is_leaf:
                owner = self._owner

                def hook(param: Tensor, owner: Any = owner) -> None:
                    opt = owner()
                    if opt is not None:
                        opt._early_stats._on_grad(param)

                self._handles.append(p.register_post_accumulate_grad_hook(hook))
                self._hooked.add(id(p))

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        """The one side stream every hook's statistics go on, in the order the gradients
        come. One, not one per hook in turn: measured on an H100 in CUDA graphs
        (scripts/profile_step_kernels.py, bf16+cl+graph, batch 128), ZSharp's step over
        SAM's took +0.29 ms with one stream against +0.58 ms with eight on ViT, and
        +0.23 against +0.28 ms on ResNet-56: every extra branch of the captured graph
        widened the gaps between all of its kernels, the second pass's included (+0.18 ms
        on ViT), and more statistics ran at once beside the backward pass's kernels."""
        streams = self._streams(device)
        if not streams:
            return None
        stream = streams[0]
        self._used.add(stream)
        return stream

    def _on_grad(self, p: Tensor) -> None:
        opt = self._owner()
        slot = self._slots.get(p)
        if opt is None or slot is None:
            return
        bufs, i = slot
        if not opt._stats_armed(bufs.layout.device):
            return
        g = p.grad
        if g is None or g.dtype != torch.float32 or g.device != bufs.layout.device:
            return
        launch_stats(g, bufs.mean_slots[i], bufs.std_slots[i], self._side_stream(g.device))
        self._fresh[p] = (bufs, i, weakref.ref(g), g._version)

    def begin(self, bufs: FilterBuffers, grads: Sequence[Tensor]) -> int:
        """Start whatever statistics of ``grads`` no hook left valid (a hook's are valid if its
        gradient is the same tensor, unchanged since: same version counter), spread over the
        side streams in contiguous blocks, one fork per stream; returns how many hooks
        provided."""
        missing = []
        for i, (p, g) in enumerate(zip(bufs.params, grads, strict=True)):
            rec = self._fresh.pop(p, None)
            if not (rec is not None and rec[0] is bufs and rec[1] == i and rec[2]() is g
                    and g._version == rec[3]):
                missing.append(i)
        self.reused = len(grads) - len(missing)
        streams = self._streams(bufs.layout.device) if missing else []
        if not streams:
            for i in missing:
                launch_stats(grads[i], bufs.mean_slots[i], bufs.std_slots[i], None)
            return self.reused
        current = torch.cuda.current_stream(bufs.layout.device)
        n, s = len(missing), min(len(streams), len(missing))
        for j, stream in enumerate(streams[:s]):
            stream.wait_stream(current)
            self._used.add(stream)
            with torch.cuda.stream(stream):
                for i in missing[j * n // s : (j + 1) * n // s]:
                    launch_stats(grads[i], bufs.mean_slots[i], bufs.std_slots[i], None)
        return self.reused

    def join(self, device: torch.device) -> None:
        """The current stream waits for every side stream that computed statistics."""
        if self._used:
            current = torch.cuda.current_stream(device)
            for stream in self._used:
                current.wait_stream(stream)
            self._used = set()

    def join_all(self) -> None:
        """:meth:`join` for whatever side streams are still forked (hooks of tensors no
        filter used this step)."""
        if self._used:
            for stream in list(self._used):
                torch.cuda.current_stream(stream.device).wait_stream(stream)
            self._used = set()

    def reset(self) -> None:
        """Forget statistics started for gradients no step has used (end of ``first_step``)."""
        self._fresh.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._hooked = [], set()


# --- the filter ------------------------------------------------------------------------------
def pack(layout: SegmentLayout, grads: Sequence[Tensor], zeros: Tensor | None = None
         ) -> tuple[Tensor, list[bool]]:
    """The gradients in one zero-padded ``[num_chunks, chunk]`` buffer (one ``cat``), each in
    memory order where it is dense; returns the buffer and which segments are. ``zeros``: a
    float32 ``[chunk]`` zero vector to pad from (made here if not given)."""
    if zeros is None:
        zeros = torch.zeros(layout.chunk, dtype=torch.float32, device=layout.device)
    pieces: list[Tensor] = []
    orders: list[bool] = []
    for g, n in zip(grads, layout.numels, strict=True):
        flat, mem = memory_order(g)
        pieces.append(flat)
        orders.append(mem)
        pad = -n % layout.chunk
        if pad:
            pieces.append(zeros[:pad])
    return torch.cat(pieces).view(layout.num_chunks, layout.chunk), orders


def _block(chunk: int, block: int | None) -> int:
    block = min(chunk, block or BLOCK)
    if chunk % block:
        raise ValueError(f"the multi-tensor filter needs a chunk that is a multiple of {block}")
    return block


def select_threshold(packed: Tensor, bufs: FilterBuffers, block: int | None = None
                     ) -> tuple[Tensor, Tensor]:
    """``|z|`` of every packed entry (int32 bit patterns, padding the integer maximum) and
    each segment's ``tau = torch.quantile(|z|, Q_p)``, bit for bit (statistics in ``bufs``)."""
    k = _kernels()
    layout = bufs.layout
    n, chunk = layout.num_chunks, layout.chunk
    block = _block(chunk, block)
    bufs.hist.zero_()
    absz = torch.empty(packed.shape, dtype=torch.int32, device=packed.device)
    k.absz_select0_kernel[(n,)](
        packed, absz, layout.chunk_seg, layout.chunk_valid, bufs.means, bufs.stds, bufs.hist,
        CHUNK=chunk, BLOCK=block, SHIFT=TOP_SHIFT, NBINS=NBINS,
    )
    for p, (shift, prev) in enumerate(PASSES, start=1):
        k.select_pass_kernel[(n,)](
            absz, layout.chunk_seg, layout.chunk_valid, layout.seg_first_chunk, bufs.ranks,
            bufs.state, bufs.hist, layout.k, PASS=p, CHUNK=chunk, BLOCK=block,
            PREV_SHIFT=prev, SHIFT=shift, NBINS=NBINS, SPARSE=p >= SPARSE_FROM,
        )
    k.select_final_kernel[(layout.k,)](
        bufs.state, bufs.hist, bufs.exact, bufs.selected, layout.k, LAST=len(PASSES),
        PREV_SHIFT=0, NBINS=NBINS,
    )
    sel = bufs.selected.view(torch.float32)
    return absz, torch.lerp(sel[0], sel[1], bufs.weight)  # quantile's own lerp: same bits


def perturbation(packed: Tensor, absz: Tensor, tau: Tensor, bufs: FilterBuffers, rho: Tensor,
                 norm: Tensor, block: int | None = None) -> Tensor:
    """ZSharp's ``e`` (packed) from ``|z|`` and ``tau``: ``rho * g_f / (||g_f|| + 1e-12)``
    where the segment keeps something, else ``g * rho / (G + 1e-12)``; ``rho`` per segment
    ``[k]``, ``norm`` the 0-dim global gradient norm ``G``. A segment with a non-finite mean
    or std keeps nothing (quantile's NaN rule)."""
    k = _kernels()
    layout = bufs.layout
    n, chunk = layout.num_chunks, layout.chunk
    block = _block(chunk, block)
    k.kept_partial_kernel[(n,)](
        packed, absz, layout.chunk_seg, tau, bufs.means, bufs.stds, bufs.partial,
        CHUNK=chunk, BLOCK=block,
    )
    e = torch.empty_like(packed)
    k.perturb_multi_kernel[(n,)](
        packed, absz, e, layout.chunk_seg, layout.seg_first_chunk, layout.seg_chunks, tau,
        bufs.means, bufs.stds, bufs.partial, rho, norm.reshape(1), CHUNK=chunk, BLOCK=block,
        SBLOCK=256,
    )
    return e


def zscore_perturbation(packed: Tensor, bufs: FilterBuffers, rho: Tensor, norm: Tensor,
                        block: int | None = None) -> Tensor:
    """:func:`select_threshold` then :func:`perturbation`: the packed ``e``."""
    absz, tau = select_threshold(packed, bufs, block)
    return perturbation(packed, absz, tau, bufs, rho, norm, block)
