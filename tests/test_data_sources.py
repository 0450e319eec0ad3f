"""Each dataset read from a tiny fixture in its exact on-disk format, and the missing-file
errors. Pixels are compared against what the fixture wrote, through the un-augmented test
loader, so layout (channel order, transposes) and normalisation are both pinned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data_fixtures import (
    write_cifar10,
    write_cifar100,
    write_mnist,
    write_svhn,
    write_tiny_imagenet,
)
from zsharp_sweeps.config import DataConfig
from zsharp_sweeps.data import DatasetUnavailableError, build_data, get_spec, sources

CPU = torch.device("cpu")


def _cfg(name: str, root: Path, **kw: object) -> DataConfig:
    base = dict(name=name, root=str(root), download=False, batch_size=8, eval_batch_size=16,
                val_size=10)
    base.update(kw)
    return DataConfig(**base)


def _normalised(x: np.ndarray, name: str) -> torch.Tensor:
    spec = get_spec(name)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (torch.from_numpy(x).float() / spec.scale - mean) / std


def _all(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def _check_bundle(bundle, name: str, written: dict, n_train: int, val_size: int) -> None:
    spec = get_spec(name)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (
        spec.num_classes, spec.in_channels, spec.image_size
    )
    assert bundle.num_val == val_size and bundle.num_train == n_train - val_size
    assert bundle.num_test == len(written["test_y"])
    x, y = _all(bundle.test)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, _normalised(written["test_x"].reshape(x.shape), name))
    assert torch.equal(y, torch.from_numpy(written["test_y"].astype(np.int64)))
    tx, ty = next(iter(bundle.train))
    assert tx.shape == (8, spec.in_channels, spec.image_size, spec.image_size)
    assert int(ty.min()) >= 0 and int(ty.max()) < spec.num_classes


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_batches(tmp_path: Path, bytes_keys: bool) -> None:
    written = write_cifar10(tmp_path, bytes_keys=bytes_keys)
    bundle = build_data(_cfg("cifar10", tmp_path), CPU, seed=0)
    _check_bundle(bundle, "cifar10", written, n_train=100, val_size=10)


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    written = write_cifar100(tmp_path)
    bundle = build_data(_cfg("cifar100", tmp_path), CPU, seed=0)
    _check_bundle(bundle, "cifar100", written, n_train=120, val_size=10)
    assert int(_all(bundle.test)[1].max()) == 99  # fine labels, not the 20 coarse ones


@pytest.mark.parametrize(("name", "folder", "gz"), [
    ("mnist", "MNIST", False), ("fashion_mnist", "FashionMNIST", True),
])
def test_mnist_idx_files(tmp_path: Path, name: str, folder: str, gz: bool) -> None:
    written = write_mnist(tmp_path, folder=folder, gz=gz)
    bundle = build_data(_cfg(name, tmp_path), CPU, seed=0)
    written["test_x"] = written["test_x"][:, None]
    _check_bundle(bundle, name, written, n_train=100, val_size=10)


def test_svhn_mat_labels_and_layout(tmp_path: Path) -> None:
    written = write_svhn(tmp_path)
    bundle = build_data(_cfg("svhn", tmp_path), CPU, seed=0)
    _check_bundle(bundle, "svhn", written, n_train=80, val_size=10)
    assert int(_all(bundle.test)[1][0]) == 0  # label 10 in the file is digit 0


def test_tiny_imagenet_folders(tmp_path: Path) -> None:
    info = write_tiny_imagenet(tmp_path)
    cfg = _cfg("tiny_imagenet", tmp_path, val_size=3, batch_size=4, augment=False)
    bundle = build_data(cfg, CPU, seed=0)
    assert (bundle.num_classes, bundle.image_size) == (200, 64)
    assert (bundle.num_train, bundle.num_val, bundle.num_test) == (9, 3, 6)
    x, y = _all(bundle.test)
    assert x.shape == (6, 3, 64, 64)
    assert torch.equal(y, torch.from_numpy(info["val_labels"]))
    # Class index = position in sorted wnids; each image keeps its class colour.
    spec = get_spec("tiny_imagenet")
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    wnids = sorted(info["wnids"])
    for img, label in zip(x, y, strict=True):
        rgb = (img.mean(dim=(1, 2)) * std + mean) * 255
        expected = torch.tensor(info["colours"][wnids[int(label)]], dtype=torch.float32)
        assert torch.allclose(rgb, expected, atol=3.0)
    # The greyscale JPEG (first file of wnids.txt's first class) decodes to 3 equal channels.
    raw = sources.read_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    grey = raw.train_x[wnids.index(info["wnids"][0]) * 4].int()
    assert grey.shape == (3, 64, 64)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert abs(grey.float().mean().item() - 128) < 2


@pytest.mark.parametrize(("name", "where"), [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
    ("svhn", "train_32x32.mat"), ("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"),
    ("tiny_imagenet", "tiny-imagenet-200"),
])
def test_missing_files_name_url_and_path(tmp_path: Path, name: str, where: str) -> None:
    with pytest.raises(DatasetUnavailableError) as info:
        build_data(_cfg(name, tmp_path / "nowhere"), CPU, seed=0)
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert get_spec(name).url.rsplit("/", 1)[0] in msg
    assert str((tmp_path / "nowhere" / where).absolute()) in msg
    assert "download=false" in msg


def test_failed_download_is_reported_with_url_and_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(name: str, root: Path) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(sources, "_download", offline)
    with pytest.raises(DatasetUnavailableError) as info:
        build_data(_cfg("cifar10", tmp_path, download=True), CPU, seed=0)
    msg = str(info.value)
    assert "Name or service not known" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert str(tmp_path.absolute() / "cifar-10-python.tar.gz") in msg


def test_corrupted_file_is_reported(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03abc")
    with pytest.raises(DatasetUnavailableError, match="could not be read"):
        build_data(_cfg("mnist", tmp_path), CPU, seed=0)
