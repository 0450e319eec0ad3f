"""Data, model and optimizer from one config: the single place the parts are assembled.

Why one function: the trainer, the benchmark and the fast-path check must build exactly the
same thing (channels-last weights, a capturable optimizer under a CUDA graph), or their
numbers stop describing what training does. No Hydra/MLflow import, so it runs anywhere
torch does.
"""

from __future__ import annotations

import torch
from torch import nn

from zsharp_sweeps.config import TrainConfig
from zsharp_sweeps.data import DataBundle, build_data
from zsharp_sweeps.models import build_model
from zsharp_sweeps.optim import build_optimizer


def build_parts(
    cfg: TrainConfig, device: torch.device
) -> tuple[DataBundle, nn.Module, torch.optim.Optimizer]:
    """The data bundle on ``device``, the model sized to it, and its optimizer."""
    data = build_data(cfg.data, device, cfg.seed)
    model = build_model(
        cfg.model, in_channels=data.in_channels, num_classes=data.num_classes,
        image_size=data.image_size,
    ).to(device)
    if cfg.hardware.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optimizer, model, capturable=cfg.hardware.cuda_graph)
    return data, model, optimizer
