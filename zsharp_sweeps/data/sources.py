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

import contextlib
import gzip
import os
import pickle
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from zsharp_sweeps.data.augment import mix_seed
from zsharp_sweeps.data.specs import SPECS, DatasetSpec, get_spec

__all__ = [
    "DataFileError", "DatasetUnavailableError", "RawData", "check_split", "ensure_files",
    "load_files", "load_digits", "read_idx", "synthetic",
]


class DatasetUnavailableError(RuntimeError):
    """The dataset's files are missing (or unreadable) and could not be downloaded.

    The message names the URL to fetch and the exact path the files must end up at.
    """


class DataFileError(DatasetUnavailableError):
    """A dataset file is readable but its contents do not fit: counts of images and labels
    differ, an image has the wrong shape, a label is outside 0..num_classes-1.

    The message names the file(s) and the mismatch. Why refuse rather than trim: an MNIST
    pair with 600 images and 300 labels used to train silently on 300, and a label of 207
    crashed the first step with ``Target 207 is out of bounds``, naming no file.
    """


@dataclass
class RawData:
    """A dataset's official train and test splits, as CPU tensors."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


# ---------------------------------------------------------------------------------------------
# The one check every source's images and labels pass
# ---------------------------------------------------------------------------------------------


def check_split(images: Tensor, labels: Tensor, spec: DatasetSpec, source: str) -> None:
    """Images (N, C, H, W) of ``spec``'s shape, N labels, every label in 0..num_classes-1.

    ``source`` names where they came from (a file, or an images file and its labels file);
    a mismatch raises :class:`DataFileError` naming it. Every reader calls this for each
    file (or pair) it reads, so a bad file is named rather than the concatenation.
    """
    expected = (spec.in_channels, spec.image_size, spec.image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise DataFileError(
            f"{source}: images have shape {tuple(images.shape[1:])}, expected {expected} "
            f"(channels, height, width) for {spec.name}"
        )
    if labels.dim() != 1 or labels.numel() != images.shape[0]:
        raise DataFileError(
            f"{source}: {images.shape[0]} images but {labels.numel()} labels; each image "
            "needs exactly one label (a truncated file, or files of different downloads?)"
        )
    if labels.numel() == 0:
        raise DataFileError(f"{source}: holds no images")
    bad = (labels < 0) | (labels >= spec.num_classes)
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise DataFileError(
            f"{source}: label {int(labels[index])} (of image {index}) is outside 0.."
            f"{spec.num_classes - 1}: {spec.name} has {spec.num_classes} classes"
        )


# ---------------------------------------------------------------------------------------------
# Format readers
# ---------------------------------------------------------------------------------------------


def _pickle_field(d: dict, key: str) -> object:
    # The CIFAR files are Python 2 pickles: loaded with encoding="latin1" their keys are str;
    # files re-saved from Python 3 with bytes keys (the CIFAR site's own recipe) work too.
    return d[key] if key in d else d[key.encode()]


def read_cifar_batches(
    paths: Sequence[Path], label_key: str, spec: DatasetSpec
) -> tuple[Tensor, Tensor]:
    """CIFAR python-format batches: dict with ``data`` (N, 3072) uint8, row-major RGB planes.

    Each file is checked against ``spec`` (``check_split``) before the batches are joined.
    """
    xs, ys = [], []
    for path in paths:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        data = np.asarray(_pickle_field(d, "data"), dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataFileError(
                f"{path}: 'data' has shape {data.shape}, expected (N, 3072) (32x32 RGB rows)"
            )
        x = torch.from_numpy(data.reshape(-1, 3, 32, 32))
        y = torch.from_numpy(np.asarray(_pickle_field(d, label_key), dtype=np.int64).reshape(-1))
        check_split(x, y, spec, str(path))
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


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
    annotations = base / "val" / "val_annotations.txt"
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) >= 2:
            if parts[1] not in index:
                raise DataFileError(
                    f"{annotations}, line {number}: class {parts[1]!r} is not in "
                    f"{base / 'wnids.txt'} ({len(wnids)} classes)"
                )
            test_paths.append(base / "val" / "images" / parts[0])
            test_labels.append(index[parts[1]])
    spec = get_spec("tiny_imagenet")
    if len(wnids) > spec.num_classes:
        raise DataFileError(
            f"{base / 'wnids.txt'}: {len(wnids)} classes, but tiny_imagenet has "
            f"{spec.num_classes}"
        )
    raw = RawData(
        _decode_all(train_paths, spec.image_size), torch.tensor(train_labels, dtype=torch.int64),
        _decode_all(test_paths, spec.image_size), torch.tensor(test_labels, dtype=torch.int64),
    )
    check_split(raw.train_x, raw.train_y, spec, str(base / "train"))
    check_split(raw.test_x, raw.test_y, spec, str(annotations))
    return raw


# ---------------------------------------------------------------------------------------------
# Per dataset: which files, how to read them, how to download them -- one table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileDataset:
    """How one file-backed dataset is found under ``data.root``, read, fetched and explained.

    ``files(root)``: the paths that must exist (also what the missing-file message lists);
    ``read(files, root, spec)``: the splits, each checked with :func:`check_split`;
    ``download(root)``: fetch (torchvision, which verifies checksums) into exactly ``files``;
    ``place(root, spec, download)``: human instructions -- what to download and where to put
    it (``download``: the run's ``data.download``, so advice to turn it on is given only when
    it is off).
    Adding a dataset: its ``DatasetSpec`` in ``specs.py``, a ``FileDataset`` in
    :data:`FILE_DATASETS` and ``conf/data/<name>.yaml``.
    """

    files: Callable[[Path], list[Path]]
    read: Callable[[list[Path], Path, DatasetSpec], RawData]
    download: Callable[[Path], None]
    place: Callable[[Path, DatasetSpec, bool], str]


_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


def _mnist_file(folder: Path, name: str) -> Path:
    """The plain file if present, else its .gz (torchvision keeps both after a download)."""
    plain = folder / name
    return plain if plain.exists() or not (folder / (name + ".gz")).exists() else folder / (name + ".gz")


def _torchvision(cls_name: str, **kwargs: object) -> Callable[[Path], None]:
    """A download through ``torchvision.datasets.<cls_name>(root, download=True, **kwargs)``."""

    def download(root: Path) -> None:
        from torchvision import datasets

        getattr(datasets, cls_name)(str(root), download=True, **kwargs)

    return download


def _cifar(
    folder: str, train: list[str], test: str, label_key: str, torchvision_cls: str
) -> FileDataset:
    def files(root: Path) -> list[Path]:
        return [root / folder / f for f in (*train, test)]

    def read(paths: list[Path], root: Path, spec: DatasetSpec) -> RawData:
        tx, ty = read_cifar_batches(paths[:-1], label_key, spec)
        vx, vy = read_cifar_batches(paths[-1:], label_key, spec)
        return RawData(tx, ty, vx, vy)

    def place(root: Path, spec: DatasetSpec, download: bool) -> str:
        archive = spec.url.rsplit("/", 1)[1]
        enable = "" if download else " with data.download=true"
        return (
            f"Download {spec.url} and extract it into {root} so that {root / folder}/ holds the "
            f"batch files, or put the archive itself at {root / archive} and rerun{enable} "
            "(torchvision then verifies and extracts it without network)."
        )

    return FileDataset(files, read, _torchvision(torchvision_cls, train=True), place)


def _svhn_read(paths: list[Path], root: Path, spec: DatasetSpec) -> RawData:
    splits: list[Tensor] = []
    for path in paths:
        x, y = read_svhn_mat(path)
        check_split(x, y, spec, str(path))
        splits += [x, y]
    return RawData(*splits)


def _svhn_download(root: Path) -> None:
    _torchvision("SVHN", split="train")(root)
    _torchvision("SVHN", split="test")(root)


#: Debian's package of Fashion-MNIST and where it puts the original idx files, flat.
DEBIAN_FASHION_MNIST = ("dataset-fashion-mnist", Path("/usr/share/datasets/fashion-mnist"))


#: How far the mean training pixel (0..1) of flat idx files may be from the spec's before they
#: are refused as another dataset's: MNIST's is 0.1307, Fashion-MNIST's 0.2860.
FLAT_MEAN_TOLERANCE = 0.05


def _check_flat_mean(train_x: Tensor, spec: DatasetSpec, path: Path) -> None:
    """Refuse flat files whose pixels are not ``spec``'s dataset: MNIST and Fashion-MNIST
    files have the same names, and ``data=mnist`` pointed at Debian's Fashion-MNIST folder
    would otherwise train on garments and report it as MNIST."""
    mean = float(train_x.numpy().sum(dtype=np.int64)) / train_x.numel() / 255
    if abs(mean - spec.mean[0]) > FLAT_MEAN_TOLERANCE:
        others = [s.name for s in SPECS.values() if s is not spec and s.in_channels == 1
                  and s.scale == 255 and abs(mean - s.mean[0]) <= FLAT_MEAN_TOLERANCE]
        like = f" like {' or '.join(others)}'s" if others else ""
        use = f"Use data={others[0]}, or point" if len(others) == 1 else "Point"
        raise DataFileError(
            f"{path}: mean pixel {mean:.4f}, but {spec.name}'s is {spec.mean[0]:.4f}: these "
            f"flat files look{like or ' like another dataset'}. {use} data.root at "
            f"{spec.name}'s files, or put them in torchvision's layout (whose folder names "
            "the dataset)."
        )


def _mnist_like(
    folder: str, torchvision_cls: str, debian: tuple[str, Path] | None = None
) -> FileDataset:
    """MNIST-format idx files in either of two layouts under ``data.root``.

    * torchvision's: ``<root>/<folder>/raw/*-ubyte`` (what ``data.download=true`` fetches);
    * flat: ``<root>/*-ubyte``, as the upstream archives and Debian's ``dataset-fashion-mnist``
      (``/usr/share/datasets/fashion-mnist``) ship them.

    Each file may be gzipped or not. The torchvision layout wins when both are complete: its
    folder names the dataset (MNIST and Fashion-MNIST files carry identical names, so flat
    files say nothing about which one they are) and it is the copy a download checksummed.
    When neither is complete, the torchvision paths are the missing ones and where a download
    goes; a root whose flat files are all there is only read, never written to (Debian's is
    a system folder, read-only to users).
    """

    def in_layout(where: Path) -> list[Path]:
        return [_mnist_file(where, f) for f in _MNIST_FILES]

    def files(root: Path) -> list[Path]:
        torchvision_paths, flat_paths = in_layout(root / folder / "raw"), in_layout(root)
        if not all(p.exists() for p in torchvision_paths) and all(p.exists() for p in flat_paths):
            return flat_paths
        return torchvision_paths

    def read(paths: list[Path], root: Path, spec: DatasetSpec) -> RawData:
        raw = RawData(*_read_idx_pair(paths[0], paths[1], spec),
                      *_read_idx_pair(paths[2], paths[3], spec))
        if paths[0].parent == root:  # flat: the names do not say which dataset these are
            _check_flat_mean(raw.train_x, spec, paths[0])
        return raw

    def place(root: Path, spec: DatasetSpec, download: bool) -> str:
        base_url = spec.url.rsplit("/", 1)[0] + "/"
        text = (
            f"Download {', '.join(f + '.gz' for f in _MNIST_FILES)} from {base_url} and put "
            f"them (gzipped or not) in {root / folder / 'raw'}/ (torchvision's layout) or "
            f"directly in {root}/ (flat)."
        )
        if debian is not None:
            package, where = debian
            text += (
                f" On Debian or Ubuntu, `apt-get install {package}` (or `make data`) puts them "
                f"flat in {where}: set data.root={where}."
            )
        return text

    return FileDataset(files, read, _torchvision(torchvision_cls, train=True), place)


def _tiny_imagenet_download(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(get_spec("tiny_imagenet").url, str(root))


#: Every file-backed dataset (``digits`` is embedded, ``synthetic`` generated).
FILE_DATASETS: dict[str, FileDataset] = {
    "cifar10": _cifar("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                      "test_batch", "labels", "CIFAR10"),
    "cifar100": _cifar("cifar-100-python", ["train"], "test", "fine_labels", "CIFAR100"),
    "svhn": FileDataset(
        files=lambda root: [root / "train_32x32.mat", root / "test_32x32.mat"],
        read=_svhn_read,
        download=_svhn_download,
        place=lambda root, spec, download: (
            f"Download {spec.url} and {spec.url.replace('train_', 'test_')} and put them at "
            f"{root / 'train_32x32.mat'} and {root / 'test_32x32.mat'}."
        ),
    ),
    "mnist": _mnist_like("MNIST", "MNIST"),
    "fashion_mnist": _mnist_like("FashionMNIST", "FashionMNIST", DEBIAN_FASHION_MNIST),
    "tiny_imagenet": FileDataset(
        files=lambda root: [root / "tiny-imagenet-200" / p for p in
                            ("wnids.txt", "train", "val/val_annotations.txt", "val/images")],
        read=lambda paths, root, spec: read_tiny_imagenet(root / "tiny-imagenet-200"),
        download=_tiny_imagenet_download,
        place=lambda root, spec, download: (
            f"Download {spec.url} and unzip it into {root} so that "
            f"{root / 'tiny-imagenet-200'}/ holds wnids.txt, train/ and val/."
        ),
    ),
}


def _file_dataset(name: str) -> FileDataset:
    try:
        return FILE_DATASETS[name]
    except KeyError:
        raise ValueError(
            f"{name} has no files on disk: file-backed datasets are {', '.join(FILE_DATASETS)}"
        ) from None


def _required(name: str, root: Path) -> list[Path]:
    """The files that must exist for ``name`` to be read (for the missing-file message)."""
    return _file_dataset(name).files(root)


def _how_to_place(name: str, root: Path, download: bool) -> str:
    """Human instructions: what to download and exactly where to put it.

    ``download`` is the run's ``data.download``: the advice to set it is given only when it
    is off (it is on by default, and telling a user to set it then misleads).
    """
    text = _file_dataset(name).place(root, get_spec(name), download)
    return text + " Or set data.root to a folder that already holds the files."


#: Seconds a download may stall (no bytes) before it fails: offline machines and firewalls
#: that drop packets would otherwise hang the run forever (torchvision sets no timeout).
DOWNLOAD_STALL_TIMEOUT_S = 60.0


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _remove_new_empty_dirs(root: Path, before: set[Path]) -> None:
    """Remove the directories under and above ``root`` that a failed download created and
    left empty (``before``: the directories that existed), so no empty ``data/`` remains."""
    if root.is_dir():
        for folder, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
            path = Path(folder)
            if path not in before:
                with contextlib.suppress(OSError):
                    path.rmdir()  # only succeeds when empty
    path = root
    while path not in before and path != path.parent:
        with contextlib.suppress(OSError):
            path.rmdir()
        path = path.parent


def _existing_dirs(root: Path) -> set[Path]:
    """Every directory at or under ``root`` and every existing ancestor of it."""
    found = {Path(folder) for folder, _, _ in os.walk(root)} if root.is_dir() else set()
    path = root
    while path != path.parent:
        path = path.parent
        if path.is_dir():
            found.add(path)
    return found


def _download(name: str, root: Path) -> None:
    """Fetch with torchvision (which verifies MD5 sums) into the paths ``_required`` lists."""
    root.mkdir(parents=True, exist_ok=True)
    _file_dataset(name).download(root)


def _read_idx_pair(images_file: Path, labels_file: Path, spec: DatasetSpec) -> tuple[Tensor, Tensor]:
    """One MNIST-format split: an idx3 images file (N, 28, 28) and its idx1 labels file (N,)."""
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3:
        raise DataFileError(
            f"{images_file}: an idx file of {images.ndim} dimensions {images.shape}, expected "
            "3 (images, height, width): are the images and labels files swapped?"
        )
    if labels.ndim != 1:
        raise DataFileError(
            f"{labels_file}: an idx file of {labels.ndim} dimensions {labels.shape}, expected "
            "1 (one label per image): are the images and labels files swapped?"
        )
    x = torch.from_numpy(images.astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    check_split(x, y, spec, f"{images_file} with {labels_file}")
    return x, y


def _read(name: str, root: Path) -> RawData:
    return _file_dataset(name).read(_required(name, root), root, get_spec(name))


def ensure_files(name: str, root: str | os.PathLike, download: bool) -> Path:
    """Make sure a file-backed dataset's files exist under ``root``: download them if
    allowed and missing (once, with a stall timeout); returns ``root`` made absolute.

    Called before a run opens its MLflow run, so a dataset that cannot be had costs one
    error line and leaves no FAILED run; a failed download removes the empty directories it
    made. Raises :class:`DatasetUnavailableError` naming the URL and the target path.
    """
    root = Path(root).expanduser().absolute()
    missing = [p for p in _required(name, root) if not p.exists()]
    if missing and download:
        before = _existing_dirs(root)
        try:
            with _socket_timeout(DOWNLOAD_STALL_TIMEOUT_S):
                _download(name, root)
        except Exception as exc:  # offline, refused, bad checksum: one clear error
            _remove_new_empty_dirs(root, before)
            raise DatasetUnavailableError(
                f"{name}: not under {root} and downloading it failed ({type(exc).__name__}: "
                f"{exc}). " + _how_to_place(name, root, download)
            ) from exc
        missing = [p for p in _required(name, root) if not p.exists()]
    if missing:
        raise DatasetUnavailableError(
            f"{name} not found: missing {', '.join(str(p) for p in missing)}"
            f"{'' if download else ' (data.download=false)'}. "
            + _how_to_place(name, root, download)
        )
    return root


def load_files(name: str, root: str | os.PathLike, download: bool) -> RawData:
    """Read a file-backed dataset from ``root``, downloading it first if allowed and missing.

    Raises :class:`DatasetUnavailableError` naming the URL and the target path when the
    files are absent (and ``download`` is false or fails, e.g. offline) or unreadable, and
    :class:`DataFileError` naming the file when its contents do not fit the dataset.
    """
    root = ensure_files(name, root, download)
    try:
        return _read(name, root)
    except DatasetUnavailableError:
        raise
    except Exception as exc:
        raise DatasetUnavailableError(
            f"{name}: the files under {root} could not be read ({type(exc).__name__}: {exc}); "
            "they may be truncated or corrupted. " + _how_to_place(name, root, download)
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
    raw = RawData(x[train_idx], y[train_idx], x[test_idx], y[test_idx])
    spec = get_spec("digits")
    # Natively 8x8: checked against that size (the spec's image_size is the native one).
    check_split(raw.train_x, raw.train_y, spec, "sklearn.datasets.load_digits (train split)")
    check_split(raw.test_x, raw.test_y, spec, "sklearn.datasets.load_digits (test split)")
    return raw


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

    raw = RawData(images(size), labels(size), images(n_test), labels(n_test))
    check_split(raw.train_x, raw.train_y, spec, f"synthetic {spec.name} (train)")
    check_split(raw.test_x, raw.test_y, spec, f"synthetic {spec.name} (test)")
    return raw
