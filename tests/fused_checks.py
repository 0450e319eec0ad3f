"""Checks of ZSharp's Triton kernels against the plain PyTorch path, run by
tests/test_optim_fused.py in a fresh interpreter with ``TRITON_INTERPRET=1`` (Triton's
interpreter must be chosen before anything else imports Triton, torch.compile included)."""

from __future__ import annotations

import pytest
import torch

from zsharp_sweeps.optim import fused
from zsharp_sweeps.optim.threshold import SegmentLayout, TensorStats, abs_zscores

from .multitensor_checks import zsharp_perturbations


def _grads(seed: int = 0, with_nan: bool = True) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=gen) * 10 ** float(torch.randn(1, generator=gen))
             for s in [(64, 3, 3, 3), (50, 41), (7, 5), (1, 65, 38), (2, 2)]]
    grads.append(torch.zeros(3, 4))  # std 0: z is NaN/inf -> nothing kept -> SAM scale
    if with_nan:
        grads.append(torch.full((5, 5), 2.5))
        grads[-1][1, 1] = float("nan")  # a NaN segment: quantile's rule keeps nothing
    return grads


def abs_z_is_bit_identical(chunk: int) -> None:
    grads = _grads()
    layout = SegmentLayout.build([g.numel() for g in grads], torch.float32, torch.device("cpu"), chunk)
    packed = layout.pack(grads)
    want, want_nan = abs_zscores(grads, packed, layout)
    stats = TensorStats(grads, torch.float32)
    got, got_nan = fused.abs_zscores(packed, layout, stats.means, stats.stds)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.equal(got_nan, want_nan)


def perturbation_keeps_the_same_entries(rhos: tuple[float, float]) -> None:
    grads = _grads(1, with_nan=False)
    want = zsharp_perturbations("torch", grads, rhos)
    got = zsharp_perturbations("triton", grads, rhos)
    assert len(got) == len(want) == len(grads) + 1
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a != 0, b != 0)  # the kept set (and the SAM fallbacks) agree exactly
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0)
    # Order: group 0 (grads 0-2, then the bias), group 1 (grads 3-5). A kept layer moves by
    # its group's rho; the all-zero layer falls back to SAM's scale (e = 0).
    assert got[0].norm().item() == pytest.approx(rhos[0], rel=1e-5)
    assert got[4].norm().item() == pytest.approx(rhos[1], rel=1e-5)
    assert torch.equal(got[6], torch.zeros(3, 4))


def perturbation_with_a_nan_gradient_matches() -> None:
    grads = _grads(2)  # the NaN makes G NaN: every SAM-scaled e is NaN, as in the official code
    want = zsharp_perturbations("torch", grads, (0.05, 0.05))
    got = zsharp_perturbations("triton", grads, (0.05, 0.05))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0, equal_nan=True)
