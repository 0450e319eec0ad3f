"""GPU: every optimizer in conf/optimizer/ (and each ZSharp filter, and SAM over capturable
AdamW) gives the same parameters through a CUDA graph as eagerly, in fp32 and bf16, plain and
``torch.compile``'d: 20 steps of a tiny BatchNorm conv net on digits, with a learning-rate
change (re-capture) at step 10 and a ``state_dict`` save/load round trip into the same
optimizer (new state tensors: re-capture) at step 14.

Bit-exact comparisons, because a replayed graph runs the very kernels of the eager step on
the same inputs: eager vs CUDA graph, and compiled eager vs compiled + CUDA graph (inductor's
kernels are the same in both). That needs deterministic kernels: in fp32, cuDNN's default
convolution algorithms differ in the last bit from run to run (seen on an H200: eager vs
eager already differed, bf16 did not), so this module turns on cuDNN's deterministic
algorithms and PyTorch's deterministic mode. Compiled vs plain eager differs by kernel
fusion (float rounding), so that pair is compared after one step within a stated bound. Friendly-SAM's old
``state[p]["momentum"] = new_m`` failed here: the graph kept reading the captured momentum.
Collected only where CUDA exists (tests/conftest.py): ``python -m pytest tests/gpu``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from zsharp_sweeps.config import DataConfig, OptimizerConfig, validate
from zsharp_sweeps.data import build_data
from zsharp_sweeps.graphs import CudaGraphStep
from zsharp_sweeps.optim import build_optimizer, train_step
from zsharp_sweeps.optim.checks import FILTERS

from ..test_capture_safety import YAMLS

# Deterministic cuBLAS across streams (the graph's warm-up runs on a side stream); read when
# cuBLAS first allocates a workspace, so it is set at collection, before any test runs.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

DEVICE = torch.device("cuda")
STEPS, LR_CHANGE_AT, RELOAD_AT = 20, 10, 14
AMP = {"fp32": None, "bf16": torch.bfloat16}
ADAMW_BASE = ["optimizer.base=adamw", "optimizer.lr=0.001"]
# Compiled vs plain eager after one step (same weights, same batch): inductor fuses ops and
# keeps intermediates in float32 where eager rounds each op's output (to bf16 under autocast),
# so the first update differs by rounding, not by math.
COMPILE_BOUND = {"fp32": {"rtol": 1e-4, "atol": 1e-5}, "bf16": {"rtol": 2e-2, "atol": 2e-3}}


def _cases() -> list[pytest.param]:
    cases = [pytest.param(p.stem, [], id=p.stem) for p in YAMLS]
    zsharp = [p.stem for p in YAMLS if OmegaConf.load(p).name == "zsharp"]
    cases += [pytest.param(z, [f"optimizer.filter={f}"], id=f"{z}-{f}")
              for z in zsharp for f in FILTERS if f != "zscore"]
    cases.append(pytest.param("sam", ADAMW_BASE, id="sam-adamw"))
    return cases


@pytest.fixture(scope="module", autouse=True)
def deterministic() -> Iterator[None]:
    """Deterministic kernels for this module only (restored afterwards)."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def parts() -> tuple[list[tuple[Tensor, Tensor]], nn.Module, dict[str, Tensor], nn.Module]:
    """Fixed batches, one model (reset in place for every run, so the compiled module and
    its compiled code are reused), its initial state, and its compiled module."""
    data = build_data(
        DataConfig(name="digits", image_size=8, val_size=200, batch_size=32, augment=False),
        DEVICE, seed=0,
    )
    batches = []
    for x, y in data.train:
        batches.append((x.clone(), y.clone()))
        if len(batches) == STEPS:
            break
    torch.manual_seed(0)
    model = _net().to(DEVICE)
    return batches, model, copy.deepcopy(model.state_dict()), torch.compile(model)


def _run(
    parts: tuple, cfg: OptimizerConfig, precision: str, *, graph: bool, compiled: bool,
    capturable: bool = True,
) -> tuple[list[Tensor], list[Tensor], CudaGraphStep | None, list[float]]:
    """Weights after step 1 and after all steps, the graph runner, and every step's loss."""
    batches, model, init, compiled_model = parts
    model.load_state_dict(init)  # in place: the parameters keep their tensors
    model.train()
    torch.manual_seed(0)
    optimizer = build_optimizer(cfg, model, capturable=capturable)
    step_model = compiled_model if compiled else model

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return train_step(step_model, optimizer, lambda o, t: F.cross_entropy(o.float(), t), x, y,
                          amp_dtype=AMP[precision])

    runner = CudaGraphStep(step, optimizer) if graph else None
    losses, first = [], []
    for i, (x, y) in enumerate(batches):
        if i == LR_CHANGE_AT:
            for group in optimizer.param_groups:
                group["lr"] *= 0.5
        if i == RELOAD_AT:
            optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        loss, _ = (runner or step)(x, y)
        losses.append(loss.detach().clone())  # a graph's output buffer is overwritten next step
        if i == 0:
            first = [t.detach().clone() for t in model.state_dict().values()]
    torch.cuda.synchronize()
    final = [t.detach().clone() for t in model.state_dict().values()]
    return first, final, runner, [float(v) for v in losses]


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


def _assert_same(got: list[Tensor], want: list[Tensor], label: str) -> None:
    diff = _max_diff(got, want)
    print(f"MATRIX {label}: max |diff| {diff:.3g}")
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), f"{label}: {diff}"


def _assert_graphed(runner: CudaGraphStep | None) -> None:
    # Captured after warm-up, re-captured on the lr change and on load_state_dict; never
    # fell back to eager (which would make the comparison vacuous).
    assert runner is not None and not runner.disabled and runner.captures == 3


def _optimizer_cfg(make_cfg: Callable, option: str, overrides: list[str]) -> OptimizerConfig:
    """The optimizer section of a composed config (the yaml's own lr and settings)."""
    return validate(make_cfg([f"optimizer={option}", *overrides])).optimizer


def _assert_graph_replays_eager(
    parts: tuple, cfg: OptimizerConfig, precision: str, label: str, *, compiled: bool
) -> list[Tensor]:
    """Eager run vs CUDA-graph run (both ``compiled`` or not): the same losses and final
    parameters, bit for bit, through a graph that was really used. Returns the eager run's
    weights after step 1."""
    first, eager, _, eager_losses = _run(parts, cfg, precision, graph=False, compiled=compiled)
    _, graphed, runner, graph_losses = _run(parts, cfg, precision, graph=True, compiled=compiled)
    _assert_graphed(runner)
    assert graph_losses == eager_losses
    _assert_same(graphed, eager, label)
    return first


def _matrix(test: Callable) -> Callable:
    """Parametrize ``test`` over every optimizer case and precision."""
    by_case = pytest.mark.parametrize(("option", "overrides"), _cases())(test)
    return pytest.mark.parametrize("precision", list(AMP))(by_case)


@_matrix
def test_cuda_graph_gives_the_eager_parameters(
    parts: tuple, make_cfg: Callable, option: str, overrides: list[str], precision: str
) -> None:
    cfg = _optimizer_cfg(make_cfg, option, overrides)
    _assert_graph_replays_eager(
        parts, cfg, precision, f"{option}{overrides} {precision} graph vs eager", compiled=False
    )


@_matrix
def test_compiled_cuda_graph_gives_the_compiled_eager_parameters(
    parts: tuple, make_cfg: Callable, option: str, overrides: list[str], precision: str
) -> None:
    cfg = _optimizer_cfg(make_cfg, option, overrides)
    plain_first, _, _, _ = _run(parts, cfg, precision, graph=False, compiled=False)
    first = _assert_graph_replays_eager(
        parts, cfg, precision, f"{option}{overrides} {precision} compile+graph vs compile",
        compiled=True,
    )
    print(f"MATRIX {option}{overrides} {precision} compile vs plain after 1 step: max |diff| "
          f"{_max_diff(first, plain_first):.3g}")
    bound = dict(COMPILE_BOUND[precision])
    if cfg.base_name != "sgd":
        # Adam's first update is lr * g / |g| per entry: where a gradient is rounding noise,
        # compiled and plain kernels can give it opposite signs, a difference of 2 lr.
        bound["atol"] = max(bound["atol"], 2 * cfg.lr)
    for got, want in zip(first, plain_first, strict=True):
        torch.testing.assert_close(got, want, **bound)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_capturable_adam_takes_the_default_adams_steps(cls: type[torch.optim.Optimizer]) -> None:
    """The graph needs Adam(capturable=True), eager training uses capturable=False: the former
    computes the bias corrections in float32 tensors on the device, the latter in Python
    floats. Fed the same gradients (a model's gradients would feed rounding back, and Adam
    turns a sign flip of a near-zero gradient into a step of 2 lr), both take the same 20
    steps up to float32 rounding of the update."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 8, 3, 3), (16,), (10, 16)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(DEVICE) * 10.0 ** -(i % 4) for s in shapes]
             for i in range(STEPS)]
    finals = []
    for capturable in (False, True):
        params = [nn.Parameter(w.clone().to(DEVICE)) for w in init]
        opt = cls(params, lr=1e-3, weight_decay=5e-4, capturable=capturable)
        for i, step_grads in enumerate(grads):
            if i == LR_CHANGE_AT:
                opt.param_groups[0]["lr"] *= 0.5
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        finals.append([p.detach().clone() for p in params])
    print(f"MATRIX {cls.__name__} capturable vs default: max |diff| "
          f"{_max_diff(finals[1], finals[0]):.3g}")
    for got, want in zip(finals[1], finals[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
