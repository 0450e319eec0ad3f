"""The two ways batches reach the model: tensors resident on the device, or torch's DataLoader.

Both yield ``(inputs, targets)`` on the training device: inputs normalised float32
(B, C, H, W), targets int64 (B,). Training loaders drop the last partial batch (static
shapes for compiled models and CUDA graphs) and reshuffle every epoch with a generator seeded
by ``(seed, epoch)``. The epoch is the value given to ``set_epoch`` before iterating, or
else counts up from 0 with every pass, so a plain ``for epoch ...: for x, y in loader`` loop
and a resumed run that calls ``set_epoch`` see the same batches.

Why the device loader is the default (KellerJordan/airbench's recipe): the datasets used
here fit in GPU memory many times over, so keeping them there removes the host-to-device
copy and the per-sample Python of a DataLoader, which at CIFAR scale costs more than a small
ResNet's step. Work is done in chunks of several batches (one gather and one normalise for
the chunk, then the batches are views of it) to cut kernel launches, and nothing in the loop
waits for the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from zsharp_sweeps.data.augment import BatchAugmenter, Normalizer, mix_seed

__all__ = [
    "DeviceTrainLoader", "DeviceEvalLoader", "TorchTrainLoader", "TorchEvalLoader",
    "TensorImageDataset", "STREAM_TRAIN",
]

Batch = tuple[Tensor, Tensor]
STREAM_TRAIN = 1
# Work on this many bytes of float32 output at a time (several batches per kernel launch).
# Measured on an H100 (synthetic CIFAR-10 shape, 45,000 training images, batch 256, crop +
# flip): one batch per chunk 37 ms/epoch (host-bound: ~200 us of launches a batch), 64 MiB
# 6.3 ms, 128 MiB 5.2 ms, 256 MiB 5.1 ms; i.e. ~30 us a batch, ~8.5M images/s.
CHUNK_BYTES = 128 << 20


def _images_per_chunk(batch_size: int, image_numel: int, chunk_bytes: int) -> int:
    per_batch = batch_size * image_numel * 4
    return batch_size * max(1, chunk_bytes // max(per_batch, 1))


class _EpochCounter:
    """``set_epoch`` for resumption; otherwise each ``__iter__`` takes the next epoch."""

    def __init__(self) -> None:
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch`` (its shuffle and augmentation)."""
        self._next_epoch = int(epoch)

    def _take_epoch(self) -> int:
        epoch = self._next_epoch
        self._next_epoch += 1
        return epoch


class DeviceTrainLoader(_EpochCounter):
    """Shuffled, augmented training batches from images resident on the device.

    ``images`` is (N, C, S + 2p, S + 2p) with p the crop padding when ``augmenter`` is set,
    else (N, C, S, S); in the source's dtype (uint8 or float32).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        normalizer: Normalizer,
        augmenter: BatchAugmenter | None,
        batch_size: int,
        seed: int,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        super().__init__()
        self.images, self.labels = images, labels
        self.normalizer, self.augmenter = normalizer, augmenter
        self.batch_size, self.seed = batch_size, seed
        size = augmenter.size if augmenter is not None else images.shape[-1]
        self.chunk = _images_per_chunk(batch_size, images.shape[1] * size * size, chunk_bytes)

    @property
    def num_samples(self) -> int:
        return self.images.shape[0]

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._take_epoch()
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, STREAM_TRAIN))
        n = len(self) * self.batch_size
        device = self.images.device
        # Every random number of the epoch, drawn on the CPU and copied over once.
        perm = torch.randperm(self.num_samples, generator=g)[:n].to(device)
        params = self.augmenter.draw(n, g).to(device) if self.augmenter is not None else None
        for start in range(0, n, self.chunk):
            stop = min(start + self.chunk, n)
            idx = perm[start:stop]
            if params is not None:
                x = self.augmenter(self.images, idx, params[start:stop])
            else:
                x = self.images[idx]
            x, y = self.normalizer(x), self.labels[idx]
            for s in range(0, stop - start, self.batch_size):
                yield x[s : s + self.batch_size], y[s : s + self.batch_size]


class DeviceEvalLoader:
    """Un-augmented batches in storage order (the last one may be smaller)."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        normalizer: Normalizer,
        batch_size: int,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.images, self.labels, self.normalizer = images, labels, normalizer
        self.batch_size = batch_size
        self.chunk = _images_per_chunk(batch_size, images[0].numel(), chunk_bytes)

    @property
    def num_samples(self) -> int:
        return self.images.shape[0]

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = self.num_samples
        for start in range(0, n, self.chunk):
            stop = min(start + self.chunk, n)
            x, y = self.normalizer(self.images[start:stop]), self.labels[start:stop]
            for s in range(0, stop - start, self.batch_size):
                yield x[s : s + self.batch_size], y[s : s + self.batch_size]


class TensorImageDataset(Dataset):
    """Per-sample access to a split held in host memory, with an optional transform."""

    def __init__(
        self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor] | None
    ) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Batch:
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i]


class _TorchLoaderBase:
    """Moves a DataLoader's (stored-dtype) batches to the device and normalises them there.

    Batches cross the bus in their stored type (uint8: a quarter of float32's bytes) and
    are normalised on the device by the same function as the device loader's, so both
    loaders give bit-identical un-augmented batches.
    """

    loader: DataLoader

    def __init__(self, normalizer: Normalizer, device: torch.device) -> None:
        self.normalizer, self.device = normalizer, device

    def _move(self, batch: Batch) -> Batch:
        x, y = batch
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        return self.normalizer(x), y

    @property
    def num_samples(self) -> int:
        return len(self.loader.dataset)

    def __len__(self) -> int:
        return len(self.loader)


class TorchTrainLoader(_TorchLoaderBase, _EpochCounter):
    """A shuffling, augmenting torch DataLoader (for data that does not fit on the device).

    Reproducibility: the sampler draws from a generator seeded by (seed, epoch). The
    transforms draw from torch's global generator: in worker processes DataLoader seeds it
    from that same generator (so results depend on ``num_workers``); with
    ``num_workers=0`` the transforms run on a private generator state swapped in around each
    batch, so the training loop's own use of the global generator neither disturbs nor is
    disturbed by augmentation.
    """

    def __init__(
        self,
        dataset: TensorImageDataset,
        normalizer: Normalizer,
        batch_size: int,
        num_workers: int,
        seed: int,
        device: torch.device,
    ) -> None:
        _TorchLoaderBase.__init__(self, normalizer, device)
        _EpochCounter.__init__(self)
        self.seed = seed
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True,
            num_workers=num_workers, pin_memory=device.type == "cuda", generator=self.generator,
        )

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._take_epoch()
        self.generator.manual_seed(mix_seed(self.seed, epoch, STREAM_TRAIN))
        if self.loader.num_workers > 0:
            for batch in self.loader:
                yield self._move(batch)
            return
        aug_state = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 2)).get_state()
        it = iter(self.loader)
        while True:
            outer = torch.get_rng_state()
            torch.set_rng_state(aug_state)
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                aug_state = torch.get_rng_state()
                torch.set_rng_state(outer)
            yield self._move(batch)


class TorchEvalLoader(_TorchLoaderBase):
    """Un-augmented batches in storage order through a DataLoader."""

    def __init__(
        self,
        dataset: TensorImageDataset,
        normalizer: Normalizer,
        batch_size: int,
        num_workers: int,
        device: torch.device,
    ) -> None:
        super().__init__(normalizer, device)
        self.loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=False, drop_last=False,
            num_workers=num_workers, pin_memory=device.type == "cuda",
        )

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            yield self._move(batch)
