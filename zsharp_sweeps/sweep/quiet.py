"""What Optuna says that a sweep's user need not read.

Heartbeats, the stale-trial retry callback, ``set_metric_names`` and the QMC sampler have
been stable for years but each call warns (``ExperimentalWarning``). One context manager
silences exactly that warning, at the places we call them on purpose.

Optuna logs every failed trial twice ("Trial 3 failed with parameters ... because of the
following error: ..." with its traceback, then "Trial 3 failed with value None."). The worker
says why in one line ("trial 3 failed: the run diverged: ..."), and logs the traceback itself
where the failure is a bug rather than an outcome (``worker.failure_reason``), so Optuna's
records of failed trials are dropped (``quiet_failed_trials``).
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


class _NoFailedTrialRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            return False
        message = record.msg if isinstance(record.msg, str) else ""
        return not (record.name == "optuna.study._optimize" and message.startswith("Trial ")
                    and " failed with " in message)


def quiet_failed_trials() -> None:
    """Drop Optuna's log records of failed trials (this process): the worker logs each in
    one line, with its reason."""
    root = logging.getLogger("optuna")
    for handler in root.handlers:
        if not any(isinstance(f, _NoFailedTrialRecords) for f in handler.filters):
            handler.addFilter(_NoFailedTrialRecords())
