"""The data layer: datasets read from their standard formats, split, and fed to the device.

Public API::

    ensure_available(cfg.data)                    # files on disk (downloaded) or one error
    bundle = build_data(cfg.data, device, seed)   # -> DataBundle
    for inputs, targets in bundle.train: ...      # normalised float32 NCHW, int64, on device
    bundle.val / bundle.test                      # un-augmented; val is None if val_size=0
    bundle.fixed_batches(num_batches, batch_size) # fixed un-augmented training batches

Datasets: cifar10, cifar100, svhn, tiny_imagenet, fashion_mnist, mnist (files under
``data.root``, downloaded by torchvision when allowed), digits (scikit-learn's bundled
8x8 digits, no files) and synthetic (random tensors of any of their shapes).
"""

from zsharp_sweeps.data.build import (
    DataBundle,
    build_data,
    ensure_available,
    resize_images,
    stratified_split,
)
from zsharp_sweeps.data.sources import DataFileError, DatasetUnavailableError
from zsharp_sweeps.data.specs import SPECS, DatasetSpec, get_spec

__all__ = [
    "DataBundle", "build_data", "ensure_available", "DataFileError", "DatasetUnavailableError",
    "DatasetSpec", "SPECS", "get_spec",
    "resize_images", "stratified_split",
]
