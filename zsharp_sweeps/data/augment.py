"""Normalisation and augmentation: batched on the device, and per sample for torch's loader.

Both paths share one meaning so that switching ``data.loader`` changes speed, not data:

* Images are stored in their source type (uint8 for photographs, float32 for the 0..16
  scikit-learn digits) and normalised per batch as ``x * (1 / (scale * std)) - mean / std``,
  one fused ``addcmul`` on the device. Storing uint8 needs a quarter of the memory of
  float32 (CIFAR-10's training set: 150 MB instead of 600 MB) and a quarter of the memory
  traffic in the gather, which dominates the cost of a batch.
* Random crop: zero padding of ``crop_padding`` pixels on each side, then a crop at a
  uniform offset in [0, 2 * padding] (torchvision's ``RandomCrop(size, padding, fill=0)``).
* Horizontal flip with probability 1/2.
* Cutout (DeVries & Taylor 2017): a ``cutout`` x ``cutout`` square at a uniformly drawn
  centre (it may be clipped by the border) is filled with the dataset's mean colour, which
  is (up to the uint8 rounding of the mean) 0 after normalisation. It is applied after
  crop and flip.

The device path draws every random number of an epoch at once on the CPU from a generator
seeded by (seed, epoch): the same run gives the same batches on any device, and the hot loop
makes no host round trip. Batch selection, crop and flip are three gathers; cutout is one
``torch.where``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Normalizer", "AugmentParams", "BatchAugmenter", "Cutout", "mix_seed", "fill_value"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (seed, epoch, stream ...), well mixed.

    Why not ``seed + epoch``: neighbouring runs (seed 52 epoch 1, seed 53 epoch 0) would
    then share their shuffles. ``numpy.random.SeedSequence`` hashes the tuple instead.
    """
    state = np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(
        1, dtype=np.uint64
    )
    return int(state[0] >> np.uint64(1))


def fill_value(mean: tuple[float, ...], scale: float, dtype: torch.dtype) -> Tensor:
    """The dataset's mean colour in storage units (rounded for integer storage)."""
    fill = torch.tensor(mean, dtype=torch.float64) * scale
    if not dtype.is_floating_point:
        fill = fill.round()
    return fill.to(dtype)


class Normalizer:
    """Maps stored pixels to normalised float32: ``(x / scale - mean) / std`` per channel."""

    def __init__(
        self, mean: tuple[float, ...], std: tuple[float, ...], scale: float, device: torch.device
    ) -> None:
        m = torch.tensor(mean, dtype=torch.float64)
        s = torch.tensor(std, dtype=torch.float64)
        shape = (1, len(mean), 1, 1)
        self.mul = (1.0 / (scale * s)).to(torch.float32).view(shape).to(device)
        self.add = (-m / s).to(torch.float32).view(shape).to(device)

    def __call__(self, x: Tensor) -> Tensor:
        # One kernel: addcmul promotes uint8 to float32 itself.
        return torch.addcmul(self.add, x, self.mul)


@dataclass
class AugmentParams:
    """Random draws for a run of consecutive positions of an epoch (all shape (n,))."""

    dy: Tensor
    dx: Tensor
    flip: Tensor
    cy: Tensor
    cx: Tensor

    def to(self, device: torch.device) -> AugmentParams:
        # One host-to-device copy for all five fields.
        packed = torch.stack([self.dy, self.dx, self.flip.long(), self.cy, self.cx]).to(device)
        return AugmentParams(packed[0], packed[1], packed[2].bool(), packed[3], packed[4])

    def __getitem__(self, s: slice) -> AugmentParams:
        return AugmentParams(self.dy[s], self.dx[s], self.flip[s], self.cy[s], self.cx[s])


class BatchAugmenter:
    """Random crop (from a pre-padded store), flip and cutout for a whole batch at once.

    The store holds every training image padded once by ``padding`` zeros on each side, so a
    random crop is a gather at per-sample row/column offsets and a flip reverses the column
    index: selection, crop and flip cost three gather kernels and no per-sample Python.
    """

    def __init__(
        self,
        size: int,
        channels: int,
        padding: int,
        hflip: bool,
        cutout: int,
        fill: Tensor,
        device: torch.device,
    ) -> None:
        self.size, self.padding, self.hflip, self.cutout = size, padding, hflip, cutout
        self.arange = torch.arange(size, device=device)
        self.arange_rev = self.arange.flip(0)
        self.fill = fill.to(device).view(1, channels, 1, 1)

    def draw(self, n: int, generator: torch.Generator) -> AugmentParams:
        """Draw the parameters of ``n`` samples on the CPU (cheap, device independent)."""
        span = 2 * self.padding + 1
        dy = torch.randint(0, span, (n,), generator=generator)
        dx = torch.randint(0, span, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5
        cy = torch.randint(0, self.size, (n,), generator=generator)
        cx = torch.randint(0, self.size, (n,), generator=generator)
        if not self.hflip:
            flip = torch.zeros_like(flip)
        return AugmentParams(dy, dx, flip, cy, cx)

    def __call__(self, store: Tensor, idx: Tensor, p: AugmentParams) -> Tensor:
        """Augmented images ``store[idx]`` (B, C, size, size), in the store's dtype."""
        b, s = idx.numel(), self.size
        c, wp = store.shape[1], store.shape[3]
        rows = p.dy[:, None] + self.arange  # (B, S)
        if self.hflip:
            cols = p.dx[:, None] + torch.where(p.flip[:, None], self.arange_rev, self.arange)
        else:
            cols = p.dx[:, None] + self.arange
        # Select the padded images, then gather rows, then columns (expanded indices are
        # views). Measured on an H100 this is 2.7x faster than one 4-index advanced-indexing
        # gather, whose index arithmetic costs more than the uint8 bytes it moves.
        x = store[idx]
        x = torch.gather(x, 2, rows.view(b, 1, s, 1).expand(b, c, s, wp))
        x = torch.gather(x, 3, cols.view(b, 1, 1, s).expand(b, c, s, s))
        if self.cutout > 0:
            top = (p.cy - self.cutout // 2)[:, None]
            left = (p.cx - self.cutout // 2)[:, None]
            in_rows = (self.arange >= top) & (self.arange < top + self.cutout)  # (B, S)
            in_cols = (self.arange >= left) & (self.arange < left + self.cutout)
            mask = in_rows.view(b, 1, s, 1) & in_cols.view(b, 1, 1, s)
            x = torch.where(mask, self.fill, x)
        return x


class Cutout(torch.nn.Module):
    """Per-sample cutout for torch's DataLoader path, with the device path's semantics.

    Draws from torch's global generator like every torchvision transform, so DataLoader
    workers (seeded from the loader's generator) make it reproducible.
    """

    def __init__(self, size: int, fill: Tensor) -> None:
        super().__init__()
        self.size = size
        self.fill = fill.view(-1, 1, 1)

    def forward(self, img: Tensor) -> Tensor:
        h, w = img.shape[-2:]
        cy = int(torch.randint(0, h, (1,)))
        cx = int(torch.randint(0, w, (1,)))
        top, left = max(cy - self.size // 2, 0), max(cx - self.size // 2, 0)
        bottom, right = max(cy - self.size // 2 + self.size, 0), max(cx - self.size // 2 + self.size, 0)
        img = img.clone()
        img[..., top:bottom, left:right] = self.fill.to(img.dtype)
        return img
