"""ResNet-18, CIFAR variant (as kuangliu/pytorch-cifar's ``ResNet18``).

Why this variant: the bangyen/zsharp reproduction and the SAM direction-vs-magnitude
study train "ResNet-18" on 32x32 CIFAR images, which in practice means kuangliu's
adaptation of the ImageNet model: a 3x3 stride-1 stem conv (64 channels) with no
max-pool, so the four stages (64, 128, 256, 512 channels; strides 1, 2, 2, 2) see
32, 16, 8, 4 px. Shortcuts are 1x1 conv + BatchNorm where the shape changes
(option B), convs have no bias, init is PyTorch's default, and the classifier is a
single linear layer on the 512 globally average-pooled features (11,173,962
parameters for 10 classes).

Adaptation: the stem takes ``in_channels``; global average pooling (kuangliu uses a
fixed 4x4 average pool) makes every ``image_size`` work. ``base_width`` (64) scales
the four stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zsharp_sweeps.models.registry import check_positive_int, register_model
from zsharp_sweeps.models.resnet_cifar import BasicBlock


class ResNet(nn.Module):
    """Four-stage ResNet with a CIFAR stem; ``num_blocks`` per stage."""

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int],
        *,
        in_channels: int,
        num_classes: int,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, base_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        in_planes = base_width
        stages = []
        for i, n in enumerate(num_blocks):
            planes = base_width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(
                    BasicBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1, "projection")
                )
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model("resnet18")
def resnet18(
    *, in_channels: int, num_classes: int, image_size: int, base_width: int = 64
) -> ResNet:
    """ResNet-18 (2 blocks per stage; 11.2M parameters for CIFAR-10)."""
    check_positive_int("base_width", base_width)
    return ResNet(
        (2, 2, 2, 2), in_channels=in_channels, num_classes=num_classes, base_width=base_width
    )
