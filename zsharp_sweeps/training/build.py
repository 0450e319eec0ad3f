"""Data, model, optimizer and the training step from one config: the single place they are
assembled.

Why one place: the trainer (:func:`zsharp_sweeps.training.engine.fit`), the benchmark
(``python -m zsharp_sweeps.bench``) and the fast-path check (``scripts/check_fast_path.py``)
must run exactly the same thing (channels-last weights, a capturable optimizer under a CUDA
graph, label smoothing, gradient clipping, BatchNorm in the second SAM pass), or their
numbers stop describing what training does. No Hydra/MLflow import, so it runs anywhere
torch does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsharp_sweeps.config import ConfigError, HardwareConfig, TrainConfig
from zsharp_sweeps.data import DataBundle, build_data
from zsharp_sweeps.graphs import CudaGraphStep
from zsharp_sweeps.models import build_model
from zsharp_sweeps.optim import build_optimizer, train_step
from zsharp_sweeps.training.hardware import resolve_config

#: ``hardware.precision`` -> the autocast dtype (None: plain fp32).
AMP_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16,
}

StepFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def build_parts(
    cfg: TrainConfig, device: torch.device, data: DataBundle | None = None
) -> tuple[DataBundle, nn.Module, torch.optim.Optimizer]:
    """The data bundle on ``device`` (``data`` when a sweep worker kept it warm), the model
    sized to it, and its optimizer."""
    cfg = resolve_config(cfg, device)[0]  # hardware=auto: what the run resolved (no-op if done)
    if data is None:
        data = build_data(cfg.data, device, cfg.seed)
    model = build_model(
        cfg.model, in_channels=data.in_channels, num_classes=data.num_classes,
        image_size=data.image_size,
    ).to(device)
    if cfg.hardware.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optimizer, model, capturable=cfg.hardware.cuda_graph)
    return data, model, optimizer


def check_graphable(hw: HardwareConfig, device: torch.device) -> None:
    """``hardware.cuda_graph`` needs a CUDA device and no fp16 loss scaler (its host-side
    skip-on-inf logic cannot be captured). The trainer calls this before any run is opened;
    ``build_step`` calls it for every other caller."""
    if hw.cuda_graph and (device.type != "cuda" or hw.precision == "fp16"):
        raise ConfigError(
            f"hardware.cuda_graph=true needs a CUDA device and precision fp32 or bf16 (got "
            f"device {device}, precision {hw.precision}): allowed here hardware.cuda_graph=false"
        )


def to_memory_format(x: Tensor, channels_last: bool) -> Tensor:
    """An image batch in channels-last layout when asked (other tensors unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@dataclass
class TrainingStep:
    """One training step as a config describes it; call it with a batch from the loader.

    ``model`` is the module the step runs (``torch.compile``'d when ``hardware.compile``;
    evaluate with it too), ``eager`` one plain step, ``run`` what the loop calls (``eager``,
    or its :class:`CudaGraphStep` under ``hardware.cuda_graph``).
    """

    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    channels_last: bool
    eager: StepFn
    run: StepFn

    def __call__(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss, logits)`` of the first pass, detached; the optimizer has stepped."""
        return self.run(to_memory_format(inputs, self.channels_last), targets)


def build_step(
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    graph_warmup: int = 3,
) -> TrainingStep:
    """The step ``cfg`` asks for: precision, compile, CUDA graph (``hardware.*``), label
    smoothing and gradient clipping (``trainer.*``), BatchNorm in SAM's second pass
    (``optimizer.bn_second_pass``).

    ``graph_warmup``: eager calls before the CUDA graph is captured (see
    :class:`CudaGraphStep`). Raises ``ValueError`` naming the settings for a CUDA graph
    without a CUDA device or with fp16 (its GradScaler syncs with the host).
    """
    device = next(model.parameters()).device
    cfg = resolve_config(cfg, device)[0]  # hardware=auto: what the run resolved (no-op if done)
    hw, tcfg = cfg.hardware, cfg.trainer
    amp_dtype = AMP_DTYPES[hw.precision]
    scaler = torch.amp.GradScaler(device.type) if hw.precision == "fp16" else None
    step_model = torch.compile(model) if hw.compile else model
    together = getattr(optimizer, "gradients_come_together", None)
    if hw.compile and together is not None:  # ZSharp: no gradient hooks for a compiled backward
        together()
    label_smoothing = tcfg.label_smoothing
    freeze_bn = getattr(cfg.optimizer, "bn_second_pass", "freeze") == "freeze"

    def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)

    def eager(inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return train_step(
            step_model, optimizer, loss_fn, inputs, targets,
            amp_dtype=amp_dtype, scaler=scaler, freeze_bn_second_pass=freeze_bn,
            grad_clip=tcfg.grad_clip,
        )

    run: StepFn = eager
    if hw.cuda_graph:
        check_graphable(hw, device)
        run = CudaGraphStep(eager, optimizer, warmup=graph_warmup)
    return TrainingStep(
        model=step_model, loss_fn=loss_fn, amp_dtype=amp_dtype, scaler=scaler,
        channels_last=hw.channels_last, eager=eager, run=run,
    )
