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


def test_fused_kernels_keep_the_official_entries_on_cuda() -> None:
    """The multi-tensor path (kernels="fused", the CUDA default) against the PyTorch path:
    the same kept entries, e up to float32 rounding, e in each parameter's layout."""
    from zsharp_sweeps.optim.zsharp import ZSharp

    gen = torch.Generator().manual_seed(7)
    shapes = [(64, 3, 3, 3), (384, 1536), (7, 5), (1, 65, 384), (10,), (1, 1)] * 4
    grads = [torch.randn(s, generator=gen).cuda() for s in shapes]
    grads[0] = grads[0].contiguous(memory_format=torch.channels_last)
    out = {}
    for kernels in ("torch", "fused"):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        opt = ZSharp(params, torch.optim.SGD, lr=0.1, kernels=kernels)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        out[kernels] = [e.clone() for e in opt._perturbation(opt._with_grads())]
        if kernels == "fused":
            assert all(e.stride() == p.stride() for e, p in zip(
                opt._perturbation(opt._with_grads()), params, strict=True))
    for a, b in zip(out["fused"], out["torch"], strict=True):
        assert torch.equal(a != 0, b != 0)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_a_captured_fused_step_takes_statistics_from_hooks_and_replays_eager_bits() -> None:
    """In a CUDA graph the statistics start from gradient hooks (during the backward pass);
    the replays give the eager steps' weights bit for bit."""
    from zsharp_sweeps.graphs import CudaGraphStep
    from zsharp_sweeps.optim.step import train_step
    from zsharp_sweeps.optim.zsharp import ZSharp

    def run(graph: bool) -> tuple[list[torch.Tensor], int]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16),
                                    torch.nn.ReLU(), torch.nn.Flatten(),
                                    torch.nn.Linear(16 * 30 * 30, 10)).cuda()
        opt = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                     kernels="fused")

        def step(x: torch.Tensor, y: torch.Tensor):
            return train_step(model, opt, torch.nn.functional.cross_entropy, x, y)

        run_step = CudaGraphStep(step, opt, warmup=2) if graph else step
        gen = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(6):
            x = torch.randn(32, 3, 32, 32, device="cuda", generator=gen)
            y = torch.randint(0, 10, (32,), device="cuda", generator=gen)
            run_step(x, y)
        torch.cuda.synchronize()
        return [p.detach().clone() for p in model.parameters()], opt._early_stats.reused

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    eager, reused_eager = run(graph=False)
    graphed, reused_graph = run(graph=True)
    assert reused_eager == 0 and reused_graph == 2  # conv and linear weights, at capture
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed, strict=True))
