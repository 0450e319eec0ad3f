"""The 3-layer MLP of the SAM-vs-SGD replication study (its MNIST model).

Why: the replication compares SAM with SGD on MNIST with a plain fully connected
network -- flatten -> hidden -> hidden -> classes with ReLU between the layers
(three linear layers). The study's exact width could not be confirmed from public
code, so ``hidden`` is a parameter with 512 as the default (a common choice for
MNIST MLPs); change it with ``model.params.hidden=...``. Init is PyTorch's default.

Adaptation: the input layer has ``in_channels * image_size**2`` inputs, so the same
model runs on 8/16 px digits, 28 px MNIST and 32 px CIFAR.
"""

from __future__ import annotations

import torch
from torch import nn

from zsharp_sweeps.models.registry import check_positive_int, register_model


class MLP(nn.Module):
    """flatten -> Linear -> ReLU -> Linear -> ReLU -> Linear."""

    def __init__(self, in_features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model("mlp")
def mlp(*, in_channels: int, num_classes: int, image_size: int, hidden: int = 512) -> MLP:
    """3-layer MLP; 669,706 parameters for 28 px MNIST with hidden=512."""
    check_positive_int("hidden", hidden)
    return MLP(in_channels * image_size * image_size, hidden, num_classes)
