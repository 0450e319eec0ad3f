"""ZSharp's exact fast threshold, pinned bit for bit to the slow reference straight from SPEC.md."""

from __future__ import annotations

import time

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
    """SPEC.md / the official code, verbatim: z-score, torch.quantile, strict >."""
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


def test_linear_4096x4200_is_exact_and_fast() -> None:
    """17.2M entries (over torch.quantile's old 2^24 limit) on CPU in a few seconds.

    This seed is also a case where SPEC.md's shortcut {|z| > a_j} is off by one: a_j and
    a_{j+1} are one ulp apart and the lerp weight is 0.845, so torch.quantile's tau rounds up
    to a_{j+1} (which is tied with a_{j+2}); the shortcut would keep 2 more entries.
    """
    g = torch.randn(4096, 4200, generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    (mask,) = zscore_masks([g], 0.95)
    elapsed = time.perf_counter() - start
    z = ((g - g.mean()) / (g.std() + 1e-12)).abs()
    assert torch.equal(mask, z > torch.quantile(z.reshape(-1), 0.95))
    assert int(mask.sum()) == 860159  # n - 1 - j = 860160 without the rounding above
    assert elapsed < 15.0
