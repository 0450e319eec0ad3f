"""What Optuna says that a sweep's user need not read.

Heartbeats, the stale-trial retry callback, ``set_metric_names`` and the QMC sampler have
been stable for years but each call warns (``ExperimentalWarning``). One context manager
silences exactly that warning, at the places we call them on purpose.

Optuna logs a trial that ends by Ctrl-C or SIGTERM with its traceback, once per worker; the
worker says the same in one line ("Trial 3 interrupted: recorded FAIL, enqueued again"), so
those tracebacks are dropped (``quiet_interrupted_trials``). Other failures keep theirs.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import optuna


@contextlib.contextmanager
def optuna_experimental() -> Iterator[None]:
    """Within the block, Optuna's ``ExperimentalWarning`` is not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


class _NoInterruptTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


def quiet_interrupted_trials() -> None:
    """Drop Optuna's log records that carry a Ctrl-C/SIGTERM traceback (this process)."""
    root = logging.getLogger("optuna")
    for handler in root.handlers:
        if not any(isinstance(f, _NoInterruptTracebacks) for f in handler.filters):
            handler.addFilter(_NoInterruptTracebacks())
