"""What each dataset is: shape, classes, normalisation constants and where it comes from.

Why one table: the loaders, the synthetic stand-in (which imitates any of these shapes) and
the error messages (which name the download URL and the on-disk path) all read the same
facts, so they cannot disagree.

Normalisation constants: CIFAR-10/100 and SVHN use the values of the official ZSharp code
(inherited from omihub777/ViT-CIFAR ``utils.get_dataset``: per-channel mean and the true
per-pixel std, not the often-copied 0.2023/0.1994/0.2010); MNIST and Fashion-MNIST the
usual training-set values; Tiny-ImageNet its training-set statistics; digits the mean/std
of ``load_digits().images / 16`` over all 1797 images (0.3053, 0.3760).

Horizontal flips (the ``hflip`` default written in each ``conf/data/<name>.yaml``): on for
CIFAR, Tiny-ImageNet and Fashion-MNIST (natural objects and garments are roughly mirror
symmetric; the SAM replication flips Fashion-MNIST); off for SVHN (as the official code),
MNIST and digits, where a mirrored digit is a different or impossible symbol.
"""

from __future__ import annotations

from dataclasses import dataclass

from zsharp_sweeps.config.checks import DATASETS

__all__ = ["DatasetSpec", "SPECS", "get_spec"]


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about one dataset.

    ``scale`` is the value that the stored pixel type maps to 1.0 (255 for uint8 images,
    16 for the 0..16 scikit-learn digits); ``mean``/``std`` are in that [0, 1] unit.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 255.0
    # Where the files come from (the first of several for SVHN and the MNISTs).
    url: str = ""
    hflip: bool = True
    # Images in the official training split (what data.val_size is held out of).
    train_images: int = 0


SPECS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        "cifar10", 10, 3, 32,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        train_images=50000,
    ),
    "cifar100": DatasetSpec(
        "cifar100", 100, 3, 32,
        mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761),
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        train_images=50000,
    ),
    "svhn": DatasetSpec(
        "svhn", 10, 3, 32,
        mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
        url="http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
        hflip=False,
        train_images=73257,
    ),
    "tiny_imagenet": DatasetSpec(
        "tiny_imagenet", 200, 3, 64,
        mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262),
        url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        train_images=100000,
    ),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", 10, 1, 28, mean=(0.2860,), std=(0.3530,),
        url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz",
        train_images=60000,
    ),
    "mnist": DatasetSpec(
        "mnist", 10, 1, 28, mean=(0.1307,), std=(0.3081,),
        url="https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz",
        hflip=False,
        train_images=60000,
    ),
    # digits: the 80 % of scikit-learn's 1797 images its fixed split trains on.
    "digits": DatasetSpec(
        "digits", 10, 1, 8, mean=(0.3053,), std=(0.3760,), scale=16.0, hflip=False,
        train_images=1437,
    ),
}


if tuple(SPECS) != DATASETS:  # the schema's data.name is checked against this table's names
    raise ImportError(f"zsharp_sweeps/config/checks.py DATASETS={DATASETS} but the dataset "
                      f"table has {tuple(SPECS)}")


def get_spec(name: str) -> DatasetSpec:
    """The spec of a real dataset (``synthetic`` has none of its own: it borrows one)."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}: allowed {', '.join(SPECS)}") from None
