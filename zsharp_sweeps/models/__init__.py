"""The model zoo: CIFAR ResNets, ResNet-18, Wide ResNet, VGG, ViT and an MLP.

One entry point, :func:`build_model`, turns a ``model`` config section into a
``torch.nn.Module`` sized for the dataset::

    from zsharp_sweeps.config import ModelConfig
    from zsharp_sweeps.models import build_model

    net = build_model(ModelConfig("vit", {"depth": 6}), in_channels=3, num_classes=10,
                      image_size=32)

Every model adapts to the dataset's channels (1 for MNIST/digits, 3 for colour),
image side (8 to 64 px; CNNs end in global average pooling) and class count, and is
written for speed switches: no Python control flow on tensor values in ``forward``
(``torch.compile``-friendly), convolutions that accept channels-last input, and
nothing that breaks under bf16 autocast. New models register with
``@register_model("name")`` and appear in :data:`MODELS`.
"""

from zsharp_sweeps.models import mlp, resnet, resnet_cifar, vgg, vit, wrn  # noqa: F401  (register)
from zsharp_sweeps.models.registry import (
    DATASET_ARGS,
    MODELS,
    build_model,
    model_param_defaults,
    register_model,
)

__all__ = ["DATASET_ARGS", "MODELS", "build_model", "model_param_defaults", "register_model"]
