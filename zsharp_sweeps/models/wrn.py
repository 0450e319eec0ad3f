"""Wide ResNet (Zagoruyko & Komodakis 2016), as davda54/sam's example trains it.

Why this implementation: WRN-28-10 is the SAM paper's and the SAM replication's
CIFAR model, and davda54/sam (the SAM code our optimizers imitate) ships the version
its results come from. Architecture (identical to the paper's and to
xternalz/WideResNet-pytorch, 36,479,194 parameters for 10 classes):

* a 3x3 stem conv to 16 channels;
* 3 groups of (depth - 4) / 6 pre-activation blocks (BN-ReLU-conv3x3-BN-ReLU-
  dropout-conv3x3) with 16k, 32k, 64k channels (k = width); the first block of each
  group takes the BN-ReLU'd input into both its residual branch and a 1x1 conv
  shortcut (strides 1, 2, 2);
* a final BN-ReLU, global average pooling and a linear classifier.

Init as davda54's: Kaiming-normal (fan-in, ReLU) conv weights, BatchNorm to (1, 0),
and a **zero** classifier (weight and bias), so the network starts at uniform
predictions.

Adaptation: the stem takes ``in_channels``; global average pooling (davda54 uses a
fixed 8x8 pool) makes every ``image_size`` work. ``depth``, ``width`` and ``dropout``
(0 by default, as the SAM runs) are parameters, so ``model.params.width=2`` gives a
cheap WRN-28-2.
"""

from __future__ import annotations

import torch
from torch import nn

from zsharp_sweeps.models.registry import (
    check_dropout,
    check_param,
    check_positive_int,
    register_model,
)


class BasicUnit(nn.Module):
    """A shape-preserving pre-activation block with an identity shortcut."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class DownsampleUnit(nn.Module):
    """The first block of a group: changes width (and maybe resolution).

    The shared BN-ReLU feeds both the residual branch and the 1x1 conv shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.norm_act = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False),
        )
        self.downsample = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_act(x)
        return self.block(x) + self.downsample(x)


class WideResNet(nn.Module):
    """WRN-depth-width for small images."""

    def __init__(
        self, depth: int, width: int, dropout: float, *, in_channels: int, num_classes: int
    ) -> None:
        super().__init__()
        filters = (16, 16 * width, 32 * width, 64 * width)
        units = (depth - 4) // 6
        groups: list[nn.Module] = []
        for i in range(3):
            groups.append(
                nn.Sequential(
                    DownsampleUnit(filters[i], filters[i + 1], 1 if i == 0 else 2, dropout),
                    *(BasicUnit(filters[i + 1], dropout) for _ in range(units - 1)),
                )
            )
        self.stem = nn.Conv2d(in_channels, filters[0], 3, stride=1, padding=1, bias=False)
        self.group1, self.group2, self.group3 = groups
        self.norm_act = nn.Sequential(nn.BatchNorm2d(filters[3]), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(filters[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.group3(self.group2(self.group1(self.stem(x))))
        out = self.pool(self.norm_act(out)).flatten(1)
        return self.linear(out)


@register_model("wrn28_10")
def wrn28_10(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    depth: int = 28,
    width: int = 10,
    dropout: float = 0.0,
) -> WideResNet:
    """WRN-28-10 by default (36.5M parameters for CIFAR-10); depth/width adjustable."""
    check_param(
        isinstance(depth, int) and depth >= 10 and (depth - 4) % 6 == 0,
        "depth", depth, "6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40 ...)",
    )
    check_positive_int("width", width)
    check_dropout("dropout", dropout)
    return WideResNet(
        depth, width, float(dropout), in_channels=in_channels, num_classes=num_classes
    )
