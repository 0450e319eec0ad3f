"""Reading each dataset from its standard on-disk format into tensors.

Why our own readers instead of the ``torchvision.datasets`` classes: those classes verify
the MD5 of every extracted file each time they are built, so they refuse anything but the
official files (tests could not feed them small fixtures in the same format) and they hand
back per-sample PIL images, while the device loader wants the whole split as one tensor.
The formats are simple and stable (CIFAR python pickles, MNIST idx files, SVHN MATLAB
files, Tiny-ImageNet folders). ``torchvision.datasets`` is still what *downloads*: with
``data.download=true`` and files missing, the matching torchvision class fetches, verifies
and extracts them into ``data.root``, into exactly the paths read here.

Every reader returns a :class:`RawData`: images as (N, C, H, W) tensors in the source's
type (uint8, or float32 for the 0..16 scikit-learn digits) and int64 labels, on the CPU.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from zsharp_sweeps.data.augment import mix_seed
from zsharp_sweeps.data.specs import DatasetSpec, get_spec

__all__ = [
    "DatasetUnavailableError", "RawData", "load_files", "load_digits", "read_idx", "synthetic",
]


class DatasetUnavailableError(RuntimeError):
    """The dataset's files are missing (or unreadable) and could not be downloaded.

    The message names the URL to fetch and the exact path the files must end up at.
    """


@dataclass
class RawData:
    """A dataset's official train and test splits, as CPU tensors."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


# ---------------------------------------------------------------------------------------------
# Format readers
# ---------------------------------------------------------------------------------------------


def _pickle_field(d: dict, key: str) -> object:
    # The CIFAR files are Python 2 pickles: loaded with encoding="latin1" their keys are str;
    # files re-saved from Python 3 with bytes keys (the CIFAR site's own recipe) work too.
    return d[key] if key in d else d[key.encode()]


def read_cifar_batches(paths: Sequence[Path], label_key: str) -> tuple[Tensor, Tensor]:
    """CIFAR python-format batches: dict with ``data`` (N, 3072) uint8, row-major RGB planes."""
    xs, ys = [], []
    for path in paths:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(_pickle_field(d, "data"), dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(_pickle_field(d, label_key), dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format), plain or gzipped: magic 0,0,type,ndim; big-endian dims."""
    opener: Callable = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=_IDX_TYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims)


def read_svhn_mat(path: Path) -> tuple[Tensor, Tensor]:
    """SVHN cropped digits: ``X`` (32, 32, 3, N) uint8, ``y`` (N, 1) with 10 meaning digit 0."""
    from scipy.io import loadmat

    mat = loadmat(str(path))
    x = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)))  # -> (N, C, H, W)
    y = mat["y"].astype(np.int64).reshape(-1)
    y[y == 10] = 0
    return torch.from_numpy(x), torch.from_numpy(y)


def _decode_jpeg(path: Path) -> Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError:  # an unusual JPEG variant (e.g. CMYK): fall back to PIL
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _decode_all(paths: Sequence[Path], size: int) -> Tensor:
    """Decode JPEGs in parallel threads (the decoder releases the GIL) into (N, 3, S, S)."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)

    def one(i: int) -> None:
        img = _decode_jpeg(paths[i])
        if img.shape != (3, size, size):
            raise DatasetUnavailableError(
                f"{paths[i]} is {tuple(img.shape[1:])}, expected {size}x{size}: is the "
                "Tiny-ImageNet folder corrupted?"
            )
        out[i] = img

    workers = max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(paths))))
    return out


def read_tiny_imagenet(base: Path) -> RawData:
    """Tiny-ImageNet-200's folders. Class index = position in the sorted ``wnids.txt``.

    ``train/<wnid>/images/*.JPEG`` is the training set; ``val/images`` with
    ``val/val_annotations.txt`` (file, wnid, box) is the labelled held-out set and serves
    as the test split (the official ``test/`` folder has no labels).
    """
    wnids = sorted({w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    train_paths: list[Path] = []
    train_labels: list[int] = []
    for w in wnids:
        files = sorted((base / "train" / w / "images").glob("*.JPEG"))
        if not files:
            raise FileNotFoundError(base / "train" / w / "images")
        train_paths += files
        train_labels += [index[w]] * len(files)
    test_paths: list[Path] = []
    test_labels: list[int] = []
    for line in (base / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            test_paths.append(base / "val" / "images" / parts[0])
            test_labels.append(index[parts[1]])
    size = get_spec("tiny_imagenet").image_size
    return RawData(
        _decode_all(train_paths, size), torch.tensor(train_labels, dtype=torch.int64),
        _decode_all(test_paths, size), torch.tensor(test_labels, dtype=torch.int64),
    )


# ---------------------------------------------------------------------------------------------
# Per dataset: which files, how to read them, how to download them
# ---------------------------------------------------------------------------------------------

_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


def _mnist_file(folder: Path, name: str) -> Path:
    """The plain file if present, else its .gz (torchvision keeps both after a download)."""
    plain = folder / name
    return plain if plain.exists() or not (folder / (name + ".gz")).exists() else folder / (name + ".gz")


def _required(name: str, root: Path) -> list[Path]:
    """The files that must exist for ``name`` to be read (for the missing-file message)."""
    if name == "cifar10":
        base = root / "cifar-10-batches-py"
        return [base / f"data_batch_{i}" for i in range(1, 6)] + [base / "test_batch"]
    if name == "cifar100":
        base = root / "cifar-100-python"
        return [base / "train", base / "test"]
    if name == "svhn":
        return [root / "train_32x32.mat", root / "test_32x32.mat"]
    if name in ("mnist", "fashion_mnist"):
        folder = root / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
        return [_mnist_file(folder, f) for f in _MNIST_FILES]
    if name == "tiny_imagenet":
        base = root / "tiny-imagenet-200"
        return [base / "wnids.txt", base / "train", base / "val" / "val_annotations.txt",
                base / "val" / "images"]
    raise ValueError(f"{name} has no files on disk")


def _how_to_place(name: str, root: Path) -> str:
    """Human instructions: what to download and exactly where to put it."""
    spec = get_spec(name)
    if name in ("cifar10", "cifar100"):
        archive = spec.url.rsplit("/", 1)[1]
        folder = _required(name, root)[0].parent
        return (
            f"Download {spec.url} and extract it into {root} so that {folder}/ holds the "
            f"batch files; or put the archive itself at {root / archive} and set "
            "data.download=true (torchvision then verifies and extracts it without network)."
        )
    if name == "svhn":
        return (
            f"Download {spec.url} and {spec.url.replace('train_', 'test_')} and put them at "
            f"{root / 'train_32x32.mat'} and {root / 'test_32x32.mat'}."
        )
    if name in ("mnist", "fashion_mnist"):
        folder = _required(name, root)[0].parent
        base_url = spec.url.rsplit("/", 1)[0] + "/"
        return (
            f"Download {', '.join(f + '.gz' for f in _MNIST_FILES)} from {base_url} and put "
            f"them (gzipped or not) in {folder}/."
        )
    return (
        f"Download {spec.url} and unzip it into {root} so that {root / 'tiny-imagenet-200'}/ "
        "holds wnids.txt, train/ and val/."
    )


def _download(name: str, root: Path) -> None:
    """Fetch with torchvision (which verifies MD5 sums) into the paths ``_required`` lists."""
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    root.mkdir(parents=True, exist_ok=True)
    if name == "cifar10":
        datasets.CIFAR10(str(root), train=True, download=True)
    elif name == "cifar100":
        datasets.CIFAR100(str(root), train=True, download=True)
    elif name == "svhn":
        datasets.SVHN(str(root), split="train", download=True)
        datasets.SVHN(str(root), split="test", download=True)
    elif name == "mnist":
        datasets.MNIST(str(root), train=True, download=True)
    elif name == "fashion_mnist":
        datasets.FashionMNIST(str(root), train=True, download=True)
    elif name == "tiny_imagenet":
        download_and_extract_archive(get_spec(name).url, str(root))


def _read(name: str, root: Path) -> RawData:
    files = _required(name, root)
    if name == "cifar10":
        tx, ty = read_cifar_batches(files[:5], "labels")
        vx, vy = read_cifar_batches(files[5:], "labels")
        return RawData(tx, ty, vx, vy)
    if name == "cifar100":
        tx, ty = read_cifar_batches(files[:1], "fine_labels")
        vx, vy = read_cifar_batches(files[1:], "fine_labels")
        return RawData(tx, ty, vx, vy)
    if name == "svhn":
        return RawData(*read_svhn_mat(files[0]), *read_svhn_mat(files[1]))
    if name in ("mnist", "fashion_mnist"):
        arrays = [read_idx(f) for f in files]
        x = [torch.from_numpy(arrays[i].astype(np.uint8)).unsqueeze(1) for i in (0, 2)]
        y = [torch.from_numpy(arrays[i].astype(np.int64)) for i in (1, 3)]
        return RawData(x[0], y[0], x[1], y[1])
    return read_tiny_imagenet(root / "tiny-imagenet-200")


def load_files(name: str, root: str | os.PathLike, download: bool) -> RawData:
    """Read a file-backed dataset from ``root``, downloading it first if allowed and missing.

    Raises :class:`DatasetUnavailableError` naming the URL and the target path when the
    files are absent (and ``download`` is false or fails, e.g. offline) or unreadable.
    """
    root = Path(root).expanduser().absolute()
    missing = [p for p in _required(name, root) if not p.exists()]
    if missing and download:
        try:
            _download(name, root)
        except Exception as exc:  # offline, refused, bad checksum: one clear error
            raise DatasetUnavailableError(
                f"{name}: downloading into {root} failed ({type(exc).__name__}: {exc}). "
                + _how_to_place(name, root)
            ) from exc
        missing = [p for p in _required(name, root) if not p.exists()]
    if missing:
        raise DatasetUnavailableError(
            f"{name} not found: missing {', '.join(str(p) for p in missing)}"
            f"{'' if download else ' (data.download=false)'}. " + _how_to_place(name, root)
        )
    try:
        return _read(name, root)
    except DatasetUnavailableError:
        raise
    except Exception as exc:
        raise DatasetUnavailableError(
            f"{name}: the files under {root} could not be read ({type(exc).__name__}: {exc}); "
            "they may be truncated or corrupted. " + _how_to_place(name, root)
        ) from exc


# ---------------------------------------------------------------------------------------------
# Embedded and generated data
# ---------------------------------------------------------------------------------------------

# The digits test split is fixed (not data.split_seed) so that test accuracy is comparable
# across every run; data.split_seed only moves the validation split.
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0


def load_digits() -> RawData:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16): a stratified 80/20
    train/test split with a fixed seed. No file access, so it runs anywhere."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    d = sk_load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_TEST_SEED,
        stratify=d.target,
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return RawData(x[train_idx], y[train_idx], x[test_idx], y[test_idx])


def synthetic(spec: DatasetSpec, size: int, seed: int) -> RawData:
    """Random images of ``spec``'s shape and storage type with random labels.

    ``size`` training images and ``max(1, size // 5)`` test images. For benchmarks and
    machines without the data: the pixels follow no pattern, so accuracy stays at chance.
    """
    g = torch.Generator().manual_seed(mix_seed(seed, 5))
    n_test = max(1, size // 5)
    shape = (spec.in_channels, spec.image_size, spec.image_size)

    def images(n: int) -> Tensor:
        if spec.scale == 255:  # drawn as uint8 directly: no int64 intermediate
            return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
        return torch.randint(0, int(spec.scale) + 1, (n, *shape), generator=g).float()

    def labels(n: int) -> Tensor:
        return torch.randint(0, spec.num_classes, (n,), generator=g)

    return RawData(images(size), labels(size), images(n_test), labels(n_test))
