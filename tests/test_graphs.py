"""CudaGraphStep's decisions on the CPU: when it runs eagerly, captures, re-captures, replays,
falls back or refuses; and the settings the trainer refuses for a CUDA graph.

The CUDA operations (side-stream warm-up, capture, replay) are replaced by a recorder that
runs the step eagerly, so the real decision code runs here; tests/gpu/test_graph_matrix.py
replays real graphs on a GPU and compares their parameters with eager ones.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zsharp_sweeps.config import ConfigError
from zsharp_sweeps.graphs import (
    CaptureUnsafeError,
    CudaGraphStep,
    check_capturable,
    graph_constants,
    state_tensors,
)
from zsharp_sweeps.optim import SAM, FriendlySAM, train_step
from zsharp_sweeps.training.run import run_training


class RecordingGraphStep(CudaGraphStep):
    """CudaGraphStep with its CUDA operations replaced by logged eager work.

    Like a real capture, ``_record`` runs the step's Python (its side effects on optimizer
    attributes and state dicts happen) but leaves every tensor value as it was (kernels are
    only recorded); ``_replay`` then takes the step. ``buffers``: other tensors the step
    writes (BatchNorm statistics) that a capture must leave alone too.
    """

    def __init__(
        self, *args: Any, fail_capture: bool = False, buffers: Iterable[torch.Tensor] = (),
        **kwargs: Any,
    ) -> None:
        self.events: list[str] = []
        self.fail_capture = fail_capture
        self.buffers = list(buffers)
        super().__init__(*args, **kwargs)

    def _require_cuda(self) -> None:
        pass

    def _eager(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.events.append("warmup")
        return self.step(inputs, targets)

    def _record(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.events.append("capture")
        tensors = [*state_tensors(self.optimizer).values(), *self.buffers]
        saved = [(t, t.detach().clone()) for t in tensors]
        generators = [(g, g.get_state()) for g in getattr(self.optimizer, "graph_generators", list)()]
        outputs = self.step(inputs, targets)
        with torch.no_grad():
            for t, value in saved:
                t.copy_(value)
        for g, state in generators:
            g.set_state(state)
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        return object(), outputs

    def _replay(self) -> None:
        self.events.append("replay")
        self.outputs = self.step(self.static_inputs, self.static_targets)

    def _synchronize(self) -> None:
        pass


def _setup(cls: type = SAM, **kwargs: Any) -> tuple[nn.Module, torch.optim.Optimizer, Callable]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs)

    def step(x: torch.Tensor, y: torch.Tensor):
        return train_step(model, optimizer, lambda o, t: F.cross_entropy(o, t), x, y)

    return model, optimizer, step


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)


def test_warmup_then_one_capture_then_replays() -> None:
    model, optimizer, step = _setup()
    runner = RecordingGraphStep(step, optimizer, warmup=2)
    twin, twin_optimizer, twin_step = _setup()  # the same steps, eagerly
    for i in range(5):
        loss, logits = runner(*_batch(i))
        assert logits.shape == (6, 3) and torch.equal(loss, twin_step(*_batch(i))[0])
    assert runner.events == ["warmup", "warmup", "capture", "replay", "replay", "replay"]
    assert (runner.captures, runner.disabled) == (1, False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))


@pytest.mark.parametrize(
    "change",
    [
        lambda opt: opt.param_groups[0].update(lr=0.05),  # the schedule, once per epoch
        lambda opt: opt.param_groups[0].update(momentum=0.5),
        lambda opt: opt.param_groups[0].update(rho=0.1),
        lambda opt: opt.load_state_dict(copy.deepcopy(opt.state_dict())),  # new state tensors
    ],
    ids=["lr", "momentum", "rho", "load_state_dict"],
)
def test_a_frozen_number_or_new_state_is_recaptured(change: Callable) -> None:
    _, optimizer, step = _setup()
    runner = RecordingGraphStep(step, optimizer, warmup=1)
    for i in range(3):
        runner(*_batch(i))
    change(optimizer)
    runner(*_batch(3))
    runner(*_batch(4))
    assert runner.events == ["warmup", "capture", "replay", "replay", "capture", "replay", "replay"]
    assert runner.captures == 2


def test_an_optimizer_attribute_is_a_graph_constant() -> None:
    _, optimizer, step = _setup(FriendlySAM)
    before = graph_constants(optimizer)
    optimizer.sigma = 0.5  # FSAM's sigma is a Python float the captured step bakes in
    assert graph_constants(optimizer) != before
    runner = RecordingGraphStep(step, optimizer, warmup=1)
    runner(*_batch(0))
    runner(*_batch(1))
    optimizer.lmbda = 0.8
    runner(*_batch(2))
    assert runner.captures == 2


def test_a_failed_capture_falls_back_to_eager_for_good(caplog: pytest.LogCaptureFixture) -> None:
    model, optimizer, step = _setup()
    runner = RecordingGraphStep(step, optimizer, warmup=1, fail_capture=True)
    runner(*_batch(0))
    before = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level(logging.WARNING, logger="zsharp_sweeps.graphs"):
        loss, _ = runner(*_batch(1))
    assert "CUDA graph capture failed, training eagerly from here" in caplog.text
    assert runner.disabled and runner.graph is None and torch.isfinite(loss)
    after = [p.detach().clone() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # it stepped
    runner(*_batch(2))
    optimizer.param_groups[0]["lr"] = 0.01  # no new capture attempt, even on an lr change
    runner(*_batch(3))
    assert runner.events == ["warmup", "capture"] and runner.captures == 0


class _RebindingSAM(SAM):
    """A SAM that stores a new tensor in its state every step (what FSAM used to do)."""

    def _commit(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["seen"] = self.state[p].get("seen", torch.zeros(())) + 1


@pytest.mark.parametrize("fail_capture", [False, True])
def test_a_step_that_rebinds_state_is_refused(fail_capture: bool) -> None:
    """Never a silently wrong replay, and no eager fallback on state the capture clobbered."""
    _, optimizer, step = _setup(_RebindingSAM)
    runner = RecordingGraphStep(step, optimizer, warmup=1, fail_capture=fail_capture)
    runner(*_batch(0))
    with pytest.raises(CaptureUnsafeError, match=r"_RebindingSAM stores new tensors.*'seen'.*"
                       r"in place.*hardware\.cuda_graph=false"):
        runner(*_batch(1))
    assert not runner.disabled


def test_non_capturable_torch_optimizers_are_refused() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"Adam was built with capturable=False.*capturable=True"
                       r".*hardware\.cuda_graph=false"):
        RecordingGraphStep(lambda x, y: (x, y), torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="AdamW was built with capturable=False"):
        check_capturable(SAM(model.parameters(), torch.optim.AdamW, lr=1e-3))
    check_capturable(SAM(model.parameters(), torch.optim.AdamW, lr=1e-3, capturable=True))
    check_capturable(torch.optim.SGD(model.parameters(), lr=0.1))  # no host state


def test_no_cuda_no_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, optimizer, step = _setup()
    with pytest.raises(ValueError, match=r"hardware\.cuda_graph=true needs a CUDA device.*"
                       r"allowed hardware\.cuda_graph=false"):
        CudaGraphStep(step, optimizer)
    with pytest.raises(ValueError, match=r"warmup=0 is invalid: allowed >= 1"):
        RecordingGraphStep(step, optimizer, warmup=0)


@pytest.mark.parametrize(
    "overrides",
    [
        ["hardware.cuda_graph=true"],
        ["hardware.cuda_graph=true", "hardware.precision=fp16"],
        ["hardware.cuda_graph=true", "hardware.compile=true"],
    ],
    ids=["cpu+graph", "fp16+graph", "compile+graph-without-cuda"],
)
def test_the_trainer_refuses_uncapturable_settings(
    make_cfg: Callable, overrides: list[str]
) -> None:
    """Refused before anything is built, with the settings named."""
    cfg = make_cfg(["hardware.device=cpu", "model=mlp", "tracking=off", *overrides])
    with pytest.raises(ConfigError, match=r"hardware\.cuda_graph=true needs a CUDA device and "
                       r"precision fp32 or bf16 \(got device cpu, precision (fp32|fp16)\)"):
        run_training(cfg)
