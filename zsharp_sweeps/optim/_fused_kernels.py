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
        g = tl.load(g_ptr + row * CHUNK + offs)
        z = tl.abs(tl.div_rn(g - mean, denom))
        bits = z.to(tl.int32, bitcast=True)
        bits = tl.where(offs < valid, bits, 0x7FFFFFFF)  # padding: the integer maximum
        tl.store(out_ptr + row * CHUNK + offs, bits)


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
