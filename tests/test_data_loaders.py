"""The loaders: splits, normalisation, seeded determinism, augmentation semantics, and the
device and torch paths agreeing. Mostly on the real (embedded) digits and synthetic data."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from zsharp_sweeps.config import ConfigError, DataConfig
from zsharp_sweeps.data import SPECS, build_data, resize_images, stratified_split
from zsharp_sweeps.data.augment import Cutout, Normalizer

CPU = torch.device("cpu")


def _synthetic(**kw: object) -> DataConfig:
    base = dict(name="synthetic", synthetic_like="cifar10", synthetic_size=300, val_size=40,
                batch_size=32, eval_batch_size=64, crop_padding=4, hflip=True)
    base.update(kw)
    return DataConfig(**base)


def _batches(loader, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(itertools.islice(loader, n))


def _same(a, b) -> bool:
    return all(torch.equal(x, y) and torch.equal(t, u) for (x, t), (y, u) in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def digits() -> object:
    return build_data(DataConfig(name="digits", image_size=16, val_size=200, batch_size=64),
                      CPU, seed=52)


def test_digits_full_dataset_splits(digits) -> None:
    assert (digits.num_train, digits.num_val, digits.num_test) == (1237, 200, 360)
    assert digits.num_train + digits.num_val + digits.num_test == 1797
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 16)
    assert len(digits.train) == 1237 // 64
    assert len(digits.val) == 1 and len(digits.test) == 1
    x, y = next(iter(digits.train))
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sum(b[1].numel() for b in digits.train) == (1237 // 64) * 64  # drop_last
    vy = torch.cat([b[1] for b in digits.val])
    counts = torch.bincount(vy, minlength=10)
    assert int(counts.min()) >= 19 and int(counts.max()) <= 21  # stratified: 20 a class
    ty = torch.cat([b[1] for b in digits.test])
    assert int(torch.bincount(ty, minlength=10).min()) >= 34  # stratified 20 % test split


def test_digits_normalisation_and_resize(digits) -> None:
    x = torch.cat([b[0] for b in digits.test])
    # Values 0..16 map to (v/16 - 0.3053) / 0.3760: range and roughly unit statistics.
    lo, hi = (0 - 0.3053) / 0.3760, (1 - 0.3053) / 0.3760
    assert float(x.min()) >= lo - 1e-5 and float(x.max()) <= hi + 1e-5
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.2


def test_splits_are_disjoint_and_seeded_by_split_seed() -> None:
    labels = torch.arange(1000) % 7
    kept, held = stratified_split(labels, 100, seed=3)
    assert kept.numel() == 900 and held.numel() == 100
    assert torch.equal(torch.sort(torch.cat([kept, held])).values, torch.arange(1000))
    counts = torch.bincount(labels[held], minlength=7)
    assert int(counts.max() - counts.min()) <= 1
    again = stratified_split(labels, 100, seed=3)
    assert torch.equal(held, again[1]) and torch.equal(kept, again[0])
    assert not torch.equal(torch.sort(held).values, torch.sort(stratified_split(labels, 100, 4)[1]).values)


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    a = build_data(_synthetic(), CPU, seed=1)
    b = build_data(_synthetic(), CPU, seed=1)
    c = build_data(_synthetic(), CPU, seed=2)
    first_a, first_b, first_c = _batches(a.train), _batches(b.train), _batches(c.train)
    assert _same(first_a, first_b)
    assert not _same(first_a, first_c)
    # A new epoch reshuffles; set_epoch replays an epoch exactly (resumption).
    second_a = _batches(a.train)
    assert not _same(first_a, second_a)
    a.train.set_epoch(0)
    assert _same(first_a, _batches(a.train))
    # The validation split depends on split_seed only, not on the run seed.
    assert _same(list(a.val), list(c.val))
    d = build_data(_synthetic(split_seed=1), CPU, seed=1)
    assert not _same(list(a.val), list(d.val))


def test_augmentation_is_crop_and_flip_of_the_plain_image() -> None:
    pad = 2
    plain = build_data(_synthetic(augment=False), CPU, seed=5)
    aug = build_data(_synthetic(crop_padding=pad), CPU, seed=5)
    (px, py), (ax, ay) = next(iter(plain.train)), next(iter(aug.train))
    assert torch.equal(py, ay)  # same shuffle, so the same images in the same order
    assert ax.shape == px.shape and ax.dtype == px.dtype
    assert not torch.equal(ax, px)
    # Each augmented image is one of the (2p+1)^2 crops (or their mirror) of the padded
    # plain image; padding is black (0 in pixel units) before normalisation.
    norm = Normalizer(SPECS["cifar10"].mean, SPECS["cifar10"].std, 255.0, CPU)
    zero = norm(torch.zeros(1, 3, 1, 1))
    padded = F.pad(px - zero, (pad, pad, pad, pad)) + zero
    flips = 0
    for p_img, a_img in zip(padded, ax, strict=True):
        crops = [p_img[:, i : i + 32, j : j + 32] for i in range(2 * pad + 1)
                 for j in range(2 * pad + 1)]
        match = [torch.allclose(c, a_img) for c in crops]
        match_flip = [torch.allclose(c.flip(-1), a_img) for c in crops]
        assert any(match) or any(match_flip)
        flips += any(match_flip) and not any(match)
    assert 0 < flips < len(ax)  # flips happen, about half the time


def test_cutout_fills_a_square_with_the_mean() -> None:
    plain = build_data(_synthetic(augment=False), CPU, seed=5)
    cut = build_data(_synthetic(crop_padding=0, hflip=False, cutout=8), CPU, seed=5)
    (px, _), (cx, _) = next(iter(plain.train)), next(iter(cut.train))
    changed = (px != cx).any(dim=1)  # (B, H, W)
    assert changed.any()
    for img, mask in zip(cx, changed, strict=True):
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        if rows.numel():
            assert rows.numel() <= 8 and cols.numel() <= 8
            # Mean colour in uint8 is 0 after normalisation, up to the rounding of the mean.
            assert img[:, mask].abs().max() < 0.01
    # The torch path's per-sample transform has the same meaning.
    img = torch.full((3, 10, 10), 200, dtype=torch.uint8)
    out = Cutout(4, torch.tensor([1, 2, 3], dtype=torch.uint8))(img)
    hole = (out != img).any(dim=0)
    assert 0 < int(hole.sum()) <= 16 and torch.equal(out[:, hole][:, 0], torch.tensor([1, 2, 3],
                                                                               dtype=torch.uint8))


def test_device_and_torch_loaders_agree_on_unaugmented_batches() -> None:
    dev = build_data(_synthetic(cutout=4), CPU, seed=7)
    tor = build_data(_synthetic(cutout=4, loader="torch"), CPU, seed=7)
    assert _same(list(dev.val), list(tor.val))
    assert _same(list(dev.test), list(tor.test))
    assert _same(dev.fixed_batches(2, 16), tor.fixed_batches(2, 16))
    assert len(dev.train) == len(tor.train) == 260 // 32
    (dx, dy), (tx, ty) = next(iter(dev.train)), next(iter(tor.train))
    assert dx.shape == tx.shape and dx.dtype == tx.dtype and dy.dtype == ty.dtype


def test_torch_loader_is_seeded_and_isolated_from_the_global_generator() -> None:
    first = _batches(build_data(_synthetic(loader="torch"), CPU, seed=3).train, 2)
    bundle = build_data(_synthetic(loader="torch"), CPU, seed=3)
    again = []
    for batch in itertools.islice(bundle.train, 2):
        torch.rand(1000)  # the training loop drawing from the global generator
        again.append(batch)
    assert _same(first, again)
    assert not _same(first, _batches(build_data(_synthetic(loader="torch"), CPU, seed=4).train, 2))


def test_fixed_batches_are_fixed_and_unaugmented(digits) -> None:
    a, b = digits.fixed_batches(3, 50), digits.fixed_batches(3, 50)
    assert len(a) == 3 and _same(a, b)
    assert a[0][0].shape == (50, 1, 16, 16)
    # Un-augmented: every value lies on the normalised grid of the stored pixels, and the
    # stored training images include each of them exactly.
    train_all = torch.cat([x for x, _ in digits.fixed_batches(1, digits.num_train)])
    assert train_all.shape[0] == digits.num_train
    flat = {tuple(img.flatten().tolist()) for img in train_all}
    assert all(tuple(img.flatten().tolist()) in flat for img in a[2][0])


@pytest.mark.parametrize("like", sorted(SPECS))
def test_synthetic_shapes(like: str) -> None:
    spec = SPECS[like]
    cfg = DataConfig(name="synthetic", synthetic_like=like, synthetic_size=50, val_size=10,
                     batch_size=8)
    bundle = build_data(cfg, CPU, seed=0)
    x, y = next(iter(bundle.train))
    assert x.shape == (8, spec.in_channels, spec.image_size, spec.image_size)
    assert int(y.max()) < spec.num_classes
    assert (bundle.num_train, bundle.num_val, bundle.num_test) == (40, 10, 10)
    assert bundle.num_classes == spec.num_classes


def test_train_subset_image_size_and_no_val() -> None:
    bundle = build_data(_synthetic(train_subset=100, val_size=0, image_size=24), CPU, seed=0)
    assert bundle.val is None and bundle.num_val == 0 and bundle.num_train == 100
    x, _ = next(iter(bundle.train))
    assert x.shape == (32, 3, 24, 24)
    assert next(iter(bundle.test))[0].shape[-1] == 24


def test_split_sizes_that_do_not_fit_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="data.val_size"):
        build_data(_synthetic(val_size=300), CPU, seed=0)
    with pytest.raises(ConfigError, match="data.batch_size"):
        build_data(_synthetic(train_subset=10), CPU, seed=0)
    with pytest.raises(ConfigError, match="data.name"):
        DataConfig(name="imagenet")


def test_resize_keeps_dtype_and_constant_images() -> None:
    x = torch.full((3, 1, 8, 8), 7, dtype=torch.uint8)
    up, down = resize_images(x, 16), resize_images(torch.full((2, 3, 64, 64), 9.5), 32)
    assert up.shape == (3, 1, 16, 16) and up.dtype == torch.uint8 and bool((up == 7).all())
    assert down.dtype == torch.float32 and torch.allclose(down, torch.full_like(down, 9.5))
