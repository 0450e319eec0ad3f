"""GPU-only checks, collected only where CUDA exists (tests/conftest.py), e.g. on the device:
``python -m pytest tests/gpu``. On a CPU machine they are not collected, rather than skipped."""

from __future__ import annotations

import torch

from ..test_optim_threshold import radix_steps_match_cpu


def test_radix_on_cuda_is_sync_free_and_equals_cpu() -> None:
    radix_steps_match_cpu(torch.device("cuda"))


def _zsharp_perturbations(stats_streams: int, grads: list[torch.Tensor], graph: bool) -> list[torch.Tensor]:
    from zsharp_sweeps.optim.zsharp import ZSharp

    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    opt = ZSharp(params, torch.optim.SGD, lr=0.1, stats_streams=stats_streams, kernels="triton")
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    groups = opt._with_grads()
    out = opt._perturbation(groups)  # eager warm-up: layout, constants, quantile probe
    if not graph:
        return [e.clone() for e in out]
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = opt._perturbation(groups)
    g.replay()
    torch.cuda.synchronize()
    return [e.clone() for e in out]


def test_side_stream_statistics_give_the_same_bits_eager_and_in_a_graph() -> None:
    gen = torch.Generator().manual_seed(3)
    shapes = [(64, 3, 3, 3), (384, 1536), (7, 5), (1, 65, 384), (10,), (384,)] * 8
    grads = [torch.randn(s, generator=gen).cuda() for s in shapes]
    want = _zsharp_perturbations(0, grads, graph=False)
    for streams in (1, 4, 8):
        for graph in (False, True):
            got = _zsharp_perturbations(streams, grads, graph=graph)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), (streams, graph)


def test_triton_kernels_keep_the_same_entries_as_torch_on_cuda() -> None:
    from zsharp_sweeps.optim.zsharp import ZSharp

    gen = torch.Generator().manual_seed(5)
    shapes = [(64, 3, 3, 3), (384, 1536), (7, 5), (1, 65, 384), (10,)] * 4
    grads = [torch.randn(s, generator=gen).cuda() for s in shapes]
    out = {}
    for kernels in ("torch", "triton"):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        opt = ZSharp(params, torch.optim.SGD, lr=0.1, kernels=kernels)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        out[kernels] = [e.clone() for e in opt._perturbation(opt._with_grads())]
    for a, b in zip(out["triton"], out["torch"], strict=True):
        assert torch.equal(a != 0, b != 0)
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0)


def test_auto_picks_the_triton_kernels_on_cuda() -> None:
    from zsharp_sweeps.optim import fused
    from zsharp_sweeps.optim.zsharp import ZSharp

    w = torch.nn.Parameter(torch.zeros(4, 4, device="cuda"))
    assert fused.available(torch.device("cuda"))
    assert ZSharp([w], torch.optim.SGD, lr=0.1)._use_fused(torch.device("cuda"), torch.float32)
