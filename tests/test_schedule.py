"""The lr schedules the recipes use (zsharp_sweeps/schedule.py), pinned with numbers.

``lr_factor(epoch, cfg)`` is the multiplier of the base lr during 0-based ``epoch``; the
trainer logs ``lr`` per epoch from the optimizer, so these are the curves users see.
"""

from __future__ import annotations

import math

import pytest
import torch

from zsharp_sweeps.config import TrainerConfig
from zsharp_sweeps.training.schedule import build_scheduler, lr_factor

# conf/experiment/paper.yaml: 5 linear warm-up epochs, then StepLR(30, 0.75), 200 epochs.
PAPER = TrainerConfig(epochs=200, scheduler="step", warmup_epochs=5, step_size=30, gamma=0.75)
# conf/experiment/sam_replication_wrn_cifar10.yaml.
WRN = TrainerConfig(epochs=200, scheduler="multistep", milestones=[60, 120, 160], gamma=0.2)
# conf/experiment/sam_direction_cifar100.yaml and conf/trainer/default.yaml.
COSINE = TrainerConfig(epochs=200, scheduler="cosine")


@pytest.mark.parametrize(
    ("epoch", "factor"),
    [
        (0, 0.2), (1, 0.4), (2, 0.6), (3, 0.8), (4, 1.0),  # warm-up ends at the base lr
        (5, 1.0), (34, 1.0),  # the step schedule counts from the end of the warm-up
        (35, 0.75), (64, 0.75), (65, 0.5625), (95, 0.421875),
        (199, 0.75**6),  # t = 194: six steps
    ],
)
def test_paper_warmup_then_step(epoch: int, factor: float) -> None:
    assert lr_factor(epoch, PAPER) == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize(
    ("epoch", "factor"),
    [(0, 1.0), (59, 1.0), (60, 0.2), (119, 0.2), (120, 0.04), (160, 0.008), (199, 0.008)],
)
def test_sam_replication_multistep(epoch: int, factor: float) -> None:
    assert lr_factor(epoch, WRN) == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize(
    ("epoch", "factor"),
    [(0, 1.0), (50, 0.5 * (1 + math.cos(math.pi / 4))), (100, 0.5), (150, 0.5 * (1 - math.cos(math.pi / 4))),
     (199, 0.5 * (1 + math.cos(math.pi * 199 / 200)))],
)
def test_cosine_over_all_epochs(epoch: int, factor: float) -> None:
    assert lr_factor(epoch, COSINE) == pytest.approx(factor, rel=1e-12)


def test_cosine_after_warmup_spans_the_remaining_epochs() -> None:
    cfg = TrainerConfig(epochs=12, scheduler="cosine", warmup_epochs=2)
    factors = [lr_factor(e, cfg) for e in range(12)]
    assert factors[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert factors[7] == pytest.approx(0.5)  # t = 5 of a 10-epoch span
    assert factors == sorted(factors[:2]) + sorted(factors[2:], reverse=True)


def test_none_keeps_the_base_lr_after_warmup() -> None:
    cfg = TrainerConfig(epochs=10, scheduler="none", warmup_epochs=4)
    assert [lr_factor(e, cfg) for e in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


def test_scheduler_sets_the_optimizer_lr_once_per_epoch() -> None:
    """What the trainer does: read the lr, train an epoch, ``scheduler.step()``."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = build_scheduler(opt, PAPER)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        scheduler.step()
    assert lrs[0] == pytest.approx(2e-4)
    assert lrs[4:35] == pytest.approx([1e-3] * 31)
    assert lrs[35] == pytest.approx(7.5e-4)
