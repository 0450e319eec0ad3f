"""Named recipes (conf/experiment/): each composes with every optimizer and keeps its numbers.

Composition only, no training. Why these checks: a recipe merges after the optimizer group,
so a recipe that set rho/eta/sigma/lmbda/percentile would silently change every optimizer's
own value (ASAM's rho 0.5 would become 0.05). The invariant test guards that, and the paper
recipe's numbers (the official ZSharp code's defaults) are pinned one by one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from zsharp_sweeps.config import TrainConfig, register_configs, validate

from .conftest import CONF_DIR

register_configs()

EXPERIMENT_DIR = CONF_DIR / "experiment"

# The optimizer-specific settings that only conf/optimizer/*.yaml may set.
OPTIMIZER_OWN = ("rho", "eta", "sigma", "lmbda", "percentile", "filter", "adaptive")
# The exceptions a recipe is allowed by design: (recipe, setting).
RECIPE_SETS_OWN = {
    ("bangyen_cifar10_resnet18", "percentile"),  # bangyen's Q_p 0.70
    ("sam_direction_cifar100", "rho"),  # the study's rho 0.1 (grid 0.1, 0.2, 0.4)
}

PAPER_PAIRS = {
    "paper_cifar10_resnet20": ("cifar10", "resnet20"),
    "paper_cifar10_resnet56": ("cifar10", "resnet56"),
    "paper_cifar10_vgg16_bn": ("cifar10", "vgg16_bn"),
    "paper_cifar10_vit": ("cifar10", "vit"),
    "paper_cifar100_resnet56": ("cifar100", "resnet56"),
    "paper_cifar100_vit": ("cifar100", "vit"),
    "paper_svhn_resnet20": ("svhn", "resnet20"),
    "paper_tiny_imagenet_vit": ("tiny_imagenet", "vit"),
}
PAPER_RECIPES = ["paper", *PAPER_PAIRS]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


RECIPES = _options("experiment")
OPTIMIZERS = _options("optimizer")


def _compose(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def _cfg(*overrides: str) -> TrainConfig:
    return validate(_compose(overrides))


# Hydra composition costs ~0.3 s; the matrix below composes each (recipe, optimizer) pair once
# and the other tests reuse it (read-only).
@functools.cache
def _recipe(recipe: str, optimizer: str = "zsharp") -> TrainConfig:
    return _cfg(f"optimizer={optimizer}", f"+experiment={recipe}")


@functools.cache
def _bare(optimizer: str) -> TrainConfig:
    return _cfg(f"optimizer={optimizer}")


def test_recipes_and_optimizers_exist() -> None:
    assert set(PAPER_RECIPES) <= set(RECIPES)
    assert {
        "bangyen_cifar10_resnet18",
        "sam_replication_wrn_cifar10",
        "sam_replication_wrn_fashion_mnist",
        "sam_replication_mlp_mnist",
        "sam_direction_cifar100",
    } <= set(RECIPES)
    assert {"zsharp", "sam", "asam", "fsam", "sgd", "adam", "adamw"} <= set(OPTIMIZERS)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_applies_at_the_top_level(recipe: str) -> None:
    """Without ``# @package _global_`` a recipe's keys land under ``experiment.`` (which the
    schema refuses); with it, the recipe moves the config away from the defaults."""
    text = (EXPERIMENT_DIR / f"{recipe}.yaml").read_text()
    assert text.splitlines()[0] == "# @package _global_"
    assert _recipe(recipe) != _bare("zsharp")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_with_every_optimizer(recipe: str, optimizer: str) -> None:
    cfg = _recipe(recipe, optimizer)
    # The command line picks the optimizer, even where the recipe selects one itself.
    assert cfg.optimizer.name == optimizer
    # The recipe leaves the optimizer's own settings alone (except by design).
    bare = _bare(optimizer)
    for setting in OPTIMIZER_OWN:
        if (recipe, setting) in RECIPE_SETS_OWN:
            continue
        assert getattr(cfg.optimizer, setting, None) == getattr(bare.optimizer, setting, None), (
            f"+experiment={recipe} changes optimizer.{setting} of optimizer={optimizer}"
        )


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_paper_recipe_numbers(recipe: str) -> None:
    cfg = _recipe(recipe)
    opt, tr, data = cfg.optimizer, cfg.trainer, cfg.data
    assert opt.name == "zsharp"
    assert opt.base == "adam"
    assert opt.lr == pytest.approx(1e-3)
    assert list(opt.betas) == [0.9, 0.999]
    assert opt.weight_decay == pytest.approx(5e-5)
    assert opt.bn_second_pass == "update"
    assert (tr.scheduler, tr.warmup_epochs, tr.step_size) == ("step", 5, 30)
    assert tr.gamma == pytest.approx(0.75)
    assert tr.epochs == 200
    assert tr.label_smoothing == 0.0
    assert data.batch_size == 256
    assert (data.augment, data.crop_padding, data.cutout) == (True, 4, 0)
    assert cfg.seed == 52
    if recipe in PAPER_PAIRS:
        assert (data.name, cfg.model.name) == PAPER_PAIRS[recipe]
        # Flip as the official code: everywhere except SVHN.
        assert data.hflip == (data.name != "svhn")


def test_paper_recipe_keeps_each_optimizers_own_settings() -> None:
    for order in (
        ["optimizer=asam", "+experiment=paper_cifar10_resnet56"],
        ["+experiment=paper_cifar10_resnet56", "optimizer=asam"],
    ):
        asam = _cfg(*order).optimizer
        assert asam.name == "asam"
        assert asam.rho == pytest.approx(0.5)
        assert asam.eta == pytest.approx(0.01)
        assert asam.base == "adam"
    zsharp = _recipe("paper_cifar10_resnet56", "zsharp").optimizer
    assert zsharp.rho == pytest.approx(0.05)
    assert zsharp.percentile == pytest.approx(0.95)
    assert zsharp.base == "adam"
    fsam = _recipe("paper_cifar10_resnet56", "fsam").optimizer
    assert (fsam.rho, fsam.sigma, fsam.lmbda) == pytest.approx((0.05, 1.0, 0.9))
    sam = _recipe("paper_cifar10_resnet56", "sam").optimizer
    assert sam.rho == pytest.approx(0.05)


def test_paper_recipe_model_and_data_can_be_overridden() -> None:
    cfg = _cfg("+experiment=paper_cifar10_resnet56", "model=vit", "data=cifar100")
    assert (cfg.model.name, cfg.data.name) == ("vit", "cifar100")
    assert cfg.optimizer.lr == pytest.approx(1e-3)


def test_paper_vit_is_the_papers_vit() -> None:
    params = _recipe("paper_cifar10_vit").model.params
    assert (params["patch_size"], params["depth"], params["hidden"]) == (4, 7, 384)
    assert (params["mlp_hidden"], params["heads"], params["dropout"]) == (384, 12, 0.0)
    # 64 px Tiny-ImageNet: the same 8x8 grid of patches as the official --patch 8.
    tiny = _recipe("paper_tiny_imagenet_vit").model.params
    assert tiny["patch_size"] == 8


def test_bangyen_recipe() -> None:
    # No optimizer on the command line: the recipe selects zsharp itself.
    cfg = _cfg("+experiment=bangyen_cifar10_resnet18")
    opt = cfg.optimizer
    assert (opt.name, opt.base) == ("zsharp", "sgd")
    assert (opt.lr, opt.momentum, opt.weight_decay) == pytest.approx((0.01, 0.9, 5e-4))
    assert (opt.rho, opt.percentile) == pytest.approx((0.05, 0.70))
    assert (cfg.model.name, cfg.data.name) == ("resnet18", "cifar10")
    assert (cfg.hardware.device, cfg.hardware.precision) == ("mps", "fp16")
    assert (cfg.data.batch_size, cfg.trainer.epochs, cfg.trainer.scheduler) == (256, 10, "none")
    # Its SGD baseline and a non-Mac machine come from the command line.
    base = _cfg("+experiment=bangyen_cifar10_resnet18", "optimizer=sgd", "hardware=cpu")
    assert (base.optimizer.name, base.optimizer.lr, base.hardware.device) == ("sgd", 0.01, "cpu")


@pytest.mark.parametrize(
    ("recipe", "model", "data", "epochs", "hflip"),
    [
        ("sam_replication_wrn_cifar10", "wrn28_10", "cifar10", 200, True),
        ("sam_replication_wrn_fashion_mnist", "wrn28_10", "fashion_mnist", 100, True),
        ("sam_replication_mlp_mnist", "mlp", "mnist", 100, False),
    ],
)
def test_sam_replication_recipes(
    recipe: str, model: str, data: str, epochs: int, hflip: bool
) -> None:
    cfg = _cfg(f"+experiment={recipe}")  # the recipe selects sam itself
    opt = cfg.optimizer
    assert (opt.name, opt.base) == ("sam", "sgd")
    assert (opt.lr, opt.rho) == pytest.approx((0.05, 0.05))
    assert opt.bn_second_pass == "freeze"
    assert (cfg.model.name, cfg.data.name, cfg.trainer.epochs) == (model, data, epochs)
    assert (cfg.data.batch_size, cfg.data.cutout, cfg.data.hflip) == (128, 16, hflip)
    sgd = _recipe(recipe, "sgd").optimizer
    assert (sgd.name, sgd.lr) == ("sgd", pytest.approx(0.05))


def test_sam_replication_recipe_takes_the_lr_rho_grid() -> None:
    cfg = _cfg("+experiment=sam_replication_mlp_mnist", "+sweep=lr_rho_grid")
    assert (cfg.optimizer.name, cfg.model.name, cfg.data.name) == ("sam", "mlp", "mnist")
    # A grid cell is a command-line override, which wins over the recipe.
    cell = _cfg("+experiment=sam_replication_mlp_mnist", "optimizer.lr=0.2", "optimizer.rho=0.01")
    assert (cell.optimizer.lr, cell.optimizer.rho) == pytest.approx((0.2, 0.01))


@pytest.mark.parametrize("optimizer", ["sam", "sam_magnitude", "sam_direction", "sgd"])
def test_sam_direction_recipe(optimizer: str) -> None:
    cfg = _recipe("sam_direction_cifar100", optimizer)
    opt = cfg.optimizer
    assert (opt.name, opt.base_name) == (optimizer, "sgd")
    assert (opt.lr, opt.momentum, opt.weight_decay) == pytest.approx((0.1, 0.9, 1e-3))
    assert getattr(opt, "rho", 0.1) == pytest.approx(0.1)  # plain SGD has no rho
    assert (cfg.model.name, cfg.data.name) == ("resnet18", "cifar100")
    assert (cfg.data.batch_size, cfg.trainer.epochs, cfg.trainer.scheduler) == (256, 200, "cosine")
