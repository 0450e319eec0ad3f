"""The fit loop: epochs of optimizer steps, evaluation, sharpness, and hooks.

Why it looks like this: per-batch loss and accuracy are accumulated *on the device* and
read once per epoch, so the GPU never waits for Python between steps (airbench's rule).
Everything a caller may want per epoch (MLflow logging, Optuna pruning, progress) is an
``on_epoch_end`` callback, so the loop itself knows nothing about tracking or sweeps. A
``Checkpointer`` (zsharp_sweeps/training/checkpoint.py) saves the state after each epoch's callbacks,
and ``resume`` continues from such a checkpoint at the next epoch, with the same numbers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zsharp_sweeps.config import TrainConfig
from zsharp_sweeps.training.build import AMP_DTYPES, build_step, to_memory_format
from zsharp_sweeps.training.checkpoint import Checkpointer, TrainingState, restore
from zsharp_sweeps.training.console import epoch_line, show_progress_bars
from zsharp_sweeps.training.failures import TrainingFailed
from zsharp_sweeps.training.schedule import build_scheduler
from zsharp_sweeps.training.signals import check_stop

__all__ = ["AMP_DTYPES", "EpochCallback", "FitResult", "NonFiniteLossError", "evaluate", "fit"]

EpochCallback = Callable[[int, dict[str, float]], None]

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What a fit produced: the per-epoch history and the final summary metrics."""

    history: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)


class NonFiniteLossError(TrainingFailed):
    """Training diverged (loss is nan/inf): a failed trial, not a crash of the sweep; its
    message says where and what to try (``diverged_message``)."""


def diverged_message(cfg: TrainConfig, train_loss: float, epoch: int, first_step: int,
                     steps: int, steps_per_epoch: int) -> str:
    """One line: the loss, the epoch and step where it first was not finite, the settings
    that drove it there and what to try."""
    opt = cfg.optimizer
    rho = getattr(opt, "rho", None)
    settings = f"optimizer.lr={opt.lr:g}" + (f", optimizer.rho={rho:g}" if rho is not None else "")
    tries = [f"a smaller optimizer.lr (e.g. optimizer.lr={opt.lr / 10:.3g})"]
    if rho is not None:
        tries.append("a smaller optimizer.rho")
    if not cfg.trainer.warmup_epochs:
        tries.append("trainer.warmup_epochs=5")
    if cfg.trainer.grad_clip is None:
        tries.append("trainer.grad_clip=1.0")
    global_step = (epoch - 1) * steps_per_epoch + first_step
    return (f"the run diverged: training loss {train_loss} at epoch {epoch} (first at step "
            f"{first_step} of {steps}, global step {global_step}) with {settings}; try "
            + ", ".join(tries[:-1]) + f" or {tries[-1]}")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``batches``; one host sync at the end."""
    was_training = model.training
    model.eval()
    loss_sum = correct = count = None
    for inputs, targets in batches:
        inputs = to_memory_format(inputs, channels_last)
        with torch.autocast(inputs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        hits = (logits.argmax(dim=1) == targets).sum()
        if loss_sum is None:
            loss_sum, correct, count = loss, hits, targets.numel()
        else:
            loss_sum, correct, count = loss_sum + loss, correct + hits, count + targets.numel()
    model.train(was_training)
    if loss_sum is None:
        return math.nan, math.nan
    return loss_sum.item() / count, correct.item() / count


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data,
    cfg: TrainConfig,
    *,
    on_epoch_end: Sequence[EpochCallback] = (),
    sharpness_fn: Callable[[nn.Module, int, bool], dict[str, float]] | None = None,
    checkpointer: Checkpointer | None = None,
    resume: Mapping[str, Any] | None = None,
    log_prefix: str = "",
) -> FitResult:
    """Train ``model`` for ``cfg.trainer.epochs`` epochs on ``data`` (a DataBundle).

    ``sharpness_fn(model, epoch, is_last)`` returns the sharpness metrics due this epoch.
    Callbacks receive the epoch (1-based, MLflow's step) and that epoch's metrics; one may
    raise to stop training (e.g. ``optuna.TrialPruned``). ``checkpointer.save`` runs after
    them, so a checkpoint's epoch is one whose metrics were recorded. ``resume`` (a loaded
    checkpoint) restores model, optimizer, scheduler, scaler, history and RNGs and starts at
    the epoch after it: callbacks see only the remaining epochs. ``log_prefix`` starts each
    per-epoch log line (a sweep trial's ``[t7] ``).
    """
    tcfg, hw = cfg.trainer, cfg.hardware
    device = next(model.parameters()).device
    run_step = build_step(cfg, model, optimizer)  # the one step builder (zsharp_sweeps.training.build)
    step_model, amp_dtype = run_step.model, run_step.amp_dtype
    scheduler = build_scheduler(optimizer, tcfg)

    steps = len(data.train)
    if tcfg.max_steps_per_epoch is not None:
        steps = min(steps, tcfg.max_steps_per_epoch)
    result = FitResult()
    state = TrainingState(model, optimizer, scheduler, run_step.scaler, result.history)
    start_epoch = 1 if resume is None else restore(resume, state) + 1  # RNGs restored last
    best_val_acc = max(
        (h["val_acc"] for h in result.history if math.isfinite(h.get("val_acc", math.nan))),
        default=-math.inf,
    )
    bars = show_progress_bars(tcfg.progress)  # off a terminal: one log line per epoch
    epochs = tqdm(
        range(start_epoch, tcfg.epochs + 1), desc="epochs", unit="ep",
        disable=not bars, leave=True, dynamic_ncols=True, initial=start_epoch - 1,
        total=tcfg.epochs,
    )
    set_epoch = getattr(data.train, "set_epoch", None)
    for epoch in epochs:
        if set_epoch is not None:
            # The loader's shuffle and augmentation are seeded by (seed, epoch): naming the
            # epoch makes a resumed run, or a loader reused across trials, draw what an
            # uninterrupted run draws.
            set_epoch(epoch - 1)
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        # Each step's loss stays on the device (one copy per step, no host sync): where a
        # diverged run first went non-finite is read from it only when it did.
        step_losses = torch.empty(steps, device=device)
        steps_run = 0
        bar = tqdm(
            total=steps, desc=f"epoch {epoch}", unit="step", leave=False,
            disable=not bars, dynamic_ncols=True,
        )
        for step, (inputs, targets) in enumerate(data.train):
            if step >= steps:
                break
            check_stop()  # a sweep worker asked to stop: here, between steps, it is safe
            loss, logits = run_step(inputs, targets)
            loss_sum += loss.float() * targets.numel()
            step_losses[step] = loss.detach()
            correct += (logits.argmax(dim=1) == targets).sum()
            seen += targets.numel()
            steps_run += 1
            bar.update(1)
        bar.close()
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # this trial's work only
        train_loss = loss_sum.item() / max(seen, 1)
        train_time = time.perf_counter() - start
        metrics: dict[str, float] = {
            "train_loss": train_loss,
            "train_acc": correct.item() / max(seen, 1),
            "lr": lr,
            "epoch_time_s": train_time,
            # Training images per second of this epoch's loop (no evaluation, no sharpness):
            # what a sweep's throughput is made of, comparable across runs and devices.
            "train_images_per_s": seen / max(train_time, 1e-9),
        }
        if not math.isfinite(train_loss):
            bad = torch.nonzero(~torch.isfinite(step_losses[:steps_run]))
            first = int(bad[0, 0]) + 1 if len(bad) else 1
            raise NonFiniteLossError(
                diverged_message(cfg, train_loss, epoch, first, steps_run, steps))
        scheduler.step()
        if data.val is not None:
            metrics["val_loss"], metrics["val_acc"] = evaluate(
                step_model, data.val, amp_dtype=amp_dtype, channels_last=hw.channels_last
            )
            best_val_acc = max(best_val_acc, metrics["val_acc"])
        is_last = epoch == tcfg.epochs
        if tcfg.eval_test_every_epoch or is_last:
            metrics["test_loss"], metrics["test_acc"] = evaluate(
                step_model, data.test, amp_dtype=amp_dtype, channels_last=hw.channels_last
            )
        if sharpness_fn is not None:
            metrics.update(sharpness_fn(model, epoch, is_last))
        check_stop()
        # The whole epoch (training, evaluation, sharpness): a sweep's fixed cost per trial is
        # its wall time minus the sum of these.
        metrics["epoch_wall_s"] = time.perf_counter() - start
        result.history.append({"epoch": epoch, **metrics})
        epochs.set_postfix(
            {k: f"{metrics[k]:.4f}" for k in ("train_loss", "val_acc", "test_acc") if k in metrics}
        )
        if tcfg.progress and not bars:
            log.info(log_prefix + epoch_line(epoch, tcfg.epochs, metrics))
        for callback in on_epoch_end:
            callback(epoch, metrics)
        if checkpointer is not None:
            checkpointer.save(epoch, state)
    last = result.history[-1]
    result.summary = {
        "best_val_acc": best_val_acc if data.val is not None else math.nan,
        "final_val_acc": last.get("val_acc", math.nan),
        "final_val_loss": last.get("val_loss", math.nan),
        "final_test_acc": last["test_acc"],
        "final_test_loss": last["test_loss"],
    }
    return result
