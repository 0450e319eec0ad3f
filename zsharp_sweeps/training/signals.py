"""SIGTERM as an exception, so that a killed run ends KILLED instead of RUNNING forever.

Why: ``kill``, SLURM (at the time limit, on ``scancel``) and ``docker stop`` send SIGTERM,
whose default action ends the process at once: no ``finally`` runs, so the MLflow run stays
RUNNING and the Optuna trial too. Ctrl-C (SIGINT) already raises ``KeyboardInterrupt``;
turning SIGTERM into :class:`Terminated`, a ``KeyboardInterrupt`` subclass, lets every
handler written for Ctrl-C (``Tracker.run`` ends the run KILLED, the sweeper fails the
trial) handle a termination as well, with no second code path. Inside ``graceful_stop``
either signal is acted on at the next ``check_stop()`` (between training steps), never in
the middle of a database write.

Python delivers signals to the main thread only, so the context manager does nothing in
other threads: there the process's own handler decides.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = [
    "Stopped", "Terminated", "check_stop", "exit_code", "graceful_stop", "stop_pending",
]


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (or another signal it was asked to turn into this)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.signum = int(signum)
        super().__init__(f"received {signal.Signals(signum).name}")


class Stopped(Terminated):
    """A command stopped by ``signum`` after recording everything; ``str()`` is the one line
    it says (the command-line edge prints it and exits 128 + ``signum``)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(signum)
        self.args = (message,)


#: The signal a ``graceful_stop`` block received and has not acted on yet.
_pending: int | None = None
#: How many ``graceful_stop`` blocks are open (nested ones leave the outer one in charge).
_depth = 0


def _interruption(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _defer(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _pending is not None:  # a second signal: stop now, wherever we are
        raise _interruption(signum)
    _pending = signum


def stop_pending() -> bool:
    """Whether a ``graceful_stop`` block holds a signal it has not acted on yet."""
    return _pending is not None


def check_stop() -> None:
    """Raise the interruption a ``graceful_stop`` block received, if any. Called at points
    where stopping is safe: between training steps, after an epoch, between trials."""
    if _pending is not None:
        raise _interruption(_pending)


@contextlib.contextmanager
def graceful_stop() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM are acted on at the next ``check_stop()``.

    Why, for sweep workers: an exception raised at an arbitrary point can land inside an
    MLflow or Optuna database write, and SQLAlchemy then leaves that connection inside its
    transaction: the SQLite file stays locked and the run's and trial's final states can
    no longer be written (seen as "database is locked" until the test timed out). The
    training loop checks between steps, so a stop takes effect within one step; a second
    signal stops at once. Off the main thread this is a no-op.
    """
    global _pending, _depth
    if threading.current_thread() is not threading.main_thread() or _depth:
        # Off the main thread, or inside another block (a sweep worker runs each trial's
        # task, which opens its own): the outer block's handlers and pending signal stay.
        yield
        return
    previous = {s: signal.signal(s, _defer) for s in (signal.SIGINT, signal.SIGTERM)}
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _pending = None


def exit_code(exc: KeyboardInterrupt) -> int:
    """The shell's exit status for a process ended by this interruption: 128 + the signal
    number (143 for SIGTERM, 130 for Ctrl-C), what schedulers and shells expect."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else int(signal.SIGINT))
