"""Checks of ZSharp's multi-tensor filter (``kernels="fused"``, optim/multitensor.py) against
the official rule and the plain PyTorch path, run by tests/test_optim_multitensor.py in a
fresh interpreter with ``TRITON_INTERPRET=1`` (as tests/fused_checks.py: Triton's interpreter
must be chosen before anything imports Triton).

What "exact" means here: every segment's ``tau`` has the bits of ``torch.quantile(|z|, Q_p)``
with ``z = (g - g.mean()) / (g.std() + 1e-12)``, so the kept set ``|z| > tau`` is the official
one entry for entry; ``e`` equals the PyTorch path's up to the last bit.
"""

from __future__ import annotations

import math

import torch

from zsharp_sweeps.optim import ZSharp, multitensor
from zsharp_sweeps.optim.threshold import SegmentLayout

QS = (0.0, 0.3333, 0.95, 0.999)


def official(g: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's threshold and kept set (docs/algorithms.md, "ZSharp")."""
    z = (g - g.mean()) / (g.std() + 1e-12)
    tau = torch.quantile(z.abs().reshape(-1), q)
    return tau, z.abs() > tau


def random_grads(gen: torch.Generator, count: int, max_numel: int) -> list[torch.Tensor]:
    """Shapes of 1 to 4 dims and 1 to ``max_numel`` entries, scales over 12 decades, some
    with heavy ties (rounded, or few distinct values), some constant."""
    out = []
    for _ in range(count):
        n = int(torch.randint(1, max_numel + 1, (1,), generator=gen))
        dims = int(torch.randint(1, 5, (1,), generator=gen))
        shape = [n] + [1] * (dims - 1)
        perm = torch.randperm(dims, generator=gen).tolist()
        shape = [shape[i] for i in perm]
        g = torch.randn(shape, generator=gen) * 10 ** float(torch.randint(-6, 6, (1,), generator=gen))
        kind = int(torch.randint(0, 5, (1,), generator=gen))
        if kind == 1:
            g = (g * 4 / g.abs().max().clamp_min(1e-30)).round()  # ties: a few distinct values
        elif kind == 2:
            g = torch.full_like(g, 0.25)  # constant: std 0
        out.append(g)
    return out


def _filter(grads: list[torch.Tensor], q: float, chunk: int) -> tuple[
        SegmentLayout, multitensor.FilterBuffers, torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = SegmentLayout.build([g.numel() for g in grads], torch.float32, torch.device("cpu"),
                                 chunk)
    params = [torch.zeros_like(g) for g in grads]
    bufs = multitensor.FilterBuffers.build(layout, params, q)
    for i, g in enumerate(grads):
        multitensor.launch_stats(g, bufs.mean_slots[i], bufs.std_slots[i], None)
    packed, orders = multitensor.pack(layout, grads)
    absz, tau = multitensor.select_threshold(packed, bufs, block=chunk)
    return layout, bufs, packed, absz, tau


def kept_sets_are_the_official_ones(seed: int, count: int, max_numel: int, chunk: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    grads = random_grads(gen, count, max_numel)
    grads += [torch.tensor([[1.0, 1.0, 1.0, 2.0, 2.0, 3.0]]), torch.randn(1, generator=gen),
              torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]), torch.zeros(7)]
    for q in QS:
        layout, bufs, packed, absz, tau = _filter(grads, q, chunk)
        values = absz.view(torch.float32)
        for i, g in enumerate(grads):
            want_tau, want_mask = official(g, q)
            start = layout.chunk_offsets[i] * chunk
            got_mask = values.reshape(-1)[start : start + g.numel()] > tau[i]
            if math.isnan(float(want_tau)):  # quantile's NaN rule (std of one entry is NaN)
                assert not bool(torch.isfinite(bufs.stds[i]) & torch.isfinite(bufs.means[i]))
                continue
            assert torch.equal(tau[i].view(torch.int32), want_tau.view(torch.int32)), (
                seed, q, i, g.shape, float(tau[i]), float(want_tau))
            assert torch.equal(got_mask, want_mask.reshape(-1)), (seed, q, i, g.shape)


def large_segment_is_exact(numel: int, chunk: int) -> None:
    """One large tensor (many chunks, every count in the thousands), plus a tied one."""
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(numel, generator=gen),
             (torch.randn(numel // 3, generator=gen) * 3).round()]
    for q in (0.5, 0.95, 0.999):
        layout, bufs, packed, absz, tau = _filter(grads, q, chunk)
        for i, g in enumerate(grads):
            want_tau, want_mask = official(g, q)
            start = layout.chunk_offsets[i] * chunk
            got = absz.view(torch.float32).reshape(-1)[start : start + g.numel()] > tau[i]
            assert torch.equal(tau[i].view(torch.int32), want_tau.view(torch.int32)), (q, i)
            assert torch.equal(got, want_mask), (q, i)


def _named_grads(seed: int, nan: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=gen) * 10 ** float(torch.randn(1, generator=gen))
             for s in [(64, 3, 3, 3), (50, 41), (7, 5), (1, 65, 38), (2, 2), (1, 1), (16, 8, 3, 3)]]
    grads.append(torch.zeros(3, 4))  # std 0: nothing kept -> SAM's scale (e = 0)
    if nan:
        grads.append(torch.full((5, 5), 2.5))
        grads[-1][1, 1] = float("nan")
    return grads


def zsharp_perturbations(kernels: str, grads: list[torch.Tensor], rhos: tuple[float, float],
                         channels_last: bool = False) -> list[torch.Tensor]:
    """ZSharp's ascent directions ``e`` for ``grads`` (two param groups at ``rhos`` and a
    bias) with ``optimizer.kernels=kernels``: what every kernel path is compared by."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    if channels_last:
        params = [torch.nn.Parameter(p.detach().contiguous(memory_format=torch.channels_last))
                  if p.dim() == 4 else p for p in params]
    half = len(params) // 2
    groups = [{"params": params[:half], "rho": rhos[0]}, {"params": params[half:], "rho": rhos[1]}]
    bias = torch.nn.Parameter(torch.zeros(4))
    groups[0]["params"].append(bias)
    opt = ZSharp(groups, torch.optim.SGD, lr=0.1, percentile=0.9, kernels=kernels)
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone().contiguous(memory_format=torch.channels_last) \
            if channels_last and g.dim() == 4 else g.clone()
    bias.grad = torch.tensor([1.0, -2.0, 3.0, 0.5])
    es = opt._perturbation(opt._with_grads())
    if kernels == "fused":  # e in p's layout: first_step's _foreach_add_ stays one kernel
        for e, p in zip(es, [*params[:half], bias, *params[half:]], strict=True):
            assert e.shape == p.shape and e.stride() == p.stride()
    return [e.clone() for e in es]


def optimizer_matches_the_torch_path(rhos: tuple[float, float], channels_last: bool,
                                     nan: bool) -> None:
    grads = _named_grads(3, nan)
    want = zsharp_perturbations("torch", grads, rhos, channels_last)
    got = zsharp_perturbations("fused", grads, rhos, channels_last)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a != 0, b != 0)  # kept sets and SAM fallbacks agree entry for entry
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0, equal_nan=True)
    if not nan:  # a kept layer moves by its group's rho
        assert abs(got[0].norm().item() - rhos[0]) <= 1e-5 * rhos[0]
        assert abs(got[5].norm().item() - rhos[1]) <= 1e-5 * rhos[1]


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _train(kernels: str, hooks: str, steps: int, edit: bool = False) -> tuple[list[torch.Tensor], list[int]]:
    from zsharp_sweeps.optim.step import train_step

    torch.manual_seed(0)
    model = _Net()
    opt = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, kernels=kernels)
    opt._early_stats.mode = hooks
    gen = torch.Generator().manual_seed(1)
    reused = []

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(logits, y)
        return loss

    for _ in range(steps):
        x = torch.randn(16, 1, 8, 8, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        if edit:  # a gradient edited in place after backward: its hook's statistics are stale
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            model.fc.weight.grad.mul_(3.0)
            opt.first_step(zero_grad=True)
            reused.append(opt._early_stats.reused)
            loss_fn(model(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            train_step(model, opt, loss_fn, x, y)
            reused.append(opt._early_stats.reused)
    return [p.detach().clone() for p in model.parameters()], reused


def hooks_give_the_same_training(steps: int = 4) -> None:
    """Statistics started by gradient hooks (``mode="always"``, what a CUDA graph capture
    arms) give the same steps as statistics computed in ``first_step``; the pass at
    ``w + e`` never overwrites them; an in-place edit after backward is noticed."""
    plain, reused_plain = _train("fused", "capture", steps)  # CPU: never capturing
    hooked, reused = _train("fused", "always", steps)
    assert reused_plain == [0] * steps
    assert reused[0] == 0 and all(r == 2 for r in reused[1:]), reused  # conv.weight, fc.weight
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked, strict=True))
    reference, _ = _train("torch", "capture", steps)
    for a, b in zip(hooked, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    edited_plain, _ = _train("fused", "capture", steps, edit=True)
    edited, reused = _train("fused", "always", steps, edit=True)
    assert all(r == 1 for r in reused[1:]), reused  # fc.weight's hook result was refused
    assert all(torch.equal(a, b) for a, b in zip(edited_plain, edited, strict=True))
