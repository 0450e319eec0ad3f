"""CIFAR ResNets of He et al. (2016, Sec. 4.2): resnet20, resnet56, resnet110.

Why this exact variant: the ZSharp paper's ResNet-20/56 results come from the official
code (``--model-name res20s / res56s``), whose CIFAR ResNets are (docs/algorithms.md, recipes) the
option-A models of akamaster/pytorch_resnet_cifar10 (the faithful port of the
paper's CIFAR models). Their details matter for parameter counts and for ZSharp's
per-tensor filtering, so they are kept:

* a 3x3 stem conv (16 channels), then 3 stages of ``n`` BasicBlocks with 16, 32, 64
  channels (depth = 6n + 2: n = 3, 9, 18 for 20, 56, 110 layers); stages 2 and 3
  start with stride 2;
* convolutions without bias, each followed by BatchNorm;
* option-A shortcuts: where the shape changes, the identity is subsampled
  (``x[:, :, ::2, ::2]``) and zero-padded in channels -- no parameters: resnet20 has
  269,722 parameters for 10 classes, as akamaster's script prints (272,474, a figure
  also quoted, is the option-B count with two 1x1 conv + BN projections);
* Kaiming-normal init (``kaiming_normal_`` defaults: fan-in, ReLU gain) of every conv
  and linear weight; biases and BatchNorm keep PyTorch's defaults;
* global average pooling before the linear classifier.

Adaptation: the stem takes ``in_channels`` (1 for MNIST / digits); global average
pooling makes every ``image_size`` work (at 8 px the stages run at 8, 4, 2 px).
``base_width`` (16 in the paper) scales all three stages (w, 2w, 4w).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zsharp_sweeps.models.registry import check_param, check_positive_int, register_model


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the channels.

    A module rather than akamaster's lambda so that models pickle, deep-copy and
    trace cleanly under ``torch.compile``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        self.pad_lo = extra // 2
        self.pad_hi = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU (He et al. 2016).

    ``shortcut`` where the shape changes: ``"pad"`` (option A, zero-padding, no parameters:
    the CIFAR ResNets) or ``"projection"`` (option B, 1x1 conv + BN: ResNet-18).
    """

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "pad"
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "pad":
                self.shortcut = PadShortcut(in_planes, planes, stride)
            elif shortcut == "projection":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            else:
                raise ValueError(f"shortcut={shortcut!r}: allowed 'pad' or 'projection'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet with option-A shortcuts."""

    def __init__(
        self, num_blocks: int, *, in_channels: int, num_classes: int, base_width: int = 16
    ) -> None:
        super().__init__()
        widths = (base_width, 2 * base_width, 4 * base_width)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _cifar_resnet(
    depth: int, in_channels: int, num_classes: int, base_width: int
) -> CifarResNet:
    check_positive_int("base_width", base_width)
    check_param((depth - 2) % 6 == 0, "depth", depth, "6n + 2")
    return CifarResNet(
        (depth - 2) // 6, in_channels=in_channels, num_classes=num_classes, base_width=base_width
    )


@register_model("resnet20")
def resnet20(
    *, in_channels: int, num_classes: int, image_size: int, base_width: int = 16
) -> CifarResNet:
    """ResNet-20 (n = 3; 0.27M parameters for CIFAR-10)."""
    return _cifar_resnet(20, in_channels, num_classes, base_width)


@register_model("resnet56")
def resnet56(
    *, in_channels: int, num_classes: int, image_size: int, base_width: int = 16
) -> CifarResNet:
    """ResNet-56 (n = 9; 0.85M parameters for CIFAR-10)."""
    return _cifar_resnet(56, in_channels, num_classes, base_width)


@register_model("resnet110")
def resnet110(
    *, in_channels: int, num_classes: int, image_size: int, base_width: int = 16
) -> CifarResNet:
    """ResNet-110 (n = 18; 1.7M parameters for CIFAR-10)."""
    return _cifar_resnet(110, in_channels, num_classes, base_width)
