"""ZSharp's exact fast threshold, pinned bit for bit to the slow reference (the official code's
rule, docs/algorithms.md "ZSharp")."""

from __future__ import annotations

import math

import pytest
import torch

from zsharp_sweeps.optim.threshold import (
    SegmentLayout,
    abs_zscores,
    keep_top_count,
    quantile_threshold,
    zscore_masks,
)


def reference_mask(g: torch.Tensor, q: float) -> torch.Tensor:
    """The official code, verbatim: z-score, torch.quantile, strict > (docs/algorithms.md)."""
    z = (g - g.mean()) / (g.std() + 1e-12)
    return z.abs() > torch.quantile(z.abs(), q)


def reference_tau(g: torch.Tensor, q: float) -> torch.Tensor:
    z = (g - g.mean()) / (g.std() + 1e-12)
    return torch.quantile(z.abs(), q)


def _cases() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(7, 5, generator=gen),
        torch.randn(3, 2, 4, generator=gen),
        (torch.randn(9, 9, generator=gen) * 2).round() / 2,  # many ties
        torch.tensor([[1.0, 1.0, 1.0, 2.0, 2.0, 3.0]]),  # ties at every rank
        torch.randn(40, 37, generator=gen),  # spans many 16-entry chunks
        torch.randn(1, 2, generator=gen),
    ]


@pytest.mark.parametrize("method", ["bisect", "kthvalue"])
@pytest.mark.parametrize("q", [0.0, 0.3333, 0.5, 0.7, 0.95, 0.999])
def test_fast_mask_equals_reference_bit_for_bit(method: str, q: float) -> None:
    grads = _cases()
    masks = zscore_masks(grads, q, method=method, chunk=16)
    for g, m in zip(grads, masks, strict=True):
        assert torch.equal(m, reference_mask(g, q)), (g.shape, q, method)


def test_float64_gradients_match_reference() -> None:
    grads = [g.double() for g in _cases()]
    for q in (0.0, 0.7, 0.95):
        for method in ("bisect", "kthvalue"):
            masks = zscore_masks(grads, q, method=method, chunk=16)
            assert all(torch.equal(m, reference_mask(g, q)) for g, m in zip(grads, masks, strict=True))


@pytest.mark.parametrize("method", ["bisect", "kthvalue"])
def test_threshold_value_is_torch_quantile_bits(method: str) -> None:
    grads = _cases()
    layout = SegmentLayout.build([g.numel() for g in grads], torch.float32, torch.device("cpu"), 16)
    absz, has_nan = abs_zscores(grads, layout.pack(grads), layout)
    for q in (0.0, 0.1, 0.95):
        tau = quantile_threshold(absz, has_nan, layout, q, method)
        want = torch.stack([reference_tau(g, q) for g in grads])
        assert torch.equal(tau.view(torch.int32), want.view(torch.int32))


def test_strictly_greater_and_hand_numbers() -> None:
    # mean 0, |z| = [1.26, .63, 0, .63, 1.26]; q = .5 -> rank 2 exactly -> tau = .63:
    # the entries equal to tau are dropped (strict >), only +-2 survive.
    g = torch.tensor([[-2.0, -1.0, 0.0, 1.0, 2.0]])
    for method in ("bisect", "kthvalue"):
        (mask,) = zscore_masks([g], 0.5, method=method)
        assert mask.tolist() == [[True, False, False, False, True]]


def test_q_zero_keeps_everything_above_the_minimum() -> None:
    g = torch.tensor([[0.0, 1.0, 2.0, 10.0]])  # mean 3.25: |z| smallest at 2.0
    for method in ("bisect", "kthvalue"):
        (mask,) = zscore_masks([g], 0.0, method=method)
        assert mask.tolist() == [[True, True, False, True]]


def test_equal_abs_z_keeps_nothing_and_nan_keeps_nothing() -> None:
    flat = torch.tensor([[1.0, -1.0, 1.0, -1.0]])  # every |z| is the threshold
    nan = torch.tensor([[1.0, float("nan")], [0.0, 2.0]])
    for method in ("bisect", "kthvalue"):
        masks = zscore_masks([flat, nan], 0.5, method=method)
        assert not masks[0].any() and not masks[1].any()


def test_bisect_matches_kthvalue_on_a_larger_mixed_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(300, 200, generator=gen), torch.randn(64, 3, 3, 3, generator=gen)]
    grads.append(torch.randn(5, 5, generator=gen).round())
    a = zscore_masks(grads, 0.95, method="bisect")
    b = zscore_masks(grads, 0.95, method="kthvalue")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("method", ["bisect", "kthvalue"])
def test_keep_top_count_is_exact_with_ties(method: str) -> None:
    keys_list = [
        torch.tensor([3.0, 1.0, 3.0, 3.0, 0.0, 2.0]),  # 3 tied at the top
        torch.tensor([5.0, 5.0, 5.0, 5.0]),
        torch.arange(20.0),
    ]
    layout = SegmentLayout.build([k.numel() for k in keys_list], torch.float32, torch.device("cpu"), 4)
    counts = torch.tensor([2, 0, 7])
    mask = keep_top_count(layout.pack(keys_list), layout, counts, method)
    views = layout.unpack(mask)
    assert [int(v.sum()) for v in views] == [2, 0, 7]
    assert views[0].tolist() == [True, False, True, False, False, False]  # ties: earlier first
    assert views[2].nonzero().flatten().tolist() == list(range(13, 20))


def test_linear_4096x4200_is_exact_for_every_method() -> None:
    """17.2M entries (over torch.quantile's old 2^24 limit): quickselect and radix select.

    This seed is also a case where the shortcut {|z| > a_j} of docs/algorithms.md is off by
    one: a_j and a_{j+1} are one ulp apart and the lerp weight is 0.845, so torch.quantile's
    tau rounds up to a_{j+1} (which is tied with a_{j+2}); the shortcut would keep 2 more
    entries. The one test of this size; what it costs is a benchmark number
    (``python -m zsharp_sweeps.bench --threshold``), not an assertion.
    """
    g = torch.randn(4096, 4200, generator=torch.Generator().manual_seed(2))
    z = ((g - g.mean()) / (g.std() + 1e-12)).abs()
    want = z > torch.quantile(z.reshape(-1), 0.95)
    assert int(want.sum()) == 860159  # n - 1 - j = 860160 without the rounding above
    for method in ("kthvalue", "radix"):
        (mask,) = zscore_masks([g], 0.95, method=method)
        assert torch.equal(mask, want), method


# --- the radix select (what accelerators use) --------------------------------------------


@pytest.mark.parametrize("q", [0.0, 0.3333, 0.5, 0.7, 0.95, 0.999])
def test_radix_mask_equals_reference_bit_for_bit(q: float) -> None:
    grads = _cases()
    for dtype in (torch.float32, torch.float64):
        gs = [g.to(dtype) for g in grads]
        masks = zscore_masks(gs, q, method="radix", chunk=16)
        for g, m in zip(gs, masks, strict=True):
            assert torch.equal(m, reference_mask(g, q)), (g.shape, q, dtype)


def test_radix_threshold_value_is_torch_quantile_bits() -> None:
    grads = _cases()
    layout = SegmentLayout.build([g.numel() for g in grads], torch.float32, torch.device("cpu"), 16)
    absz, has_nan = abs_zscores(grads, layout.pack(grads), layout)
    for q in (0.0, 0.1, 0.5, 0.95, 0.999):
        tau = quantile_threshold(absz, has_nan, layout, q, "radix")
        want = torch.stack([reference_tau(g, q) for g in grads])
        assert torch.equal(tau.view(torch.int32), want.view(torch.int32))


def test_radix_hand_cases_ties_and_nan() -> None:
    g = torch.tensor([[-2.0, -1.0, 0.0, 1.0, 2.0]])
    assert zscore_masks([g], 0.5, method="radix")[0].tolist() == [[True, False, False, False, True]]
    g = torch.tensor([[0.0, 1.0, 2.0, 10.0]])
    assert zscore_masks([g], 0.0, method="radix")[0].tolist() == [[True, True, False, True]]
    flat = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    nan = torch.tensor([[1.0, float("nan")], [0.0, 2.0]])
    masks = zscore_masks([flat, nan], 0.5, method="radix")
    assert not masks[0].any() and not masks[1].any()


def test_radix_matches_bisect_and_kthvalue_on_random_batches() -> None:
    gen = torch.Generator().manual_seed(3)
    for trial in range(6):
        sizes = torch.randint(1, 3000, (5,), generator=gen).tolist()
        grads = [torch.randn(n, 1, generator=gen) for n in sizes]
        grads.append((torch.randn(50, 30, generator=gen) * 2).round())  # heavy ties
        grads.append(torch.randn(300, 200, generator=gen))  # many chunks in one segment
        for dtype in (torch.float32, torch.float64):
            gs = [g.to(dtype) for g in grads]
            for q in (0.0, 0.3, 0.95, 0.999):
                want = zscore_masks(gs, q, method="kthvalue", chunk=64)
                methods = ("radix", "bisect") if trial == 0 and q == 0.95 else ("radix",)
                for method in methods:  # bisect is slow on CPU: once
                    got = zscore_masks(gs, q, method=method, chunk=64)
                    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_select_any_bit_pattern_and_rank(dtype: torch.dtype) -> None:
    """Every rank 1..n+1 (n+1: above the segment) over patterns spanning the whole range
    below the padding pattern, including 0, the largest digits and duplicated values."""
    from zsharp_sweeps.optim.threshold import _INT_FOR, kth_smallest_bits

    int_dtype = _INT_FOR[dtype]
    top = torch.iinfo(int_dtype).max
    gen = torch.Generator().manual_seed(4)
    sizes = [1, 5, 16, 17, 40]
    layout = SegmentLayout.build(sizes, dtype, torch.device("cpu"), 16)
    segs = []
    for n in sizes:
        v = torch.randint(0, 2**31 - 1, (n,), generator=gen, dtype=torch.int64)
        v = (v * (top // (2**31 - 1))).clamp(max=top - 1)  # the full range
        v[: n // 3] = v[n // 3 : 2 * (n // 3)]  # duplicates
        if n > 3:
            v[0], v[1], v[2] = 0, top - 1, top - 1  # extremes (top itself is the padding)
        segs.append(v.to(int_dtype))
    bits = torch.cat(
        [torch.cat([s, torch.full((-len(s) % 16,), top, dtype=int_dtype)]) for s in segs]
    ).view(layout.num_chunks, 16)
    for offset in range(max(sizes) + 1):
        rank = torch.tensor([min(offset, n) + 1 for n in sizes])  # up to n + 1
        want = kth_smallest_bits(bits, layout, rank, "kthvalue", rank.tolist())
        assert torch.equal(kth_smallest_bits(bits, layout, rank, "radix"), want)
        assert torch.equal(kth_smallest_bits(bits, layout, rank, "bisect"), want)


def test_radix_keep_top_count_is_exact_with_ties() -> None:
    keys_list = [
        torch.tensor([3.0, 1.0, 3.0, 3.0, 0.0, 2.0]),
        torch.tensor([5.0, 5.0, 5.0, 5.0]),
        torch.arange(20.0),
    ]
    layout = SegmentLayout.build([k.numel() for k in keys_list], torch.float32, torch.device("cpu"), 4)
    mask = keep_top_count(layout.pack(keys_list), layout, torch.tensor([2, 0, 7]), "radix")
    views = layout.unpack(mask)
    assert [int(v.sum()) for v in views] == [2, 0, 7]
    assert views[0].tolist() == [True, False, True, False, False, False]
    assert views[2].nonzero().flatten().tolist() == list(range(13, 20))


def test_radix_passes_cover_every_bit_once() -> None:
    for dtype, bits in ((torch.float32, 31), (torch.float64, 63)):
        layout = SegmentLayout.build([3], dtype, torch.device("cpu"), 16)
        passes = layout.radix_passes()
        widths = [(prev - shift) for prev, (shift, _) in zip([bits] + [s for s, _ in passes], passes)]
        assert sum(widths) == bits and passes[-1][0] == 0 and max(widths) <= 8
        assert len(passes) == math.ceil(bits / 8)
        for (shift, splits), width in zip(passes, widths, strict=True):
            assert splits.tolist() == [((b + 1) << shift) - 1 for b in range(2**width - 1)]
        assert layout.radix_passes() is passes  # cached per layout


def test_auto_uses_radix_off_cpu() -> None:
    from zsharp_sweeps.optim.threshold import resolve_method

    assert resolve_method("auto", torch.device("cpu")) == "kthvalue"
    assert resolve_method("auto", torch.device("cuda")) == "radix"
    assert resolve_method("auto", torch.device("mps")) == "radix"
    with pytest.raises(ValueError):
        resolve_method("sort", torch.device("cpu"))


@pytest.mark.parametrize("filter_", ["zscore", "magnitude", "random"])
def test_zsharp_first_step_identical_across_methods(filter_: str) -> None:
    from zsharp_sweeps.optim.zsharp import ZSharp

    shapes = [(16, 3, 3, 3), (16,), (32, 16, 3, 3), (10, 32), (10,), (1, 65, 24)]
    results = []
    for method in ("kthvalue", "bisect", "radix"):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        grads = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt = ZSharp(params, torch.optim.SGD, lr=0.1, filter=filter_, threshold_method=method)
        opt.first_step()
        results.append([p.detach().clone() for p in params])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def radix_steps_match_cpu(device: torch.device) -> None:
    """Warm up (layout, constants), then run the per-step path with host syncs forbidden on
    CUDA (``set_sync_debug_mode("error")``); the masks must equal the CPU quickselect's."""
    from zsharp_sweeps.optim.zsharp import ZSharp

    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(s, generator=gen) for s in [(64, 3, 3, 3), (384, 1536), (7, 5), (1, 65, 384)]]
    want = zscore_masks(grads, 0.95, method="kthvalue")
    dev = [g.to(device) for g in grads]
    layout = SegmentLayout.build([g.numel() for g in dev], torch.float32, device)
    absz, has_nan = abs_zscores(dev, layout.pack(dev), layout)
    quantile_threshold(absz, has_nan, layout, 0.95, "radix")  # probes quantile once (syncs)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in dev]
    opts = []
    for filter_ in ("zscore", "magnitude", "random"):
        opt = ZSharp(params, torch.optim.SGD, lr=0.1, filter=filter_, threshold_method="radix")
        for p, g in zip(params, dev, strict=True):
            p.grad = g
        opt.first_step()  # warm-up: builds the cached layout and constants
        opt.restore()
        opts.append(opt)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        absz, has_nan = abs_zscores(dev, layout.pack(dev), layout)
        tau = quantile_threshold(absz, has_nan, layout, 0.95, "radix")
        mask = absz > layout.per_chunk(tau)
        for opt in opts:
            opt.first_step()
            opt.restore()
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    got = [m.view(g.shape).cpu() for m, g in zip(layout.unpack(mask), grads, strict=True)]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_radix_step_path_on_cpu() -> None:
    radix_steps_match_cpu(torch.device("cpu"))

