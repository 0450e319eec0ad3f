"""VGG-16/19 with BatchNorm, CIFAR variant (as kuangliu/pytorch-cifar's ``VGG``).

Why this variant: the ZSharp paper trains ``vgg16_bn`` (and mentions VGG-19) on 32x32
images; the official repository's model file was not available to check (its public
files are the README, run.sh and requirements), so we use the common CIFAR
adaptation (about 15M parameters): the VGG conv stacks
(64-64-M-128-128-M-256x3(x4)-M-512x3(x4)-M-512x3(x4)-M), each 3x3 conv (with bias)
followed by BatchNorm and ReLU, and a single linear classifier on the 512 features
that remain after five 2x2 max-pools of a 32x32 image (no 4096-wide FC layers, no
dropout). vgg16_bn has 14,728,266 parameters for 10 classes, vgg19_bn 20,040,522.
Init is PyTorch's default.

Adaptation to other image sizes (documented because it changes the network):

* a max-pool is **skipped** where its input is already 1 px wide, since it would
  shrink the map to nothing; e.g. at 16 px only the first four pools run (16 -> 1),
  at 8 px only the first three, at 28 px the first four (28, 14, 7, 3 -> 1). The pool
  plan is fixed when the model is built from ``image_size``, so the forward pass
  has no shape-dependent branches;
* after the convs, global average pooling reduces whatever is left (2x2 at 64 px,
  Tiny-ImageNet) to the 512 features, so the classifier is the same at every size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zsharp_sweeps.models.registry import register_model

# Channels of each 3x3 conv; "M" is a 2x2 max-pool.
CFG: dict[str, list[int | str]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """Conv-BN-ReLU stacks, max-pools that fit the image, GAP, one linear layer."""

    def __init__(
        self, cfg: list[int | str], *, in_channels: int, num_classes: int, image_size: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        # Which pools ran; kept so the adaptation is inspectable (and tested).
        self.pools_applied: list[bool] = []
        for v in cfg:
            if v == "M":
                apply = size >= 2
                self.pools_applied.append(apply)
                if apply:
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    size //= 2
            else:
                assert isinstance(v, int)
                layers += [
                    nn.Conv2d(channels, v, kernel_size=3, padding=1),
                    nn.BatchNorm2d(v),
                    nn.ReLU(),
                ]
                channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(out)


@register_model("vgg16_bn")
def vgg16_bn(*, in_channels: int, num_classes: int, image_size: int) -> VGG:
    """VGG-16 with BatchNorm (14.7M parameters for CIFAR-10)."""
    return VGG(
        CFG["vgg16"], in_channels=in_channels, num_classes=num_classes, image_size=image_size
    )


@register_model("vgg19_bn")
def vgg19_bn(*, in_channels: int, num_classes: int, image_size: int) -> VGG:
    """VGG-19 with BatchNorm (20.0M parameters for CIFAR-10)."""
    return VGG(
        CFG["vgg19"], in_channels=in_channels, num_classes=num_classes, image_size=image_size
    )
