"""SIGTERM as an exception, so that a killed run ends KILLED instead of RUNNING forever.

Why: ``kill``, SLURM (at the time limit, on ``scancel``) and ``docker stop`` send SIGTERM,
whose default action ends the process at once: no ``finally`` runs, so the MLflow run stays
RUNNING and the Optuna trial too. Ctrl-C (SIGINT) already raises ``KeyboardInterrupt``;
turning SIGTERM into :class:`Terminated`, a ``KeyboardInterrupt`` subclass, lets every
handler written for Ctrl-C (``Tracker.run`` ends the run KILLED, the sweeper fails the
trial) handle a termination as well, with no second code path.

Python delivers signals to the main thread only, so the context manager does nothing in
other threads: there the process's own handler decides.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["Terminated", "sigterm_as_interrupt", "exit_code"]


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (or another signal it was asked to turn into this)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.signum = int(signum)
        super().__init__(f"received {signal.Signals(signum).name}")


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread.

    The previous handler is restored on exit, also when the block raises. Off the main
    thread this is a no-op (``signal.signal`` may only be called from the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        # None: the old handler was not installed from Python; the default is the closest.
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def exit_code(exc: KeyboardInterrupt) -> int:
    """The shell's exit status for a process ended by this interruption: 128 + the signal
    number (143 for SIGTERM, 130 for Ctrl-C), what schedulers and shells expect."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else int(signal.SIGINT))
