"""Writers of tiny datasets in each dataset's exact on-disk format (for the data tests).

Why write real formats instead of mocking the readers: the tests then pin what matters in
practice, that a user's downloaded files (same names, same folders, same encodings) are
read with the right layout (channel order, SVHN's 10-means-0 labels, Tiny-ImageNet's
annotation file). Each writer returns the arrays it wrote so that tests can compare pixels.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np


def _images(rng: np.random.Generator, n: int, c: int, s: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, c, s, s), dtype=np.uint8)


def _cifar_pickle(path: Path, data: np.ndarray, labels: np.ndarray, label_key: str,
                  bytes_keys: bool = False) -> None:
    d = {
        "batch_label": "fixture batch",
        label_key: [int(v) for v in labels],
        "data": data.reshape(len(data), -1),
        "filenames": [f"img_{i}.png" for i in range(len(data))],
    }
    if bytes_keys:
        d = {k.encode(): v for k, v in d.items()}
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 30, seed: int = 0,
                  bytes_keys: bool = False) -> dict[str, np.ndarray]:
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x, y = _images(rng, per_batch, 3, 32), rng.integers(0, 10, per_batch)
        _cifar_pickle(base / f"data_batch_{i}", x, y, "labels", bytes_keys)
        xs.append(x)
        ys.append(y)
    tx, ty = _images(rng, n_test, 3, 32), rng.integers(0, 10, n_test)
    _cifar_pickle(base / "test_batch", tx, ty, "labels", bytes_keys)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)],
                     "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return {"train_x": np.concatenate(xs), "train_y": np.concatenate(ys),
            "test_x": tx, "test_y": ty}


def write_cifar100(root: Path, n_train: int = 120, n_test: int = 40,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """cifar-100-python/{train, test, meta} with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = _images(rng, n, 3, 32), rng.integers(0, 100, n)
        y[0] = 99  # the top class must survive the reader
        with open(base / split, "wb") as f:
            pickle.dump({"filenames": [f"{i}.png" for i in range(n)], "batch_label": split,
                         "fine_labels": [int(v) for v in y],
                         "coarse_labels": [int(v) // 5 for v in y], "data": x.reshape(n, -1)},
                        f, protocol=2)
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"c{i}" for i in range(20)]}, f, protocol=2)
    return out


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist(root: Path, folder: str | None = "MNIST", n_train: int = 100, n_test: int = 30,
                gz: bool = False, seed: int = 0, mean_pixel: float | None = None
                ) -> dict[str, np.ndarray]:
    """<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]; ``folder``
    None: the files flat in ``root`` (Debian's layout). ``mean_pixel``: pixels 0 or 255 with
    that mean (as a fraction), else uniform."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw" if folder is not None else root
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, key, n in (("train", "train", n_train), ("t10k", "test", n_test)):
        if mean_pixel is None:
            x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        else:
            x = (rng.random((n, 28, 28)) < mean_pixel).astype(np.uint8) * 255
        y = rng.integers(0, 10, n).astype(np.uint8)
        for name, arr in ((f"{prefix}-images-idx3-ubyte", x), (f"{prefix}-labels-idx1-ubyte", y)):
            data = _idx_bytes(arr)
            if gz:
                with gzip.open(raw / (name + ".gz"), "wb") as f:
                    f.write(data)
            else:
                (raw / name).write_bytes(data)
        out[f"{key}_x"], out[f"{key}_y"] = x, y
    return out


def write_svhn(root: Path, n_train: int = 80, n_test: int = 30,
               seed: int = 0) -> dict[str, np.ndarray]:
    """<root>/{train,test}_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) in 1..10."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n, 3, 32)  # (N, C, H, W)
        y = rng.integers(1, 11, n).astype(np.uint8)
        y[0] = 10  # the label that means digit 0
        savemat(str(root / f"{split}_32x32.mat"),
                {"X": np.transpose(x, (2, 3, 1, 0)), "y": y.reshape(-1, 1)})
        out[f"{split}_x"], out[f"{split}_y"] = x, np.where(y == 10, 0, y)
    return out


def write_tiny_imagenet(root: Path, wnids: tuple[str, ...] = ("n02124075", "n01443537",
                                                              "n09246464"),
                        per_class: int = 4, n_val: int = 6, seed: int = 0) -> dict[str, object]:
    """tiny-imagenet-200/: wnids.txt, words.txt, train/<wnid>/images/*.JPEG (+ boxes),
    val/images/*.JPEG with val/val_annotations.txt, test/images/*.JPEG (unlabelled).

    Images are 64x64 flat-coloured JPEGs (colour survives JPEG almost exactly); the first
    training image of the first class is greyscale, as some real ones are.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True, exist_ok=True)
    (base / "test" / "images").mkdir(parents=True, exist_ok=True)
    # wnids.txt is not sorted in the real file either.
    (base / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (base / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in wnids))
    colours: dict[str, tuple[int, int, int]] = {}
    for ci, w in enumerate(wnids):
        folder = base / "train" / w / "images"
        folder.mkdir(parents=True, exist_ok=True)
        colours[w] = (40 + 60 * ci, 200 - 50 * ci, 90)
        boxes = []
        for i in range(per_class):
            name = f"{w}_{i}.JPEG"
            if ci == 0 and i == 0:
                Image.new("L", (64, 64), 128).save(folder / name, "JPEG", quality=95)
            else:
                Image.new("RGB", (64, 64), colours[w]).save(folder / name, "JPEG", quality=95)
            boxes.append(f"{name}\t0\t0\t63\t63\n")
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    lines, val_labels = [], []
    for i in range(n_val):
        w = wnids[int(rng.integers(0, len(wnids)))]
        name = f"val_{i}.JPEG"
        Image.new("RGB", (64, 64), colours[w]).save(base / "val" / "images" / name, "JPEG",
                                                   quality=95)
        lines.append(f"{name}\t{w}\t0\t0\t63\t63\n")
        val_labels.append(sorted(wnids).index(w))
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    Image.new("RGB", (64, 64), (0, 0, 0)).save(base / "test" / "images" / "test_0.JPEG", "JPEG")
    return {"val_labels": np.array(val_labels), "colours": colours, "wnids": wnids}
