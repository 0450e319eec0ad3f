"""The Triton kernels behind :mod:`zsharp_sweeps.optim.fused` (see there for why and how).

A module of its own, imported on first use: Triton reads ``TRITON_INTERPRET`` when a kernel
is decorated, and its interpreter resolves names through the module globals.
"""

import triton
import triton.language as tl


@triton.jit
def abs_z_kernel(
    g_ptr,
    out_ptr,
    seg_ptr,
    valid_ptr,
    mean_ptr,
    denom_ptr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    seg = tl.load(seg_ptr + row)
    valid = tl.load(valid_ptr + row)
    mean = tl.load(mean_ptr + seg)
    denom = tl.load(denom_ptr + seg)
    for start in tl.static_range(0, CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        bits = _abs_z_bits(g_ptr, row, offs, valid, mean, denom, CHUNK)
        tl.store(out_ptr + row * CHUNK + offs, bits)


@triton.jit
def _abs_z_bits(g_ptr, row, offs, valid, mean, denom, CHUNK: tl.constexpr):
    """A block of ``|z|`` as int32 bits (the order of non-negative floats), padding as the
    integer maximum: what both the Triton and the fused (multi-tensor) paths select from."""
    g = tl.load(g_ptr + row * CHUNK + offs)
    z = tl.abs(tl.div_rn(g - mean, denom))
    bits = z.to(tl.int32, bitcast=True)
    return tl.where(offs < valid, bits, 0x7FFFFFFF)


@triton.jit
def _load_kept(g_ptr, z_ptr, row, offs, tau, CHUNK: tl.constexpr):
    """A block of ``g`` and of ``g_f`` (``g`` where ``|z| > tau``, else 0; padding |z| is NaN,
    so never kept): the shared start of the two passes that build e."""
    g = tl.load(g_ptr + row * CHUNK + offs)
    z = tl.load(z_ptr + row * CHUNK + offs)
    return g, tl.where(z > tau, g, 0.0)


@triton.jit
def kept_sumsq_kernel(
    g_ptr, z_ptr, seg_ptr, tau_ptr, out_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    tau = tl.load(tau_ptr + tl.load(seg_ptr + row))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in tl.static_range(0, CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        _, gf = _load_kept(g_ptr, z_ptr, row, offs, tau, CHUNK)
        acc += gf * gf
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def segment_sum_kernel(part_ptr, first_ptr, count_ptr, out_ptr, BLOCK: tl.constexpr):
    seg = tl.program_id(0)
    first = tl.load(first_ptr + seg)
    count = tl.load(count_ptr + seg)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + first + offs, mask=offs < count, other=0.0)
    tl.store(out_ptr + seg, tl.sum(acc, axis=0))


@triton.jit
def perturb_kernel(
    g_ptr,
    z_ptr,
    e_ptr,
    seg_ptr,
    tau_ptr,
    kept_ptr,
    rho_ptr,
    norm_ptr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    seg = tl.load(seg_ptr + row)
    tau = tl.load(tau_ptr + seg)
    kept = tl.load(kept_ptr + seg)
    rho = tl.load(rho_ptr + seg)
    scale = tl.div_rn(rho, tl.load(norm_ptr) + 1e-12)  # SAM's rho / (G + 1e-12)
    for start in tl.static_range(0, CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        g, gf = _load_kept(g_ptr, z_ptr, row, offs, tau, CHUNK)
        filtered = tl.div_rn(gf * rho, kept + 1e-12)
        tl.store(e_ptr + row * CHUNK + offs, tl.where(kept > 0, filtered, g * scale))


# --- the multi-tensor filter (optim/multitensor.py): |z|, exact threshold and e in 7 kernels ---
# Radix select on the bit patterns of |z| (non-negative floats order like their patterns as
# int32): a 7-bit top digit, then three 8-bit digits. Every pass histograms the digit of the
# entries whose higher digits equal the prefix found so far, per segment, with integer atomics
# (exact in any order); the next pass (every program of a segment alike) reads that histogram
# and picks the bin where the wanted rank falls. Two ranks per segment at once: quantile's
# a_j and a_{j+1}.

@triton.jit
def _chunk_histogram(bits, valid, prefix, HIGH: tl.constexpr, SHIFT: tl.constexpr,
                     NBINS: tl.constexpr):
    """Histogram (``NBINS`` int32) of ``(bits >> SHIFT) & (NBINS - 1)`` over the valid entries
    whose bits above ``HIGH`` equal ``prefix``'s; the rest go to bin 0 and are taken out."""
    match = valid & ((bits >> HIGH) == (prefix >> HIGH))
    digit = tl.where(match, (bits >> SHIFT) & (NBINS - 1), 0)
    hist = tl.histogram(digit, NBINS)
    others = tl.sum((~match).to(tl.int32), axis=0)
    return hist - tl.where(tl.arange(0, NBINS) == 0, others, 0)


@triton.jit
def _pick(hist_ptr, prefix, rem, SHIFT: tl.constexpr, NBINS: tl.constexpr):
    """The bin of a histogram where the ``rem``-th (1-based) entry falls: the prefix extended
    by that digit and the rank left within the bin."""
    bins = tl.arange(0, NBINS)
    hist = tl.load(hist_ptr + bins)
    cum = tl.cumsum(hist, axis=0)
    b = tl.sum((cum < rem).to(tl.int32), axis=0)
    before = tl.sum(tl.where(bins < b, hist, 0), axis=0)
    return prefix | (b << SHIFT), rem - before


@triton.jit
def absz_select0_kernel(g_ptr, z_ptr, seg_ptr, valid_ptr, mean_ptr, std_ptr, hist_ptr,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr, SHIFT: tl.constexpr,
                        NBINS: tl.constexpr):
    """``|z|`` as in ``abs_z_kernel`` (same IEEE operations; ``std + 1e-12`` as PyTorch adds it)
    and the first radix pass's histogram (both ranks share prefix 0: one histogram)."""
    row = tl.program_id(0)
    seg = tl.load(seg_ptr + row)
    valid = tl.load(valid_ptr + row)
    mean = tl.load(mean_ptr + seg)
    denom = tl.load(std_ptr + seg) + 1e-12
    hist = tl.zeros([NBINS], dtype=tl.int32)
    for start in tl.static_range(0, CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        bits = _abs_z_bits(g_ptr, row, offs, valid, mean, denom, CHUNK)
        tl.store(z_ptr + row * CHUNK + offs, bits)
        hist += _chunk_histogram(bits, offs < valid, 0, 31, SHIFT, NBINS)
    tl.atomic_add(hist_ptr + seg * NBINS + tl.arange(0, NBINS), hist, mask=hist != 0)


@triton.jit
def _digit_atomics(hist_ptr, bits, valid, prefix, HIGH: tl.constexpr, SHIFT: tl.constexpr,
                   NBINS: tl.constexpr):
    """Add the digit of each valid entry whose bits above ``HIGH`` equal ``prefix``'s to the
    global histogram, one integer atomic per such entry: the cheap way once few entries
    share the prefix (the last two digits), where a block histogram costs the same for none."""
    match = valid & ((bits >> HIGH) == (prefix >> HIGH))
    digit = (bits >> SHIFT) & (NBINS - 1)
    tl.atomic_add(hist_ptr + digit, match.to(tl.int32), mask=match)


@triton.jit
def select_pass_kernel(z_ptr, seg_ptr, valid_ptr, first_ptr, rank_ptr, state_ptr, hist_ptr, K,
                       PASS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                       PREV_SHIFT: tl.constexpr, SHIFT: tl.constexpr, NBINS: tl.constexpr,
                       SPARSE: tl.constexpr):
    """Radix pass ``PASS`` (1..3) for both ranks. ``hist_ptr``: int32 ``[passes, 2, K, NBINS]``
    (pass 0 uses rank slot 0 only); ``state_ptr``: int32 ``[passes, 2, 2, K]`` (prefix, rank
    left), written by each segment's first chunk for the passes after. Where both ranks share
    their prefix (nearly always: a_j and a_{j+1} are neighbours) one histogram serves both;
    ``SPARSE`` passes add per matching entry instead of histogramming every block."""
    row = tl.program_id(0)
    seg = tl.load(seg_ptr + row)
    valid = tl.load(valid_ptr + row)
    first = row == tl.load(first_ptr + seg)
    prev = PASS - 1
    if PASS == 1:
        p0 = 0
        p1 = 0
        r0 = tl.load(rank_ptr + seg)
        r1 = tl.load(rank_ptr + K + seg)
        h0 = hist_ptr + seg * NBINS
        h1 = h0
    else:
        s = state_ptr + prev * 4 * K
        p0 = tl.load(s + seg)
        r0 = tl.load(s + K + seg)
        p1 = tl.load(s + 2 * K + seg)
        r1 = tl.load(s + 3 * K + seg)
        h0 = hist_ptr + (prev * 2) * K * NBINS + seg * NBINS
        h1 = hist_ptr + (prev * 2 + 1) * K * NBINS + seg * NBINS
    p0, r0 = _pick(h0, p0, r0, PREV_SHIFT, NBINS)
    p1, r1 = _pick(h1, p1, r1, PREV_SHIFT, NBINS)
    out = state_ptr + PASS * 4 * K
    tl.store(out + seg, p0, mask=first)
    tl.store(out + K + seg, r0, mask=first)
    tl.store(out + 2 * K + seg, p1, mask=first)
    tl.store(out + 3 * K + seg, r1, mask=first)
    bins = tl.arange(0, NBINS)
    o0 = hist_ptr + (PASS * 2) * K * NBINS + seg * NBINS
    o1 = hist_ptr + (PASS * 2 + 1) * K * NBINS + seg * NBINS
    if SPARSE:
        for start in tl.static_range(0, CHUNK, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            bits = tl.load(z_ptr + row * CHUNK + offs)
            _digit_atomics(o0, bits, offs < valid, p0, PREV_SHIFT, SHIFT, NBINS)
            _digit_atomics(o1, bits, offs < valid, p1, PREV_SHIFT, SHIFT, NBINS)
    else:
        a0 = tl.zeros([NBINS], dtype=tl.int32)
        if p0 == p1:
            for start in tl.static_range(0, CHUNK, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                bits = tl.load(z_ptr + row * CHUNK + offs)
                a0 += _chunk_histogram(bits, offs < valid, p0, PREV_SHIFT, SHIFT, NBINS)
            tl.atomic_add(o0 + bins, a0, mask=a0 != 0)
            tl.atomic_add(o1 + bins, a0, mask=a0 != 0)
        else:
            a1 = tl.zeros([NBINS], dtype=tl.int32)
            for start in tl.static_range(0, CHUNK, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                bits = tl.load(z_ptr + row * CHUNK + offs)
                a0 += _chunk_histogram(bits, offs < valid, p0, PREV_SHIFT, SHIFT, NBINS)
                a1 += _chunk_histogram(bits, offs < valid, p1, PREV_SHIFT, SHIFT, NBINS)
            tl.atomic_add(o0 + bins, a0, mask=a0 != 0)
            tl.atomic_add(o1 + bins, a1, mask=a1 != 0)


@triton.jit
def select_final_kernel(state_ptr, hist_ptr, exact_ptr, out_ptr, K, LAST: tl.constexpr,
                        PREV_SHIFT: tl.constexpr, NBINS: tl.constexpr):
    """Per segment: a_j and quantile's a_c (a_j where the rank is an integer, else a_{j+1}),
    as int32 bit patterns into ``out_ptr`` ``[2, K]``."""
    seg = tl.program_id(0)
    s = state_ptr + LAST * 4 * K
    h = hist_ptr + (LAST * 2) * K * NBINS + seg * NBINS
    below, _ = _pick(h, tl.load(s + seg), tl.load(s + K + seg), PREV_SHIFT, NBINS)
    above, _ = _pick(h + K * NBINS, tl.load(s + 2 * K + seg), tl.load(s + 3 * K + seg),
                     PREV_SHIFT, NBINS)
    exact = tl.load(exact_ptr + seg) != 0
    tl.store(out_ptr + seg, below)
    tl.store(out_ptr + K + seg, tl.where(exact, below, above))


@triton.jit
def _segment_ok(mean_ptr, std_ptr, seg):
    """quantile's NaN rule: a segment with a non-finite statistic keeps nothing."""
    mean = tl.load(mean_ptr + seg)
    std = tl.load(std_ptr + seg)
    big = 3.4028234663852886e38  # the largest float32: |x| <= big is false for inf and NaN
    return (tl.abs(mean) <= big) & (tl.abs(std) <= big)


@triton.jit
def kept_partial_kernel(g_ptr, z_ptr, seg_ptr, tau_ptr, mean_ptr, std_ptr, out_ptr,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Per chunk: the sum of squares of the kept entries (``|z| > tau``)."""
    row = tl.program_id(0)
    seg = tl.load(seg_ptr + row)
    # quantile's NaN rule: nothing is above the threshold of a segment with a bad statistic
    tau = tl.where(_segment_ok(mean_ptr, std_ptr, seg), tl.load(tau_ptr + seg), float("inf"))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in tl.static_range(0, CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + row * CHUNK + offs)
        z = tl.load(z_ptr + row * CHUNK + offs).to(tl.float32, bitcast=True)
        gf = tl.where(z > tau, g, 0.0)
        acc += gf * gf
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def perturb_multi_kernel(g_ptr, z_ptr, e_ptr, seg_ptr, first_ptr, count_ptr, tau_ptr, mean_ptr,
                         std_ptr, part_ptr, rho_ptr, norm_ptr, CHUNK: tl.constexpr,
                         BLOCK: tl.constexpr, SBLOCK: tl.constexpr):
    """``e`` of one chunk: ``rho * g_f / (||g_f|| + 1e-12)`` where its segment keeps something,
    else SAM's ``g * rho / (G + 1e-12)``. ``||g_f||`` is the square root of the segment's
    per-chunk partials, summed here in chunk order (the same sum in every program)."""
    row = tl.program_id(0)
    seg = tl.load(seg_ptr + row)
    # quantile's NaN rule: nothing is above the threshold of a segment with a bad statistic
    tau = tl.where(_segment_ok(mean_ptr, std_ptr, seg), tl.load(tau_ptr + seg), float("inf"))
    first = tl.load(first_ptr + seg)
    count = tl.load(count_ptr + seg)
    sacc = tl.zeros([SBLOCK], dtype=tl.float32)
    for start in range(0, count, SBLOCK):
        offs = start + tl.arange(0, SBLOCK)
        sacc += tl.load(part_ptr + first + offs, mask=offs < count, other=0.0)
    kept = tl.sqrt_rn(tl.sum(sacc, axis=0))
    rho = tl.load(rho_ptr + seg)
    scale = tl.div_rn(rho, tl.load(norm_ptr) + 1e-12)  # SAM's rho / (G + 1e-12)
    for start in tl.static_range(0, CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + row * CHUNK + offs)
        z = tl.load(z_ptr + row * CHUNK + offs).to(tl.float32, bitcast=True)
        gf = tl.where(z > tau, g, 0.0)
        filtered = tl.div_rn(gf * rho, kept + 1e-12)
        tl.store(e_ptr + row * CHUNK + offs, tl.where(kept > 0, filtered, g * scale))
