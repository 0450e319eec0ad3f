"""One way to refuse a value, and the names every registry is checked against.

Why here, in the leaf: the schema (``optimizer.percentile=70`` must fail before data is
loaded), the optimizers' constructors (users build ``ZSharp(params, SGD, percentile=...)``
directly) and the model constructors check the same values, so they share these functions
and the allowed ranges and messages cannot drift apart. ``setting`` is the name the user
typed (``percentile`` in Python, ``optimizer.percentile`` in a config), ``error`` the
exception class the caller raises. Nothing here imports the rest of the package.
"""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A config value is out of its allowed range; the message names the setting."""


def invalid(setting: str, value: Any, allowed: str, hint: str = "") -> str:
    """``setting=value is invalid: allowed ...`` (+ a hint): every refusal reads the same."""
    message = f"{setting}={value!r} is invalid: allowed {allowed}."
    return f"{message} {hint}" if hint else message


def check(ok: bool, setting: str, value: Any, allowed: str, hint: str = "",
          error: type[ValueError] = ConfigError) -> None:
    """Raise ``error`` with :func:`invalid`'s message unless ``ok``."""
    if not ok:
        raise error(invalid(setting, value, allowed, hint))


def check_one_of(value: Any, options: tuple[str, ...], setting: str,
                 error: type[ValueError] = ConfigError) -> None:
    """``value`` must be one of ``options``."""
    check(value in options, setting, value, "one of " + ", ".join(options), error=error)


# ----- the names registries are checked against ------------------------------------------
#: Datasets with a table entry (zsharp_sweeps/data/specs.py: SPECS); ``synthetic`` imitates any.
DATASETS = ("cifar10", "cifar100", "svhn", "tiny_imagenet", "fashion_mnist", "mnist", "digits")
#: Models registered in zsharp_sweeps/models (``@register_model``).
MODELS = ("mlp", "resnet18", "resnet20", "resnet56", "resnet110", "vgg16_bn", "vgg19_bn", "vit",
          "wrn28_10")
#: Torch optimizers: each an optimizer of its own, and the base of any SAM-family one.
BASE_OPTIMIZERS = ("sgd", "adamw", "adam")
#: ZSharp's filters: the method and its two same-count controls.
FILTERS = ("zscore", "magnitude", "random")
#: How ZSharp runs its z-score filter ("auto": the multi-tensor "fused" kernels on CUDA float32;
#: "triton": the earlier per-pass kernels; "torch": plain PyTorch ops). Same kept set in all.
KERNELS = ("auto", "torch", "triton", "fused")
#: How ZSharp finds the per-tensor order statistic (all give identical results; the methods
#: of zsharp_sweeps/optim/threshold.py).
THRESHOLD_METHODS = ("auto", "radix", "bisect", "kthvalue")


# ----- the optimizers' own ranges ----------------------------------------------------------
def check_rho(rho: float, setting: str = "rho", error: type[ValueError] = ValueError) -> None:
    """SAM's radius: a finite value >= 0 (0 turns the ascent off)."""
    check(rho >= 0 and math.isfinite(rho), setting, rho, "a finite value >= 0", error=error)


def check_percentile(
    percentile: float, setting: str = "percentile", error: type[ValueError] = ValueError
) -> None:
    """Q_p must be a fraction in [0, 1); a value like 70 almost surely meant 0.70."""
    hint = (f"Did you mean {percentile / 100:g}? Q_p is a fraction, not a percent."
            if 1 <= percentile <= 100 else "")
    check(0 <= percentile < 1, setting, percentile,
          "a fraction in [0, 1) (0.95 keeps the top 5% of entries by |z|)", hint, error)


def check_stats_streams(
    streams: int, setting: str = "stats_streams", error: type[ValueError] = ValueError
) -> None:
    """ZSharp's CUDA side streams for per-tensor statistics: an integer >= 0 (0 = none)."""
    check(not isinstance(streams, bool) and isinstance(streams, int) and streams >= 0,
          setting, streams, "an integer >= 0 (0: the current stream only)", error=error)
