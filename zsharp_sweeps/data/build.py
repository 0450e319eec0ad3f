"""``build_data``: from a ``DataConfig`` to train/val/test loaders on the training device.

Order of operations (each step documented where it happens):
1. read the official train/test splits (files, scikit-learn's digits, or generated);
2. hold ``val_size`` images of the training split out for validation, stratified by class
   and seeded by ``data.split_seed`` (not the run's seed: every run of a sweep is then
   validated on the same images), then keep the first ``train_subset`` of the rest (the
   rest is in seeded random order, so the subset is a random one);
3. resize to ``image_size`` (bilinear; antialiased when shrinking; uint8 results rounded,
   as PIL's resize does);
4. put the splits where the loader wants them (device memory or host memory) and wrap them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from zsharp_sweeps.config import ConfigError, DataConfig
from zsharp_sweeps.data.augment import BatchAugmenter, Cutout, Normalizer, fill_value, mix_seed
from zsharp_sweeps.data.loaders import (
    DeviceEvalLoader,
    DeviceTrainLoader,
    TensorImageDataset,
    TorchEvalLoader,
    TorchTrainLoader,
)
from zsharp_sweeps.data.sources import (
    FILE_DATASETS,
    RawData,
    ensure_files,
    load_digits,
    load_files,
    synthetic,
)
from zsharp_sweeps.data.specs import DatasetSpec, get_spec

__all__ = ["DataBundle", "build_data", "ensure_available", "stratified_split", "resize_images"]

TrainLoader = DeviceTrainLoader | TorchTrainLoader
EvalLoader = DeviceEvalLoader | TorchEvalLoader

_STREAM_SPLIT = 4
_STREAM_FIXED = 3


def stratified_split(labels: Tensor, holdout: int, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (kept, held_out) with ``holdout`` held out, each class in proportion.

    Systematic sampling: shuffle, rank every image within its class, and hold out the
    ``holdout`` images of smallest rank / class size, so each class gives its share to
    within one image (ties between classes broken at random). ``kept`` comes back in
    random order. Pure torch: no scikit-learn needed on the training machine.
    """
    n = labels.numel()
    g = torch.Generator().manual_seed(mix_seed(seed, _STREAM_SPLIT))
    perm = torch.randperm(n, generator=g)
    if holdout == 0:
        return perm, perm[:0]
    lab = labels[perm]
    order = torch.sort(lab, stable=True).indices
    grouped = lab[order]
    counts = torch.bincount(grouped)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[grouped]
    frac = (rank.double() + 0.5) / counts[grouped].double()
    # Jitter far below the smallest gap between distinct fractions (>= 1 / n**2) breaks ties.
    frac += torch.rand(n, generator=g, dtype=torch.float64) / (4.0 * n * n)
    chosen = perm[order[torch.argsort(frac)]]
    held, kept = chosen[:holdout], chosen[holdout:]
    return kept[torch.randperm(kept.numel(), generator=g)], held


def resize_images(x: Tensor, size: int, chunk: int = 4096) -> Tensor:
    """Bilinear resize of (N, C, H, W) to (N, C, size, size), keeping the dtype.

    Chunked so that the float32 intermediate stays small; uint8 results are rounded.
    """
    if x.shape[-2:] == (size, size):
        return x
    shrink = size < max(x.shape[-2:])
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], chunk):
        y = F.interpolate(
            x[s : s + chunk].float(), size=(size, size), mode="bilinear", align_corners=False,
            antialias=shrink,
        )
        if not x.dtype.is_floating_point:
            y = y.round_().clamp_(0, 255)
        out[s : s + chunk] = y.to(x.dtype)
    return out


@dataclass
class DataBundle:
    """Everything the trainer needs from the data: loaders and the facts about them."""

    train: TrainLoader
    val: EvalLoader | None
    test: EvalLoader
    num_classes: int
    in_channels: int
    image_size: int
    name: str
    num_train: int
    num_val: int
    num_test: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Un-augmented access to the training images, for fixed_batches.
    _train_images: Tensor = field(repr=False)
    _train_labels: Tensor = field(repr=False)
    _pad: int = field(repr=False)
    _normalizer: Normalizer = field(repr=False)
    _device: torch.device = field(repr=False)
    _fixed_seed: int = field(repr=False)

    def fixed_batches(self, num_batches: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        """The same un-augmented training batches on every call (for sharpness metrics).

        Images are drawn without replacement by a generator seeded by ``data.split_seed``
        (so every run of a sweep measures on the same images); if more are asked for than
        exist, the draw wraps around.
        """
        g = torch.Generator().manual_seed(mix_seed(self._fixed_seed, _STREAM_FIXED))
        n = self._train_images.shape[0]
        perm = torch.randperm(n, generator=g)
        idx = perm[torch.arange(num_batches * batch_size) % n]
        idx = idx.to(self._train_images.device)
        images = self._train_images[idx]
        if self._pad:
            p, s = self._pad, self.image_size
            images = images[:, :, p : p + s, p : p + s]
        x = self._normalizer(images.to(self._device, non_blocking=True))
        y = self._train_labels[idx].to(self._device, non_blocking=True)
        return [
            (x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size])
            for i in range(num_batches)
        ]


def ensure_available(cfg: DataConfig) -> None:
    """Have the files of ``cfg``'s dataset on disk (downloading them if allowed) or raise
    ``DatasetUnavailableError`` with one line naming the URL and the path to put them at.

    The trainer calls this before it opens an MLflow run: a dataset that cannot be had
    then leaves no FAILED run behind. Embedded and generated data need nothing.
    """
    if cfg.name in FILE_DATASETS:
        ensure_files(cfg.name, cfg.root, cfg.download)


def _load_raw(cfg: DataConfig) -> tuple[DatasetSpec, RawData]:
    if cfg.name == "synthetic":
        spec = get_spec(cfg.synthetic_like)
        return spec, synthetic(spec, cfg.synthetic_size, cfg.split_seed)
    spec = get_spec(cfg.name)
    if cfg.name == "digits":
        return spec, load_digits()
    return spec, load_files(cfg.name, cfg.root, cfg.download)


def build_data(cfg: DataConfig, device: torch.device | str, seed: int) -> DataBundle:
    """Load, split, resize and wrap the dataset that ``cfg`` names.

    ``seed`` drives the training shuffle and augmentation (per epoch); ``cfg.split_seed``
    the validation split, the fixed sharpness batches and the synthetic data.
    Raises ``DatasetUnavailableError`` (a RuntimeError) when files are missing and cannot
    be downloaded, ``ConfigError`` when the split sizes do not fit the dataset.
    """
    device = torch.device(device)
    spec, raw = _load_raw(cfg)
    n_total = raw.train_y.numel()
    if cfg.val_size >= n_total:
        raise ConfigError(
            f"data.val_size={cfg.val_size} is invalid: allowed < {n_total}, the number of "
            f"training images of {cfg.name}."
        )
    kept, held = stratified_split(raw.train_y, cfg.val_size, cfg.split_seed)
    if cfg.train_subset is not None:
        kept = kept[: cfg.train_subset]
    if kept.numel() < cfg.batch_size:
        raise ConfigError(
            f"data.batch_size={cfg.batch_size} is invalid: allowed <= {kept.numel()}, the "
            "number of training images left after the validation split and train_subset "
            "(training batches are full batches)."
        )
    size = cfg.image_size or spec.image_size
    on_device = cfg.loader == "device"
    store = device if on_device else torch.device("cpu")

    def prepare(x: Tensor) -> Tensor:
        return resize_images(x.to(store), size).contiguous()

    train_x, train_y = prepare(raw.train_x[kept]), raw.train_y[kept].to(store)
    val_x, val_y = prepare(raw.train_x[held]), raw.train_y[held].to(store)
    test_x, test_y = prepare(raw.test_x), raw.test_y.to(store)
    del raw

    normalizer = Normalizer(spec.mean, spec.std, spec.scale, device)
    fill = fill_value(spec.mean, spec.scale, train_x.dtype)
    augment = cfg.augment and (cfg.crop_padding > 0 or cfg.hflip or cfg.cutout > 0)
    pad = cfg.crop_padding if augment else 0

    val: EvalLoader | None
    if on_device:
        augmenter = None
        if augment:
            train_x = F.pad(train_x, (pad, pad, pad, pad)) if pad else train_x
            augmenter = BatchAugmenter(
                size, spec.in_channels, pad, cfg.hflip, cfg.cutout, fill, device
            )
        train = DeviceTrainLoader(
            train_x, train_y, normalizer, augmenter, cfg.batch_size, seed
        )
        val = (
            DeviceEvalLoader(val_x, val_y, normalizer, cfg.eval_batch_size)
            if cfg.val_size else None
        )
        test = DeviceEvalLoader(test_x, test_y, normalizer, cfg.eval_batch_size)
    else:
        transform = _torch_transform(cfg, size, fill) if augment else None
        train = TorchTrainLoader(
            TensorImageDataset(train_x, train_y, transform), normalizer, cfg.batch_size,
            cfg.num_workers, seed, device,
        )
        val = (
            TorchEvalLoader(
                TensorImageDataset(val_x, val_y, None), normalizer, cfg.eval_batch_size,
                cfg.num_workers, device,
            )
            if cfg.val_size else None
        )
        test = TorchEvalLoader(
            TensorImageDataset(test_x, test_y, None), normalizer, cfg.eval_batch_size,
            cfg.num_workers, device,
        )
        pad = 0
    return DataBundle(
        train=train, val=val, test=test,
        num_classes=spec.num_classes, in_channels=spec.in_channels, image_size=size,
        name=cfg.name, num_train=train_y.numel(), num_val=val_y.numel(),
        num_test=test_y.numel(), mean=spec.mean, std=spec.std,
        _train_images=train_x, _train_labels=train_y, _pad=pad, _normalizer=normalizer,
        _device=device, _fixed_seed=cfg.split_seed,
    )


def _torch_transform(cfg: DataConfig, size: int, fill: Tensor) -> torch.nn.Module:
    """torchvision transforms with the device augmenter's semantics (see augment.py)."""
    from torchvision.transforms import v2

    steps: list[torch.nn.Module] = []
    if cfg.crop_padding > 0:
        steps.append(v2.RandomCrop(size, padding=cfg.crop_padding, fill=0))
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.cutout > 0:
        steps.append(Cutout(cfg.cutout, fill))
    return v2.Compose(steps)

