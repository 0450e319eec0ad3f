"""Optuna's public APIs the sweep relies on that Optuna still marks experimental.

Heartbeats, the stale-trial retry callback, ``set_metric_names`` and the QMC sampler have
been stable for years but each call warns (``ExperimentalWarning``). One context manager
silences exactly that warning, at the places we call them on purpose.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import optuna


@contextlib.contextmanager
def optuna_experimental() -> Iterator[None]:
    """Within the block, Optuna's ``ExperimentalWarning`` is not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
