"""Range checks of the optimizers' settings, shared by the constructors and the config schema.

Why one place: users build the optimizers directly (``ZSharp(params, SGD, percentile=...)``),
so the constructors must check their arguments; the Hydra schema checks the same values
before any work starts (``optimizer.percentile=70`` must fail before data is loaded). Both
call these functions, so the allowed ranges and the messages cannot drift apart. The
``setting`` argument is the name the user typed (``percentile`` in Python,
``optimizer.percentile`` in a config), ``error`` the exception class the caller raises.
"""

from __future__ import annotations

import math
from typing import Any

from zsharp_sweeps.optim.threshold import METHODS

#: ZSharp's filters: the method and its two same-count controls.
FILTERS = ("zscore", "magnitude", "random")
#: How ZSharp runs its z-score filter ("auto": the multi-tensor "fused" kernels on CUDA float32;
#: "triton": the earlier per-pass kernels; "torch": plain PyTorch ops). Same kept set in all.
KERNELS = ("auto", "torch", "triton", "fused")
#: How ZSharp finds the per-tensor order statistic (all give identical results).
THRESHOLD_METHODS = METHODS


def _fail(setting: str, value: Any, allowed: str, hint: str, error: type[ValueError]) -> None:
    msg = f"{setting}={value!r} is invalid: allowed {allowed}."
    raise error(f"{msg} {hint}" if hint else msg)


def check_rho(rho: float, setting: str = "rho", error: type[ValueError] = ValueError) -> None:
    """SAM's radius: a finite value >= 0 (0 turns the ascent off)."""
    if not (rho >= 0 and math.isfinite(rho)):
        _fail(setting, rho, "a finite value >= 0", "", error)


def check_percentile(
    percentile: float, setting: str = "percentile", error: type[ValueError] = ValueError
) -> None:
    """Q_p must be a fraction in [0, 1); a value like 70 almost surely meant 0.70."""
    if not 0 <= percentile < 1:
        hint = (
            f"Did you mean {percentile / 100:g}? Q_p is a fraction, not a percent."
            if 1 <= percentile <= 100
            else ""
        )
        _fail(
            setting, percentile, "a fraction in [0, 1) (0.95 keeps the top 5% of entries by |z|)",
            hint, error,
        )


def check_one_of(
    value: str, options: tuple[str, ...], setting: str, error: type[ValueError] = ValueError
) -> None:
    """``value`` must be one of ``options``."""
    if value not in options:
        _fail(setting, value, "one of " + ", ".join(options), "", error)


def check_stats_streams(
    streams: int, setting: str = "stats_streams", error: type[ValueError] = ValueError
) -> None:
    """ZSharp's CUDA side streams for per-tensor statistics: an integer >= 0 (0 = none)."""
    if isinstance(streams, bool) or not isinstance(streams, int) or streams < 0:
        _fail(setting, streams, "an integer >= 0 (0: the current stream only)", "", error)
