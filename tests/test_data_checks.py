"""Dataset files whose contents do not fit are refused, naming the file and the mismatch.

Each test writes a format-exact fixture (tests/data_fixtures.py), damages one thing the way
a real download goes wrong, and loads it through ``build_data``. Before these checks a
600-image/300-label MNIST pair trained silently on 300 images, and a label of 207 crashed
the first step with ``Target 207 is out of bounds``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data_fixtures import (
    _idx_bytes,
    write_cifar10,
    write_cifar100,
    write_mnist,
    write_svhn,
    write_tiny_imagenet,
)
from zsharp_sweeps.config import DataConfig
from zsharp_sweeps.data import DataFileError, DatasetUnavailableError, build_data, get_spec
from zsharp_sweeps.data.sources import check_split, ensure_files, read_idx

CPU = torch.device("cpu")


def _load(name: str, root: Path) -> None:
    build_data(DataConfig(name=name, root=str(root), download=False, val_size=5, batch_size=4),
               CPU, seed=0)


def _refusal(name: str, root: Path) -> str:
    with pytest.raises(DataFileError) as info:
        _load(name, root)
    assert isinstance(info.value, DatasetUnavailableError)  # the entry point's one-line path
    return str(info.value)


def _rewrite_pickle(path: Path, **changes) -> None:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    d.update(changes)
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_images_and_labels_of_different_lengths(tmp_path: Path, gz: bool) -> None:
    write_mnist(tmp_path, n_train=60, gz=gz)
    raw = tmp_path / "MNIST" / "raw"
    suffix = ".gz" if gz else ""
    labels = raw / f"train-labels-idx1-ubyte{suffix}"
    data = _idx_bytes(read_idx(labels)[:30])
    if gz:
        import gzip

        data = gzip.compress(data)
    labels.write_bytes(data)
    message = _refusal("mnist", tmp_path)
    assert message == (
        f"{raw / ('train-images-idx3-ubyte' + suffix)} with {labels}: 60 images but 30 labels; "
        "each image needs exactly one label (a truncated file, or files of different downloads?)"
    )


def test_mnist_label_out_of_range(tmp_path: Path) -> None:
    write_mnist(tmp_path, folder="FashionMNIST")
    raw = tmp_path / "FashionMNIST" / "raw"
    labels = read_idx(raw / "t10k-labels-idx1-ubyte").copy()
    labels[7] = 207
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    message = _refusal("fashion_mnist", tmp_path)
    assert f"{raw / 't10k-labels-idx1-ubyte'}: label 207 (of image 7) is outside 0..9" in message


def test_mnist_files_swapped(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    images, labels = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    swap = tmp_path / "swap"
    images.rename(swap)
    labels.rename(images)
    swap.rename(labels)
    assert "are the images and labels files swapped?" in _refusal("mnist", tmp_path)


def test_mnist_images_of_the_wrong_size(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(_idx_bytes(np.zeros((100, 32, 32), dtype=np.uint8)))
    assert f"{path} with" in (message := _refusal("mnist", tmp_path))
    assert "images have shape (1, 32, 32), expected (1, 28, 28)" in message


def test_cifar10_batch_with_a_label_of_another_dataset(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    _rewrite_pickle(batch, labels=[10] + [0] * 19)
    message = _refusal("cifar10", tmp_path)
    assert message.startswith(f"{batch}: label 10 (of image 0) is outside 0..9")


def test_cifar10_batch_with_fewer_labels_than_images(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    _rewrite_pickle(batch, labels=[1] * 29)
    assert f"{batch}: 30 images but 29 labels" in _refusal("cifar10", tmp_path)


def test_cifar10_rows_that_are_not_32x32_rgb(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    _rewrite_pickle(batch, data=np.zeros((20, 1024), dtype=np.uint8))
    assert f"{batch}: 'data' has shape (20, 1024), expected (N, 3072)" in _refusal("cifar10",
                                                                                 tmp_path)


def test_cifar100_coarse_labels_are_not_mistaken_for_fine_ones(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    train = tmp_path / "cifar-100-python" / "train"
    _rewrite_pickle(train, fine_labels=[100] * 120)
    assert f"{train}: label 100 (of image 0) is outside 0..99" in _refusal("cifar100", tmp_path)


def test_svhn_with_more_labels_than_images(tmp_path: Path) -> None:
    from scipy.io import loadmat, savemat

    write_svhn(tmp_path)
    path = tmp_path / "test_32x32.mat"
    mat = loadmat(str(path))
    savemat(str(path), {"X": mat["X"], "y": np.concatenate([mat["y"], mat["y"][:5]])})
    assert f"{path}: 30 images but 35 labels" in _refusal("svhn", tmp_path)


def test_tiny_imagenet_annotation_naming_an_unknown_class(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path)
    ann = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    lines = ann.read_text().splitlines()
    lines[2] = "val_2.JPEG\tn99999999\t0\t0\t63\t63"
    ann.write_text("\n".join(lines) + "\n")
    assert f"{ann}, line 3: class 'n99999999' is not in" in _refusal("tiny_imagenet", tmp_path)


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("cifar10", write_cifar10),
        ("cifar100", write_cifar100),
        ("svhn", write_svhn),
        ("mnist", write_mnist),
        ("fashion_mnist", lambda root: write_mnist(root, folder="FashionMNIST")),
        ("tiny_imagenet", write_tiny_imagenet),
    ],
)
def test_good_files_pass_unchanged(tmp_path: Path, name: str, write) -> None:
    """The checks refuse nothing that is right: every fixture format loads."""
    write(tmp_path)
    _load(name, tmp_path)


def test_check_split_is_the_one_rule_for_every_source() -> None:
    spec = get_spec("digits")
    check_split(torch.zeros(3, 1, 8, 8), torch.tensor([0, 9, 4]), spec, "x")
    with pytest.raises(DataFileError, match=r"^x: label -1 \(of image 1\) is outside 0..9"):
        check_split(torch.zeros(3, 1, 8, 8), torch.tensor([0, -1, 4]), spec, "x")
    with pytest.raises(DataFileError, match="^x: holds no images"):
        check_split(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), spec, "x")
    with pytest.raises(DataFileError, match=r"images have shape \(3, 8, 8\)"):
        check_split(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), spec, "x")


def test_failed_download_removes_the_folders_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zsharp_sweeps.data import sources

    (tmp_path / "keep").mkdir()

    def offline(name: str, root: Path) -> None:
        (root / "cifar-10-batches-py").mkdir(parents=True)
        raise OSError("Name or service not known")

    monkeypatch.setattr(sources, "_download", offline)
    with pytest.raises(DatasetUnavailableError) as info:
        ensure_files("cifar10", tmp_path / "data" / "nested", download=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    message = str(info.value)
    assert "rerun (torchvision then verifies" in message  # download is already on
    assert "data.download=true" not in message


def test_with_download_off_the_advice_is_to_turn_it_on(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError) as info:
        ensure_files("cifar100", tmp_path, download=False)
    assert "and rerun with data.download=true" in str(info.value)
    assert list(tmp_path.iterdir()) == []
