"""Each SAM-family rule pinned on small hand-checkable tensors (numbers, not shapes)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from zsharp_sweeps.config import optimizer_config
from zsharp_sweeps.optim import (
    ASAM,
    SAM,
    FriendlySAM,
    SAMDirection,
    SAMMagnitude,
    ZSharp,
    build_optimizer,
    zscore_masks,
)

RHO = 0.05


def _params(*values: list) -> list[nn.Parameter]:
    return [nn.Parameter(torch.tensor(v, dtype=torch.float32)) for v in values]


def _set_grads(params: list[nn.Parameter], grads: list[list]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.tensor(g, dtype=torch.float32)


def _perturbation(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[torch.Tensor]:
    before = [p.detach().clone() for p in params]
    opt.first_step()
    return [p.detach() - b for p, b in zip(params, before, strict=True)]


def test_sam_perturbation_restore_and_descent() -> None:
    w, b = _params([[1.0, 2.0], [3.0, 4.0]], [0.5])
    opt = SAM([w, b], torch.optim.SGD, rho=RHO, lr=0.1)
    _set_grads([w, b], [[[3.0, 0.0], [0.0, 0.0]], [4.0]])  # ||g|| = 5
    e_w, e_b = _perturbation(opt, [w, b])
    assert torch.allclose(e_w, torch.tensor([[0.03, 0.0], [0.0, 0.0]]), atol=1e-7)
    assert torch.allclose(e_b, torch.tensor([0.04]), atol=1e-7)
    _set_grads([w, b], [[[1.0, 1.0], [1.0, 1.0]], [2.0]])  # g' at w + e
    opt.second_step()
    # Restored exactly, then SGD stepped with g'.
    assert torch.equal(w.detach(), torch.tensor([[1.0, 2.0], [3.0, 4.0]]) - 0.1)
    assert torch.equal(b.detach(), torch.tensor([0.5 - 0.2]))


def test_sam_adaptive_is_davda54s_formula() -> None:
    (w,) = _params([2.0, -1.0])
    opt = SAM([w], torch.optim.SGD, rho=RHO, adaptive=True, lr=0.1)
    _set_grads([w], [[1.0, 3.0]])
    (e,) = _perturbation(opt, [w])
    tg_norm = math.hypot(2.0 * 1.0, 1.0 * 3.0)  # || |w| * g ||
    want = torch.tensor([4.0 * 1.0, 1.0 * 3.0]) * RHO / (tg_norm + 1e-12)  # w^2 g scale
    assert torch.allclose(e, want, atol=1e-7)


def test_step_with_closure_equals_manual_steps() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    loss_of = lambda m: nn.functional.mse_loss(m(x), y)  # noqa: E731
    a = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    b = SAM(twin.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    loss_of(model).backward()
    a.first_step(zero_grad=True)
    loss_of(model).backward()
    a.second_step(zero_grad=True)
    loss_of(twin).backward()
    b.step(lambda: loss_of(twin).backward())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))
    with pytest.raises(RuntimeError, match="first_step"):
        b.step()


# --- ZSharp -----------------------------------------------------------------------------
def test_zsharp_filters_per_tensor_and_uses_sam_scale_for_1d() -> None:
    w, b = _params([[0.0] * 5], [0.0])
    opt = ZSharp([w, b], torch.optim.SGD, rho=RHO, percentile=0.5, lr=0.1)
    _set_grads([w, b], [[[-2.0, -1.0, 0.0, 1.0, 2.0]], [1.0]])
    e_w, e_b = _perturbation(opt, [w, b])
    # |z| > tau keeps only +-2 (the +-1 entries sit exactly on tau: strict >).
    want_w = RHO * torch.tensor([[-2.0, 0.0, 0.0, 0.0, 2.0]]) / math.sqrt(8.0)
    assert torch.allclose(e_w, want_w, atol=1e-8)
    assert e_w.norm().item() == pytest.approx(RHO, rel=1e-6)  # every filtered layer moves by rho
    g_norm = math.sqrt(4 + 1 + 0 + 1 + 4 + 1)  # G over all gradients, unfiltered
    assert e_b.item() == pytest.approx(RHO / g_norm, rel=1e-6)


def test_zsharp_all_zero_filtered_gradient_falls_back_to_sam() -> None:
    # The only outlier (|z| largest) is the 0 entry, so g_f = 0 -> e = s * g.
    w, b = _params([[0.0] * 8], [0.0])
    opt = ZSharp([w, b], torch.optim.SGD, rho=RHO, percentile=0.9, lr=0.1)
    g_w = [[0.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]]
    _set_grads([w, b], [g_w, [2.0]])
    e_w, e_b = _perturbation(opt, [w, b])
    s = RHO / math.sqrt(7 * 25 + 4)
    assert torch.allclose(e_w, s * torch.tensor(g_w), atol=1e-8)
    assert e_b.item() == pytest.approx(2.0 * s, rel=1e-6)


def test_zsharp_q_zero_keeps_all_but_the_minimum() -> None:
    (w,) = _params([[0.0] * 4])
    opt = ZSharp([w], torch.optim.SGD, rho=RHO, percentile=0.0, lr=0.1)
    _set_grads([w], [[[0.0, 1.0, 2.0, 10.0]]])  # |z| smallest at 2.0
    (e,) = _perturbation(opt, [w])
    want = RHO * torch.tensor([[0.0, 1.0, 0.0, 10.0]]) / math.sqrt(101.0)
    assert torch.allclose(e, want, atol=1e-8)


def test_zsharp_percentile_out_of_range_says_fraction() -> None:
    with pytest.raises(ValueError, match="Did you mean 0.7"):
        ZSharp(_params([[1.0]]), torch.optim.SGD, percentile=70, lr=0.1)


def _filtered_layers() -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    shapes = [(16, 3, 3, 3), (10, 40), (7, 7)]
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    grads[2] = grads[2].round() + 0.5  # ties in |g|, and no zero a random pick could land on
    return params, grads


@pytest.mark.parametrize("filt", ["magnitude", "random"])
def test_controls_keep_the_zscore_count_per_tensor(filt: str) -> None:
    params, grads = _filtered_layers()
    want = [int(m.sum()) for m in zscore_masks(grads, 0.9)]
    opt = ZSharp(params, torch.optim.SGD, percentile=0.9, filter=filt, filter_seed=5, lr=0.1)
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    es = _perturbation(opt, params)  # weights start at 0: w + e = e
    kept = [e != 0 for e in es]
    assert [int(k.sum()) for k in kept] == want
    if filt == "magnitude":
        for k, g in zip(kept, grads, strict=True):
            assert g.abs()[k].min() >= g.abs()[~k].max()


def test_random_control_is_reproducible_by_seed() -> None:
    def kept(seed: int) -> list[torch.Tensor]:
        params, grads = _filtered_layers()
        opt = ZSharp(params, torch.optim.SGD, percentile=0.9, filter="random", filter_seed=seed, lr=0.1)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        return [e != 0 for e in _perturbation(opt, params)]

    a, b, c = kept(11), kept(11), kept(12)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_zsharp_on_a_linear_layer() -> None:
    """Per-tensor normalisation and the kept fraction on a layer with a bias. (Exactness past
    torch.quantile's 2^24 limit is test_optim_threshold's 4096x4200 case; the optimizer runs
    the same threshold code at any size.)"""
    layer = nn.Linear(600, 512)
    with torch.no_grad():  # w = 0: the perturbation reads back exactly as (w + e) - w
        for p in layer.parameters():
            p.zero_()
    opt = ZSharp(layer.parameters(), torch.optim.SGD, rho=RHO, lr=0.1)
    gen = torch.Generator().manual_seed(4)
    layer.weight.grad = torch.randn(512, 600, generator=gen)
    layer.bias.grad = torch.randn(512, generator=gen)
    e_w, e_b = _perturbation(opt, [layer.weight, layer.bias])
    assert e_w.norm().item() == pytest.approx(RHO, rel=1e-3)
    n = 512 * 600
    assert (e_w != 0).sum().item() == n - 1 - math.floor(0.95 * (n - 1))  # strictly above a_j
    g_norm = torch.cat([layer.weight.grad.reshape(-1), layer.bias.grad]).norm()
    assert torch.allclose(e_b, layer.bias.grad * RHO / g_norm, rtol=1e-3, atol=1e-9)


# --- ASAM, FSAM, magnitude / direction ---------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)
        self.norm = nn.LayerNorm(1)


def _tiny_with_grads() -> _Tiny:
    m = _Tiny()
    with torch.no_grad():
        m.fc.weight.copy_(torch.tensor([[2.0, -1.0]]))
        m.fc.bias.copy_(torch.tensor([0.5]))
        m.norm.weight.copy_(torch.tensor([3.0]))
        m.norm.bias.copy_(torch.tensor([0.0]))
    m.fc.weight.grad = torch.tensor([[1.0, 1.0]])
    m.fc.bias.grad = torch.tensor([2.0])
    m.norm.weight.grad = torch.tensor([1.0])
    m.norm.bias.grad = torch.tensor([1.0])
    return m


@pytest.mark.parametrize("named", [True, False])
def test_asam_formula(named: bool) -> None:
    eta, rho = 0.01, 0.5
    m = _tiny_with_grads()
    params = list(m.named_parameters()) if named else list(m.parameters())
    opt = ASAM(params, torch.optim.SGD, rho=rho, eta=eta, lr=0.1)
    t = {
        "fc.weight": torch.tensor([[2.0, 1.0]]) + eta,
        "fc.bias": torch.tensor([1.0]),
        # The official rule rescales every name containing "weight" (norm scales too);
        # without names only tensors with ndim > 1 are rescaled.
        "norm.weight": torch.tensor([3.0 + eta]) if named else torch.tensor([1.0]),
        "norm.bias": torch.tensor([1.0]),
    }
    ps = dict(m.named_parameters())
    tg = {n: t[n] * ps[n].grad for n in t}
    norm = torch.cat([v.reshape(-1) for v in tg.values()]).norm().item()
    es = _perturbation(opt, list(ps.values()))
    for (n, _), e in zip(ps.items(), es, strict=True):
        assert torch.allclose(e, rho * t[n] * tg[n] / (norm + 1e-16), atol=1e-7), n


def test_fsam_momentum_over_two_steps() -> None:
    (w,) = _params([0.0, 0.0])
    opt = FriendlySAM([w], torch.optim.SGD, rho=RHO, sigma=1.0, lmbda=0.9, lr=0.0)
    _set_grads([w], [[3.0, 4.0]])
    (e1,) = _perturbation(opt, [w])
    assert torch.allclose(e1, RHO * torch.tensor([0.6, 0.8]))  # d = g on the first step
    opt.second_step()
    assert opt.state[w]["momentum"].tolist() == [3.0, 4.0]
    _set_grads([w], [[1.0, 0.0]])
    (e2,) = _perturbation(opt, [w])
    d = torch.tensor([1.0 - 3.0, 0.0 - 4.0])  # g - sigma * m
    assert torch.allclose(e2, RHO * d / d.norm())
    opt.second_step()
    assert torch.allclose(opt.state[w]["momentum"], torch.tensor([2.8, 3.6]))  # .9 m + .1 g


@pytest.mark.parametrize(
    ("cls", "descent"),
    [(SAMMagnitude, [1.2, 1.6]), (SAMDirection, [0.0, 5.0])],
)
def test_magnitude_and_direction_descent(cls: type, descent: list[float]) -> None:
    (w,) = _params([0.0, 0.0])
    opt = cls([w], torch.optim.SGD, rho=RHO, lr=1.0)
    _set_grads([w], [[3.0, 4.0]])  # ||g|| = 5
    (e,) = _perturbation(opt, [w])
    assert torch.allclose(e, RHO * torch.tensor([0.6, 0.8]))  # SAM's ascent
    _set_grads([w], [[0.0, 2.0]])  # ||g'|| = 2
    opt.second_step()
    # magnitude: ||g'|| g/||g|| = [1.2, 1.6]; direction: ||g|| g'/||g'|| = [0, 5].
    assert torch.allclose(w.detach(), -torch.tensor(descent), atol=1e-6)


# --- plumbing: state_dict, schedulers, factory -------------------------------------------
def _one_step(opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor) -> None:
    model(x).square().mean().backward()
    opt.first_step(zero_grad=True)
    model(x).square().mean().backward()
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("name", ["sam", "fsam", "zsharp", "asam"])
def test_state_dict_round_trip(name: str) -> None:
    torch.manual_seed(0)
    cfg = optimizer_config(name=name, lr=0.05, **({"filter": "random"} if name == "zsharp" else {}))
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randn(5, 4)
    opt = build_optimizer(cfg, model)
    _one_step(opt, model, x)
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(cfg, twin)
    twin_opt.load_state_dict(saved)
    assert twin_opt.param_groups is twin_opt.base_optimizer.param_groups
    if name == "fsam":
        assert all("momentum" in twin_opt.state[p] for p in twin.parameters())
    for _ in range(2):
        _one_step(opt, model, x)
        _one_step(twin_opt, twin, x)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    assert "momentum_buffer" in next(iter(opt.state_dict()["base_optimizer"]["state"].values()))


def test_lr_scheduler_on_the_wrapper_drives_the_base_optimizer() -> None:
    model = nn.Linear(2, 1)
    opt = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _one_step(opt, model, torch.randn(3, 2))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[0]["rho"] == 0.05  # SAM settings live in the same groups


def test_build_optimizer_maps_the_config() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    z = build_optimizer(
        optimizer_config(name="zsharp", base="sgd", lr=0.2, momentum=0.8, nesterov=True,
                        weight_decay=1e-3, rho=0.1, percentile=0.7, filter="magnitude",
                        filter_seed=9),
        model,
    )
    assert isinstance(z, ZSharp) and isinstance(z.base_optimizer, torch.optim.SGD)
    g = z.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.2, 0.8, True, 1e-3)
    assert (g["rho"], g["percentile"], z.filter, z.filter_seed) == (0.1, 0.7, "magnitude", 9)
    adam = build_optimizer(optimizer_config(name="adam", lr=1e-3, weight_decay=5e-5), model)
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["weight_decay"] == 5e-5
    adamw = build_optimizer(optimizer_config(name="adamw", lr=1e-3, betas=[0.8, 0.99]), model)
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["betas"] == (0.8, 0.99)
    asam = build_optimizer(optimizer_config(name="asam", base="adam", rho=0.5, eta=0.02), model)
    assert isinstance(asam.base_optimizer, torch.optim.Adam)
    assert asam.param_groups[0]["eta"] == 0.02 and "1.weight" in asam.param_names.values()
    fsam = build_optimizer(optimizer_config(name="fsam", sigma=0.5, lmbda=0.6), model)
    assert (fsam.sigma, fsam.lmbda) == (0.5, 0.6)
    for name, cls in [("sam", SAM), ("sam_magnitude", SAMMagnitude), ("sam_direction", SAMDirection)]:
        assert type(build_optimizer(optimizer_config(name=name), model)) is cls


def test_sam_ascent_returns_the_norm_it_divided_by() -> None:
    params = _params([3.0, 0.0], [[0.0, 4.0]])
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=0.1)
    _set_grads(params, [[3.0, 0.0], [[0.0, 4.0]]])
    e, norm = opt._ascent(opt._with_grads())
    assert norm.item() == pytest.approx(5.0)
    assert torch.allclose(e[0], torch.tensor([RHO * 3 / 5, 0.0]))
    for p in params:
        p.grad = None
    assert opt._ascent(opt._with_grads()) == ([], None)


def test_stored_first_norm_is_one_buffer_updated_in_place() -> None:
    """SAM-magnitude's ||g|| crosses from the ascent to the descent in a buffer that keeps its
    address (what a CUDA graph replays), holding this step's value."""
    params = _params([3.0, 4.0])
    opt = SAMMagnitude(params, torch.optim.SGD, rho=RHO, lr=0.1)
    addresses = set()
    for g in ([3.0, 4.0], [6.0, 8.0]):
        _set_grads(params, [g])
        opt.first_step()
        addresses.add(opt._first_norm.data_ptr())
        assert opt._first_norm.item() == pytest.approx(math.hypot(*g))
        _set_grads(params, [[1.0, 0.0]])
        opt.second_step()
    assert len(addresses) == 1


def test_optimizer_and_config_share_one_range_check() -> None:
    from zsharp_sweeps.config import ConfigError

    for bad in (70, -0.1, 1.0):
        with pytest.raises(ValueError) as direct:
            ZSharp(_params([[1.0]]), torch.optim.SGD, percentile=bad, lr=0.1)
        with pytest.raises(ConfigError) as config:
            optimizer_config(percentile=bad)
        assert str(config.value) == "optimizer." + str(direct.value)
    with pytest.raises(ValueError) as direct:
        SAM(_params([1.0]), torch.optim.SGD, rho=float("inf"), lr=0.1)
    with pytest.raises(ConfigError) as config:
        optimizer_config(rho=float("inf"))
    assert str(config.value) == "optimizer." + str(direct.value)
    assert "a finite value >= 0" in str(direct.value)


def test_zsharp_implementation_settings_reach_the_optimizer(make_cfg) -> None:
    from zsharp_sweeps.config import ConfigError, validate

    cfg = validate(make_cfg(["optimizer=zsharp", "optimizer.kernels=torch",
                             "optimizer.threshold_method=bisect", "optimizer.stats_streams=0"]))
    opt = build_optimizer(cfg.optimizer, nn.Linear(3, 2))
    assert (opt.kernels, opt.threshold_method, opt.stats_streams) == ("torch", "bisect", 0)
    default = build_optimizer(validate(make_cfg(["optimizer=zsharp"])).optimizer, nn.Linear(3, 2))
    assert (default.kernels, default.threshold_method, default.stats_streams) == ("auto", "auto", 8)
    for override, message in [
        ("optimizer.kernels=cuda", "optimizer.kernels='cuda' is invalid: allowed one of auto, "
         "torch, triton, fused."),
        ("optimizer.threshold_method=sort", "optimizer.threshold_method='sort' is invalid: "
         "allowed one of auto, radix, bisect, kthvalue."),
        ("optimizer.stats_streams=-1", "optimizer.stats_streams=-1 is invalid: allowed an "
         "integer >= 0 (0: the current stream only)."),
    ]:
        with pytest.raises(ConfigError) as err:
            validate(make_cfg(["optimizer=zsharp", override]))
        assert str(err.value) == message
