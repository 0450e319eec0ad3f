"""The optimizers' range checks, shared with the config schema.

Why one place: users build the optimizers directly (``ZSharp(params, SGD, percentile=...)``),
so the constructors must check their arguments; the Hydra schema checks the same values
before any work starts (``optimizer.percentile=70`` must fail before data is loaded). Both
use ``zsharp_sweeps/config/checks.py`` (the leaf that owns the names and messages); here the
constructors' defaults: the name as typed in Python, ``ValueError``.
"""

from __future__ import annotations

from typing import Any

from zsharp_sweeps.config import checks as _checks
from zsharp_sweeps.config.checks import (
    FILTERS,
    KERNELS,
    THRESHOLD_METHODS,
    check_percentile,
    check_rho,
    check_stats_streams,
)
from zsharp_sweeps.optim.threshold import METHODS

if METHODS != THRESHOLD_METHODS:  # the schema names the methods threshold.py implements
    raise ImportError(f"zsharp_sweeps/config/checks.py THRESHOLD_METHODS={THRESHOLD_METHODS} "
                      f"but zsharp_sweeps/optim/threshold.py implements {METHODS}")

__all__ = ["FILTERS", "KERNELS", "THRESHOLD_METHODS", "check_one_of", "check_percentile",
           "check_rho", "check_stats_streams"]


def check_one_of(
    value: Any, options: tuple[str, ...], setting: str, error: type[ValueError] = ValueError
) -> None:
    """``value`` must be one of ``options``."""
    _checks.check_one_of(value, options, setting, error)
