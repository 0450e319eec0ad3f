"""Exact per-tensor order statistics for ZSharp's filter, for all filtered tensors at once.

Why this module exists: the official ZSharp code calls ``torch.quantile(|z|, Q_p)`` once per
parameter tensor. That sorts every tensor (slow), refused tensors over 2^24 entries in older
PyTorch, and costs one Python round trip per layer. Here the threshold is computed exactly (the
kept set is bit for bit the one ``|z| > torch.quantile(|z|, Q_p)`` gives) without sorting and,
on accelerators, for every filtered tensor in one batched pass with no host synchronisation.

Layout: the filtered tensors are packed into one zero-padded ``[num_chunks, CHUNK]`` buffer;
every chunk belongs to exactly one tensor ("segment"), so a per-tensor value is broadcast to
its chunks with one small ``index_select`` and a per-tensor reduction is a row reduction
followed by an ``index_add_`` over chunks. No per-element index tensor is needed.

Order statistics: non-negative IEEE floats order exactly like their bit patterns read as
signed integers, so the k-th smallest ``|z|`` of every segment is an integer order statistic.
Three exact methods, identical bits ("auto" picks per device):

* ``radix`` (accelerators): sort every ``CHUNK`` row once (one batched small-row sort), then a
  most-significant-digit-first radix select, 7 + 8 + 8 + 8 bits for float32: per pass, the
  per-segment cumulative histogram of the digit (within the prefix found so far) comes from
  binary searches of the 255 bin boundaries in every sorted row plus an integer ``index_add_``
  over chunks. After the sort nothing touches the full buffer: ~40 small kernels in all.
* ``bisect``: a bisection on the bit pattern, 31 passes over the full buffer (one compare +
  one row count each); kept as a reference.
* ``kthvalue`` (CPU): a per-tensor quickselect, cheapest where kernels are free.

The threshold itself: ``torch.quantile`` returns ``tau = lerp(a_j, a_c, w)`` with ``a`` the
sorted values, ``j = floor(rank)``, ``c = ceil(rank)``, ``w = rank - j`` and
``rank = Q_p * (n - 1)``, whose arithmetic has changed across PyTorch versions (see
:func:`rank_mode`; checked bit for bit against ``torch.quantile`` on CPU with torch 2.14 and
on an H100 with torch 2.11). The shortcut of docs/algorithms.md ("The exact fast form")
``{|z| > a_j}`` equals ``{|z| > tau}`` except when ``a_{j+1}`` is within about an ulp of ``a_j``
and ``w >= 0.5`` (``lerp`` then rounds up to ``a_{j+1}``), which does happen in tensors of
millions of entries; so we compute ``a_j``, ``a_c`` and ``tau`` exactly as quantile does. A
segment containing NaN gets ``tau = NaN`` (quantile's rule), so nothing in it is kept.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: Elements per chunk of the packed layout. A tensor wastes at most CHUNK - 1 padding entries.
#: 4096 rather than 1024: fewer rows make the radix passes cheaper (ViT-CIFAR threshold 1.54 ->
#: 1.44 ms on an H100), and the Triton kernels of optim/fused.py need a multiple of 1024.
CHUNK = 4096

#: Integer dtype whose bit pattern orders like the (non-negative) float of the same width.
_INT_FOR = {torch.float32: torch.int32, torch.float64: torch.int64}

METHODS = ("auto", "radix", "bisect", "kthvalue")

#: Bits resolved per pass of the radix select (255 candidate splits per segment and pass).
RADIX_BITS = 8


def resolve_method(method: str, device: torch.device) -> str:
    """``auto`` = quickselect per tensor on CPU, batched radix select elsewhere (no host syncs)."""
    if method not in METHODS:
        raise ValueError(f"threshold method={method!r} is invalid: allowed one of {METHODS}")
    if method == "auto":
        return "kthvalue" if device.type == "cpu" else "radix"
    return method


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a small host constant to ``device`` without blocking the host on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class RankInfo:
    """torch.quantile's ranks for one Q_p, per segment (constants, cached per layout)."""

    below: Tensor  # int64 [k]: j = floor(rank)
    below_list: list[int]
    weight: Tensor  # float [k]: float32(rank - j), quantile's lerp weight
    exact: Tensor  # bool [k]: ceil(rank) == j, so a_c = a_j


@dataclass
class SegmentLayout:
    """Where each filtered tensor lives in the packed ``[num_chunks, CHUNK]`` buffer.

    Built once per set of tensor sizes (the optimizer caches it), so every per-step tensor
    operation uses device-resident constants only.
    """

    numels: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    chunk: int
    chunk_offsets: list[int]  # first chunk of each segment
    num_chunks: int
    chunk_seg: Tensor  # int64 [num_chunks]: segment of each chunk
    pad: Tensor  # bool [num_chunks, chunk]: True on padding entries
    numel_t: Tensor  # int64 [k]
    seg_start: Tensor  # int64 [k]: flat index of each segment's first entry
    chunk_valid: Tensor  # int32 [num_chunks]: valid (non-padding) entries, a prefix of the row
    seg_first_chunk: Tensor  # int32 [k]
    seg_chunks: Tensor  # int32 [k]: chunks of each segment
    _ranks: dict[float, RankInfo] = field(default_factory=dict)
    _radix: list[tuple[int, Tensor]] | None = None

    @classmethod
    def build(
        cls, numels: Sequence[int], dtype: torch.dtype, device: torch.device, chunk: int = CHUNK
    ) -> SegmentLayout:
        if dtype not in _INT_FOR:
            raise TypeError(f"SegmentLayout supports float32/float64, got {dtype}")
        if any(n < 1 for n in numels):
            raise ValueError("every segment needs at least one entry")
        counts = [math.ceil(n / chunk) for n in numels]
        offsets = [0]
        for c in counts[:-1]:
            offsets.append(offsets[-1] + c)
        num_chunks = sum(counts)
        chunk_seg = torch.repeat_interleave(
            torch.arange(len(numels)), torch.tensor(counts), output_size=num_chunks
        )
        pad = torch.ones(num_chunks * chunk, dtype=torch.bool)
        valid = torch.zeros(num_chunks, dtype=torch.int32)
        for off, n, c in zip(offsets, numels, counts, strict=True):
            pad[off * chunk : off * chunk + n] = False
            valid[off : off + c] = chunk
            valid[off + c - 1] = n - (c - 1) * chunk
        return cls(
            numels=tuple(numels),
            dtype=dtype,
            device=device,
            chunk=chunk,
            chunk_offsets=offsets,
            num_chunks=num_chunks,
            chunk_seg=_to_device(chunk_seg, device),
            pad=_to_device(pad.view(num_chunks, chunk), device),
            numel_t=_to_device(torch.tensor(numels, dtype=torch.int64), device),
            seg_start=_to_device(torch.tensor([o * chunk for o in offsets]), device),
            chunk_valid=_to_device(valid, device),
            seg_first_chunk=_to_device(torch.tensor(offsets, dtype=torch.int32), device),
            seg_chunks=_to_device(torch.tensor(counts, dtype=torch.int32), device),
        )

    @property
    def k(self) -> int:
        return len(self.numels)

    @property
    def int_dtype(self) -> torch.dtype:
        return _INT_FOR[self.dtype]

    # --- packing -------------------------------------------------------------------------
    def pack(self, tensors: Sequence[Tensor]) -> Tensor:
        """Zero-padded ``[num_chunks, chunk]`` copy of ``tensors`` (one ``cat`` kernel)."""
        zeros = torch.zeros(self.chunk, dtype=self.dtype, device=self.device)
        pieces: list[Tensor] = []
        for t, n, off in zip(tensors, self.numels, self.chunk_offsets, strict=True):
            pieces.append(t.reshape(-1).to(self.dtype))
            end = self._end_chunk(off, n)
            pad = end * self.chunk - (off * self.chunk + n)
            if pad:
                pieces.append(zeros[:pad])
        return torch.cat(pieces).view(self.num_chunks, self.chunk)

    def unpack(self, buf: Tensor) -> list[Tensor]:
        """Flat views of each segment's valid entries in a packed buffer (no copies)."""
        flat = buf.reshape(-1)
        return [
            flat[off * self.chunk : off * self.chunk + n]
            for off, n in zip(self.chunk_offsets, self.numels, strict=True)
        ]

    def _end_chunk(self, off: int, n: int) -> int:
        return off + math.ceil(n / self.chunk)

    # --- per-segment helpers (all on device, no syncs) -------------------------------------
    def per_chunk(self, values: Tensor) -> Tensor:
        """Broadcast a per-segment ``[k]`` vector to ``[num_chunks, 1]``."""
        return values.index_select(0, self.chunk_seg).unsqueeze(1)

    def seg_sum(self, chunk_values: Tensor) -> Tensor:
        """Sum a per-chunk ``[num_chunks]`` vector into its segments (integer sums are exact)."""
        out = torch.zeros(self.k, dtype=chunk_values.dtype, device=self.device)
        return out.index_add_(0, self.chunk_seg, chunk_values)

    def seg_count(self, mask: Tensor) -> Tensor:
        """Number of True entries of a ``[num_chunks, chunk]`` mask per segment (int64)."""
        return self.seg_sum(mask.sum(1))

    def seg_min(self, values: Tensor, fill: int) -> Tensor:
        """Per-segment minimum of an integer ``[num_chunks, chunk]`` buffer."""
        out = torch.full((self.k,), fill, dtype=values.dtype, device=self.device)
        return out.scatter_reduce_(0, self.chunk_seg, values.amin(1), reduce="amin")

    def radix_passes(self) -> list[tuple[int, Tensor]]:
        """The radix select's digits, most significant first: ``(shift, splits)`` per pass.

        A pass refines a range ``[lo, lo + 2^(shift + width))`` (``lo`` a multiple of that
        width) into ``2^width`` bins of ``2^shift`` patterns; ``splits`` holds the last pattern
        of every bin but the top one, relative to ``lo`` (``(b + 1) * 2^shift - 1``). The
        non-negative patterns span 31 (63) bits: a 7-bit top digit, then 8-bit digits.
        Device constants, built once per layout.
        """
        if self._radix is None:
            total = torch.iinfo(self.int_dtype).bits - 1
            passes: list[tuple[int, Tensor]] = []
            shift = total
            while shift > 0:
                width = min(RADIX_BITS, shift - (shift - 1) // RADIX_BITS * RADIX_BITS)
                shift -= width
                splits = (torch.arange(1, 2**width, dtype=torch.int64) << shift) - 1
                passes.append((shift, _to_device(splits.to(self.int_dtype), self.device)))
            self._radix = passes
        return self._radix

    def ranks(self, q: float) -> RankInfo:
        """torch.quantile's rank arithmetic for ``q``, per segment (cached)."""
        info = self._ranks.get(q)
        if info is None:
            mode = rank_mode(self.device, self.dtype)
            below, weight, exact = _rank_lists(self.numels, q, mode, self.device, self.dtype)
            info = RankInfo(
                below=_to_device(torch.tensor(below, dtype=torch.int64), self.device),
                below_list=below,
                weight=_to_device(weight, self.device),
                exact=_to_device(torch.tensor(exact), self.device),
            )
            self._ranks[q] = info
        return info


# --- torch.quantile's rank arithmetic ------------------------------------------------------
# PyTorch has computed ``rank = q * (n - 1)`` in two ways: in the input's dtype on the input's
# device (``scalar_tensor(q) * last_index``, the implementation that refused n > 2^24; seen in
# torch 2.11 on CUDA) and in float64 from q rounded to the input dtype (seen in torch 2.14 on
# CPU, which accepts any n). The two differ in the lerp weight (and, near integers, in j), which
# moves the threshold in rare cases. Rather than guess from version numbers, the first layout
# built for a (device, dtype) probes torch.quantile once and uses the arithmetic that matches
# it bit for bit (small tensors, only when a layout is built).
_RANK_MODES = ("float64", "native")
_rank_mode_cache: dict[tuple[str, torch.dtype], str] = {}


def _rank_lists(
    numels: Sequence[int], q: float, mode: str, device: torch.device, dtype: torch.dtype
) -> tuple[list[int], Tensor, list[bool]]:
    """Per size ``n``: ``j = floor(rank)``, the lerp weight (``dtype``) and ``ceil(rank) == j``."""
    below: list[int] = []
    weights: list[Tensor] = []
    exact: list[bool] = []
    q_in = float(torch.tensor(q, dtype=dtype))  # q rounded to the input dtype, as quantile does
    for n in numels:
        if mode == "float64":
            rank = q_in * (n - 1)
            j = int(rank)
            weights.append(torch.tensor(rank - j, dtype=torch.float64).to(dtype))
            exact.append(math.ceil(rank) == j)
        else:
            rank_t = torch.scalar_tensor(q, dtype=dtype, device=device) * (n - 1)
            j_t = rank_t.to(torch.int64)
            j = int(j_t)
            weights.append((rank_t - j_t).cpu())
            exact.append(int(rank_t.ceil().to(torch.int64)) == j)
        below.append(j)
    return below, torch.stack(weights).to(dtype), exact


def _emulated_quantile(x: Tensor, q: float, mode: str) -> Tensor:
    s = torch.sort(x.reshape(-1)).values
    below, weight, exact = _rank_lists([x.numel()], q, mode, x.device, x.dtype)
    j = below[0]
    lo = s[j : j + 1]
    hi = s[j : j + 1] if exact[0] else s[j + 1 : j + 2]
    return torch.lerp(lo, hi, weight.to(x.device))[0]


def rank_mode(device: torch.device, dtype: torch.dtype) -> str:
    """Which rank arithmetic reproduces ``torch.quantile`` here (probed once, cached)."""
    key = (str(device), dtype)
    mode = _rank_mode_cache.get(key)
    if mode is None:
        gen = torch.Generator().manual_seed(0)
        probes = []
        for n in (2, 3, 7, 18, 95, 333, 1000, 4097):
            x = torch.randn(n, generator=gen, dtype=torch.float64).abs().to(dtype)
            probes.append(x.to(device))
            probes.append(((x * 4).round() / 4).to(device))  # ties
        qs = (0.05, 0.1, 0.3333, 0.7, 0.9, 0.95, 0.99, 0.999)
        mode = _RANK_MODES[0]
        for candidate in _RANK_MODES:
            if all(
                torch.equal(_emulated_quantile(x, q, candidate), torch.quantile(x, q))
                for x in probes
                for q in qs
            ):
                mode = candidate
                break
        else:
            warnings.warn(
                "no known rank arithmetic reproduces torch.quantile on this PyTorch; ZSharp's "
                "threshold may differ from torch.quantile's in rare boundary cases",
                RuntimeWarning,
                stacklevel=2,
            )
        _rank_mode_cache[key] = mode
    return mode


def _int_max(dtype: torch.dtype) -> int:
    return torch.iinfo(dtype).max


def sort_chunks(bits: Tensor) -> Tensor:
    """Each ``chunk`` row of a packed integer buffer sorted ascending (padding, the maximum,
    last). One batched small-row sort; every later count is a binary search in these rows."""
    return torch.sort(bits, dim=1).values


def radix_select(rows: Tensor, layout: SegmentLayout, rank: Tensor) -> Tensor:
    """Per segment, the ``rank``-th smallest (1-based) pattern of sorted packed rows.

    Radix select, most significant digit first: each pass counts, for every segment and each
    of the ``2^width - 1`` bin boundaries of the current digit, the entries ``<=`` that
    boundary (a binary search per chunk row, summed over the segment's chunks with integer
    adds, so exact), and keeps the first bin whose cumulative count reaches ``rank``. That is
    a 256-bin histogram of the digit restricted to the prefix found so far, without touching
    the ``[num_chunks, chunk]`` buffer again: 4 passes of small ``[num_chunks, 255]`` work for
    float32 (8 for float64), static shapes, no host synchronisation.

    Boundaries stay below the integer maximum, so padding is never counted; a rank above the
    segment size ends on the maximum, returned (like :func:`kth_smallest_bits`) as
    ``max - 1``. Returns ``[k]`` in the rows' dtype.
    """
    int_max = _int_max(rows.dtype)
    lo = torch.zeros(layout.k, dtype=rows.dtype, device=rows.device)
    want = rank.unsqueeze(1)
    for shift, splits in layout.radix_passes():
        bounds = (lo.unsqueeze(1) + splits).index_select(0, layout.chunk_seg)
        per_chunk = torch.searchsorted(rows, bounds, right=True, out_int32=True)
        counts = torch.zeros(
            (layout.k, splits.numel()), dtype=torch.int32, device=rows.device
        ).index_add_(0, layout.chunk_seg, per_chunk)
        below = (counts < want).sum(1, dtype=rows.dtype)  # bins ending before the rank
        lo = lo + (below << shift)
    return lo.clamp_(max=int_max - 1)


def kth_smallest_bits(
    bits: Tensor,
    layout: SegmentLayout,
    rank: Tensor,
    method: str,
    rank_list: list[int] | None = None,
) -> Tensor:
    """Per segment, the ``rank``-th smallest (1-based) entry of a packed integer buffer.

    ``bits`` holds non-negative bit patterns with padding set to the dtype's maximum. A rank
    above the segment size returns ``max - 1`` (larger than any finite float's pattern).
    Returns int64 ``[k]``.
    """
    int_max = _int_max(bits.dtype)
    if method == "radix":
        return radix_select(sort_chunks(bits), layout, rank).to(torch.int64)
    if method == "kthvalue":
        ranks = rank_list if rank_list is not None else rank.tolist()
        out = []
        for view, n, r in zip(layout.unpack(bits), layout.numels, ranks, strict=True):
            if r > n:
                out.append(torch.full((), int_max - 1, dtype=torch.int64, device=bits.device))
            else:
                out.append(torch.kthvalue(view, r).values.to(torch.int64))
        return torch.stack(out)
    if method != "bisect":
        raise ValueError(f"unknown method {method!r}")
    # Invariant: the answer lies in [lo, hi]. The range [0, int_max - 1] has int_max values,
    # so ceil(log2(int_max)) halvings leave one. Padding (int_max) is never counted.
    lo = torch.zeros(layout.k, dtype=torch.int64, device=bits.device)
    hi = torch.full((layout.k,), int_max - 1, dtype=torch.int64, device=bits.device)
    passes = math.ceil(math.log2(int_max))
    for _ in range(passes):
        mid = lo + ((hi - lo) >> 1)
        count = layout.seg_count(bits <= layout.per_chunk(mid.to(bits.dtype)))
        ok = count >= rank
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid + 1)
    return lo.clamp_(max=int_max - 1)  # a rank above the segment size ran past hi


def quantile_threshold(
    values: Tensor,
    has_nan: Tensor,
    layout: SegmentLayout,
    q: float,
    method: str,
) -> Tensor:
    """``torch.quantile(segment, q)`` for every segment of a packed non-negative buffer.

    ``values`` must be non-negative floats with padding entries set to NaN whose bit pattern
    is the integer maximum (see :func:`abs_zscores`); ``has_nan`` flags segments containing a
    real NaN. Returns ``[k]`` thresholds, bit for bit what ``torch.quantile`` returns.
    """
    bits = values.view(layout.int_dtype)
    int_max = _int_max(bits.dtype)
    info = layout.ranks(q)
    if method == "radix":
        rows = sort_chunks(bits)
        below = radix_select(rows, layout, info.below + 1)
        # count(<= a_j) and the smallest pattern > a_j, per chunk row by binary search.
        pos = torch.searchsorted(rows, layout.per_chunk(below), right=True)  # [num_chunks, 1]
        n_le = layout.seg_sum(pos.squeeze(1))
        first_above = rows.gather(1, pos.clamp(max=layout.chunk - 1))
        first_above = torch.where(pos < layout.chunk, first_above, int_max)
        nxt = layout.seg_min(first_above, int_max)
        above = torch.where(info.exact | (n_le >= info.below + 2), below, nxt)
        return _lerp_threshold(below, above, has_nan, info, layout)
    below = kth_smallest_bits(
        bits, layout, info.below + 1, method, rank_list=[j + 1 for j in info.below_list]
    )
    below_c = layout.per_chunk(below.to(bits.dtype))
    # a_{j+1}: a_j again if it is tied (count(<= a_j) >= j + 2), else the next larger value.
    n_le = layout.seg_count(bits <= below_c)
    nxt = layout.seg_min(torch.where(bits > below_c, bits, int_max), int_max).to(torch.int64)
    above = torch.where(info.exact | (n_le >= info.below + 2), below, nxt)
    return _lerp_threshold(below, above, has_nan, info, layout)


def _lerp_threshold(
    below: Tensor, above: Tensor, has_nan: Tensor, info: RankInfo, layout: SegmentLayout
) -> Tensor:
    """quantile's ``lerp(a_j, a_c, w)`` from the two order statistics' bit patterns."""
    a_below = below.to(layout.int_dtype).view(layout.dtype)
    a_above = above.to(layout.int_dtype).view(layout.dtype)
    tau = torch.lerp(a_below, a_above, info.weight)
    return torch.where(has_nan, torch.full_like(tau, math.nan), tau)


class TensorStats:
    """Per-tensor ``mean()`` and unbiased ``std()``, started early and collected later.

    Why: these are ZSharp's dominant cost on a GPU. They must stay one ``Tensor.mean()`` and
    one ``Tensor.std()`` kernel per tensor (a batched segment reduction sums in another order
    and moves boundary entries of ``z`` by an ulp, see :func:`abs_zscores`), and ~2 x 50
    tiny reductions issued one after another leave the GPU idle between them: 0.56 ms on
    ResNet-56 and 0.80 ms on ViT-CIFAR per step, on an H100 inside a CUDA graph. On CUDA they
    are spread over ``streams`` side streams (fork from the current stream, join in
    :meth:`collect`), so they run concurrently with each other and with whatever the current
    stream does meanwhile (packing, the global norm); 4 streams cut them to 0.16 / 0.28 ms.
    The kernels are the same, so the values are bit for bit the same. Works inside CUDA graph
    capture (the fork/join becomes parallel branches of the graph).
    """

    def __init__(
        self, tensors: Sequence[Tensor], dtype: torch.dtype, streams: Sequence[torch.cuda.Stream] = ()
    ) -> None:
        def cast(t: Tensor) -> Tensor:
            return t if t.dtype == dtype else t.to(dtype)

        tensors = list(tensors)
        self._streams = list(streams)[: len(tensors)] if tensors and tensors[0].is_cuda else []
        if not self._streams:
            self.means = torch.stack([cast(t).mean() for t in tensors])
            self.stds = torch.stack([cast(t).std() for t in tensors])
            return
        self._main = torch.cuda.current_stream(tensors[0].device)
        # Outputs belong to the current stream; each side stream fills a contiguous block of
        # them and keeps its temporaries (casts, 0-dim results) to itself, so no
        # record_stream is needed.
        self.means = torch.empty(len(tensors), dtype=dtype, device=tensors[0].device)
        self.stds = torch.empty_like(self.means)
        n, k = len(tensors), len(self._streams)
        for i, stream in enumerate(self._streams):
            lo, hi = i * n // k, (i + 1) * n // k
            stream.wait_stream(self._main)
            with torch.cuda.stream(stream):
                src = [cast(t) for t in tensors[lo:hi]]
                torch.stack([t.mean() for t in src], out=self.means[lo:hi])
                torch.stack([t.std() for t in src], out=self.stds[lo:hi])

    def collect(self) -> tuple[Tensor, Tensor]:
        """``(means [k], stds [k])``, usable on the current stream (joins the side streams)."""
        for stream in self._streams:
            self._main.wait_stream(stream)
        self._streams = []
        return self.means, self.stds


def abs_zscores(
    grads: Sequence[Tensor],
    packed: Tensor,
    layout: SegmentLayout,
    stats: TensorStats | None = None,
) -> tuple[Tensor, Tensor]:
    """``|z|`` of every segment, packed, with padding set to the integer-maximum NaN.

    The mean and unbiased std are computed per tensor with ``Tensor.mean()``/``Tensor.std()``,
    exactly as the official code does, so ``z`` matches it bit for bit (a batched segment
    reduction would sum in another order and move boundary entries by an ulp). ``stats`` may
    carry them already started (:class:`TensorStats`). Returns
    ``(abs_z [num_chunks, chunk], has_nan [k])``.
    """
    if stats is None:
        stats = TensorStats(grads, layout.dtype)
    means, stds = stats.collect()
    z = (packed - layout.per_chunk(means)) / layout.per_chunk(stds + 1e-12)
    z.abs_()
    z.view(layout.int_dtype).masked_fill_(layout.pad, _int_max(layout.int_dtype))
    return z, nan_segments(means, stds)


def nan_segments(means: Tensor, stds: Tensor) -> Tensor:
    """Segments whose z is undefined (a NaN/inf statistic): quantile's NaN rule keeps none."""
    return ~(torch.isfinite(means) & torch.isfinite(stds))


def keep_top_count(
    keys: Tensor, layout: SegmentLayout, counts: Tensor, method: str
) -> Tensor:
    """Mask keeping exactly ``counts[i]`` entries with the largest ``keys`` in each segment.

    ``keys`` are non-negative floats (``|g|`` or uniform noise), packed. Ties at the boundary
    are broken by position (earlier entries first), so the count is exact even with ties; all
    of it runs on device without syncs in the "bisect" method.
    """
    bits = keys.view(layout.int_dtype).clone()
    int_max = _int_max(bits.dtype)
    bits.masked_fill_(layout.pad, int_max)
    valid = ~layout.pad
    rank = layout.numel_t - counts + 1  # 1-based rank of the smallest kept key
    rank_list = rank.tolist() if method == "kthvalue" else None
    v = layout.per_chunk(kth_smallest_bits(bits, layout, rank, method, rank_list).to(bits.dtype))
    greater = (bits > v) & valid
    need = layout.per_chunk(counts - layout.seg_count(greater))
    equal = (bits == v) & valid
    cum = torch.cumsum(equal.reshape(-1), 0)
    before = torch.cat([cum.new_zeros(1), cum])[layout.seg_start]  # equal entries before segment
    rank_in_seg = cum.view_as(equal) - layout.per_chunk(before)
    return greater | (equal & (rank_in_seg <= need))


def zscore_masks(
    grads: Sequence[Tensor], q: float, method: str = "auto", chunk: int = CHUNK
) -> list[Tensor]:
    """ZSharp's kept set ``|z| > quantile(|z|, q)`` for each tensor (boolean, same shapes).

    A functional entry point for tests and analysis; the optimizer uses the same pieces.
    """
    if not grads:
        return []
    dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    device = grads[0].device
    layout = SegmentLayout.build([g.numel() for g in grads], dtype, device, chunk)
    packed = layout.pack(grads)
    absz, has_nan = abs_zscores(grads, packed, layout)
    tau = quantile_threshold(absz, has_nan, layout, q, resolve_method(method, device))
    mask = absz > layout.per_chunk(tau)
    return [m.view(g.shape) for m, g in zip(layout.unpack(mask), grads, strict=True)]
