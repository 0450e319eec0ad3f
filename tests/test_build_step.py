"""One training step for trainer and benchmark: ``zsharp_sweeps.training.build.build_step``.

The step a config describes (label smoothing, gradient clipping, BatchNorm in SAM's second
pass) is written out by hand here once, as the reference; the trainer's ``fit`` and the
benchmark's runner must both land on exactly its parameters after one step. The settings are
chosen so each one changes the result (checked), so dropping any of them fails the test.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zsharp_sweeps.bench import BenchSettings, _make_runner, bench_config
from zsharp_sweeps.config import TrainConfig
from zsharp_sweeps.optim import train_step
from zsharp_sweeps.training.build import build_parts, build_step
from zsharp_sweeps.training.engine import fit

CPU = torch.device("cpu")
SETTINGS = BenchSettings(
    model="resnet20", data="digits", optimizers=("sam",), batch_size=16, steps=1, warmup=0,
    label_smoothing=0.2, grad_clip=0.05, bn_second_pass="update",
)


def _parts(cfg: TrainConfig, seed: int):
    torch.manual_seed(seed)
    return build_parts(cfg, CPU)


def _reference(cfg: TrainConfig, seed: int, *, smoothing: float, clip: float | None,
               freeze_bn: bool) -> dict[str, torch.Tensor]:
    """One step on the first training batch, every setting spelled out by hand."""
    data, model, optimizer = _parts(cfg, seed)
    inputs, targets = next(iter(data.train))

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, label_smoothing=smoothing)

    train_step(model, optimizer, loss_fn, inputs, targets, freeze_bn_second_pass=freeze_bn,
               grad_clip=clip)
    return _state(model)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    cfg = bench_config(SETTINGS, "sam")
    ref = _reference(cfg, SETTINGS.seed, smoothing=0.2, clip=0.05, freeze_bn=False)
    # Each setting matters for this step: a builder that dropped one would not match.
    for smoothing, clip, freeze_bn in ((0.0, 0.05, False), (0.2, None, False), (0.2, 0.05, True)):
        other = _reference(cfg, SETTINGS.seed, smoothing=smoothing, clip=clip, freeze_bn=freeze_bn)
        assert _differs(ref, other), (smoothing, clip, freeze_bn)
    return ref


def test_bench_step_is_the_trainers_step(reference: dict[str, torch.Tensor]) -> None:
    _, model, step, run = _make_runner(SETTINGS, "sam")
    run(1)
    _assert_same(_state(model), reference)
    inputs, targets = next(iter(_parts(bench_config(SETTINGS, "sam"), SETTINGS.seed)[0].train))
    logits = torch.randn(4, 10)
    assert step.loss_fn(logits, targets[:4]) == F.cross_entropy(
        logits, targets[:4], label_smoothing=0.2
    )


def test_fit_runs_the_same_step(reference: dict[str, torch.Tensor]) -> None:
    cfg = bench_config(SETTINGS, "sam")
    cfg = replace(cfg, trainer=replace(cfg.trainer, epochs=1, max_steps_per_epoch=1,
                                       progress=False))
    data, model, optimizer = _parts(cfg, SETTINGS.seed)
    fit(model, optimizer, data, cfg)  # evaluation runs in eval mode: BN statistics unchanged
    _assert_same(_state(model), reference)


def test_cuda_graph_needs_cuda_and_no_fp16() -> None:
    cfg = bench_config(replace(SETTINGS, cuda_graph=True), "sgd")
    _, model, optimizer = _parts(cfg, 0)
    with pytest.raises(ValueError, match="hardware.cuda_graph=true needs a CUDA device"):
        build_step(cfg, model, optimizer)


def test_channels_last_batches_are_converted() -> None:
    cfg = bench_config(replace(SETTINGS, channels_last=True), "sgd")
    data, model, optimizer = _parts(cfg, 0)
    seen: list[bool] = []
    step = build_step(cfg, model, optimizer)
    eager = step.run
    step.run = lambda x, y: (seen.append(x.is_contiguous(memory_format=torch.channels_last))
                             or eager(x, y))
    inputs, targets = next(iter(data.train))
    step(inputs, targets)
    assert seen == [True]


@pytest.mark.parametrize("compiled", [False, True])
def test_zsharp_takes_no_statistics_from_hooks_of_a_compiled_backward(
    compiled: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A compiled backward hands every gradient over at its end: ZSharp's gradient hooks would
    then run the statistics one after another on one stream (1.13x SAM's step on ViT, H100),
    so a compiled step turns them off and ``first_step`` spreads them over the streams."""
    cfg = bench_config(replace(SETTINGS, compile=compiled), "zsharp")
    _, model, optimizer = _parts(cfg, 0)
    build_step(cfg, model, optimizer)
    # In the backward pass of a step being captured on a GPU, hooks act unless compiled.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert optimizer._stats_armed(torch.device("cuda")) is (not compiled)
