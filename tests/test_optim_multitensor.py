"""ZSharp's multi-tensor filter (``kernels="fused"``, the CUDA default): the official kept set
bit for bit, on many random shapes (ties, 1-entry and constant tensors, NaN, channels-last
weights, several chunks per tensor), through Triton's interpreter on the CPU (each check in a
fresh interpreter, see tests/multitensor_checks.py). On a GPU, scripts/bench_issue23.sh checks
the compiled kernels the same way, 17.2M-entry tensors included."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from zsharp_sweeps.optim import ZSharp, fused, multitensor
from zsharp_sweeps.optim.threshold import SegmentLayout

from .conftest import REPO


def _run(call: str, timeout: float = 600) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", f"import tests.multitensor_checks as c; c.{call}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow  # Triton's interpreter
def test_kept_sets_are_the_official_ones_on_random_shapes() -> None:
    """32 random tensors (plus hand cases) at 5 Q_p: tiny chunks make most span many."""
    _run("kept_sets_are_the_official_ones(0, 12, 40, 16); "
         "c.kept_sets_are_the_official_ones(1, 10, 300, 64); "
         "c.kept_sets_are_the_official_ones(2, 6, 3000, 256)")


@pytest.mark.slow  # Triton's interpreter: 120k entries in 4096-entry chunks
def test_a_large_tensor_is_exact() -> None:
    _run("large_segment_is_exact(120_000, 4096)")


@pytest.mark.slow  # Triton's interpreter
def test_fused_optimizer_matches_the_torch_path() -> None:
    """Two param groups (two rhos), a bias, channels-last weights, a NaN gradient."""
    _run("optimizer_matches_the_torch_path((0.05, 0.05), False, False); "
         "c.optimizer_matches_the_torch_path((0.05, 0.2), True, False); "
         "c.optimizer_matches_the_torch_path((0.05, 0.05), True, True)")


@pytest.mark.slow  # Triton's interpreter, a few training steps
def test_statistics_from_gradient_hooks_give_the_same_steps() -> None:
    _run("hooks_give_the_same_training()")


def test_memory_order_views_round_trip() -> None:
    """Packing in memory order and unpacking with the tensor's strides give back the same
    tensor, for contiguous, channels-last and permuted layouts."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(4, 3, 5, 2, generator=gen), torch.randn(6, 7, generator=gen),
            torch.randn(1, 9, generator=gen)]
    tensors = [base[0].contiguous(memory_format=torch.channels_last), base[1].t(), base[2],
               base[0][:, :2]]  # the last one is not dense: packed by copy, logical order
    layout = SegmentLayout.build([t.numel() for t in tensors], torch.float32,
                                 torch.device("cpu"), 16)
    packed, orders = multitensor.pack(layout, tensors)
    assert orders == [True, True, True, False]
    back = multitensor.unpack_like(packed, layout, tensors, orders)
    for t, b, mem in zip(tensors, back, orders, strict=True):
        assert torch.equal(t, b)
        if mem:
            assert b.stride() == t.stride()


def test_statistics_written_in_place_are_the_tensor_methods_bits() -> None:
    """``z`` needs each tensor's own ``mean()``/``std()``: the ``out=`` form the fused path
    uses gives the same bits (channels-last too)."""
    gen = torch.Generator().manual_seed(1)
    cases = [torch.randn(64, 3, 3, 3, generator=gen) * 3 + 1, torch.randn(384, 1536, generator=gen),
             torch.randn(7, generator=gen), torch.randn(1, 65, 384, generator=gen)]
    cases.append(cases[0].contiguous(memory_format=torch.channels_last))
    means, stds = torch.zeros(len(cases)), torch.zeros(len(cases))
    for i, g in enumerate(cases):
        multitensor.launch_stats(g, means[i], stds[i], None)
        assert torch.equal(means[i], g.mean()) and torch.equal(stds[i], g.std())


def test_kernel_paths() -> None:
    """``auto`` is the multi-tensor path on CUDA with Triton and PyTorch elsewhere; the earlier
    path stays selectable; the controls and float64 always use PyTorch."""
    w = torch.nn.Parameter(torch.zeros(2, 2))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    f32, f64 = torch.float32, torch.float64
    auto = ZSharp([w], torch.optim.SGD, lr=0.1)
    assert auto._kernel_path(cpu, f32) == "torch"
    assert auto._kernel_path(cuda, f32) == ("fused" if fused._triton_importable() else "torch")
    assert ZSharp([w], torch.optim.SGD, lr=0.1, kernels="triton")._kernel_path(cuda, f32) == "triton"
    assert ZSharp([w], torch.optim.SGD, lr=0.1, kernels="fused")._kernel_path(cuda, f64) == "torch"
    assert ZSharp([w], torch.optim.SGD, lr=0.1, kernels="fused",
                  filter="magnitude")._kernel_path(cuda, f32) == "torch"
    with pytest.raises(ValueError, match="kernels='cuda'.*auto, torch, triton, fused"):
        ZSharp([w], torch.optim.SGD, lr=0.1, kernels="cuda")


def test_gradient_hooks_put_every_statistic_on_one_side_stream() -> None:
    """Measured on an H100 (docs/benchmarks.md): every hook forked onto another side stream
    was a branch of the captured graph that widened the gaps between all its kernels; one
    stream took ViT's graph step from 1.05x to 1.028x SAM's. ``begin`` (eager and compiled
    steps) still spreads what it computes over every stream."""
    w = torch.nn.Parameter(torch.zeros(2, 2))
    opt = ZSharp([w], torch.optim.SGD, lr=0.1)
    streams = [object(), object(), object()]
    early = multitensor.EarlyStats(opt, lambda device: streams)
    picked = [early._side_stream(torch.device("cuda")) for _ in range(5)]
    assert all(s is streams[0] for s in picked)
    assert early._used == {streams[0]}
    assert multitensor.EarlyStats(opt, lambda device: [])._side_stream(torch.device("cuda")) is None
