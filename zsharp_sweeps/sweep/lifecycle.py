"""A sweep's workers end when its main process does, however it ends.

Why: joblib's worker processes outlive a SIGKILLed parent, finish their trials and write
COMPLETE runs that nobody tells Optuna about. Each worker therefore runs a watchdog thread
that turns "my parent process is gone" or "the sweep asked me to stop" (a stop file the
main process writes on SIGINT/SIGTERM, which works across hosts on a shared file system
too) into a SIGTERM to itself. The worker acts on it at its next safe point (between training
steps, ``zsharp_sweeps.training.signals.graceful_stop``), so the running trial ends the normal way:
Optuna records it FAIL and enqueues a retry, MLflow records the run KILLED.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from zsharp_sweeps.training.signals import Terminated, stop_pending

log = logging.getLogger(__name__)

POLL_S = 0.5


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (and is no zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class _Watchdog(threading.Thread):
    def __init__(self, stop_file: Path, main_pid: int | None) -> None:
        super().__init__(name="zsharp-sweep-watchdog", daemon=True)
        self.stop_file = stop_file
        self.main_pid = main_pid
        self.finished = threading.Event()

    def run(self) -> None:
        while not self.finished.wait(POLL_S):
            reason = None
            if self.main_pid is not None and not pid_alive(self.main_pid):
                reason = "the sweep's main process is gone"
            elif self.stop_file.exists():
                reason = "the sweep was asked to stop"
            if reason:
                log.warning(f"Worker {os.getpid()} stopping: {reason}")
                if not stop_pending():  # a Ctrl-C may have reached the worker already
                    os.kill(os.getpid(), signal.SIGTERM)
                return


@contextlib.contextmanager
def watchdog(stop_file: str | os.PathLike, main_pid: int, main_host: str | None = None
             ) -> Iterator[None]:
    """Watch for the stop file and, for a worker on the sweep's own host in another
    process, for the death of the sweep's main process (joblib's workers are not always
    its direct children, so the pid is watched, not the parent)."""
    same_host = main_host is None or main_host == socket.gethostname()
    watched = main_pid if same_host and main_pid != os.getpid() and main_pid > 0 else None
    dog = _Watchdog(Path(stop_file), watched)
    dog.start()
    try:
        yield
    finally:
        dog.finished.set()
        dog.join(timeout=2 * POLL_S)


class StopRequest:
    """The main process's SIGINT/SIGTERM handler for the whole sweep. A second signal stops
    at once.

    - **Set-up** (checks, the study, the MLflow parent run: before the workers have their
      jobs): a signal stops the sweep at once, by raising ``KeyboardInterrupt``
      (``Terminated`` for SIGTERM). Python runs a signal handler wherever the main thread
      is, a garbage collector's weakref callback or ``__del__`` included, where an exception
      is printed ("Exception ignored in ...") and dropped: a Ctrl-C 0.3-1.6 s after the
      ``Study ...`` line, while MLflow opened its store, was lost 5 times in 5 and the sweep
      ran all its trials. So the signal is also recorded, and ``launching()`` raises it again
      before any worker gets a job. Inside ``deferred()`` (writes that must not be cut in
      half: the study's creation, the parent run's) the signal is only recorded and raised
      when the block ends.
    - **Workers running** (``launching()``): a signal writes the stop file and lets the
      workers finish their trials' bookkeeping, instead of dying and leaving them to the
      launcher (which kills them without cleanup).
    """

    def __init__(self, stop_file: str | os.PathLike) -> None:
        self.stop_file = Path(stop_file)
        self.signum: int | None = None
        self._launched = False
        self._deferred = 0

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise _interruption(signum)
        self.signum = signum
        name = signal.Signals(signum).name
        if self._launched:
            log.warning(
                f"Received {name}: stopping the workers (their running trials are recorded "
                "FAIL and retried on resume); press Ctrl-C again to abort"
            )
            self.stop_file.parent.mkdir(parents=True, exist_ok=True)
            self.stop_file.touch()
        elif self._deferred:
            log.warning(f"Received {name}: the sweep stops as soon as this step of its set-up "
                        "is recorded (no trial has started); press Ctrl-C again to abort")
        else:
            raise _interruption(signum)

    def check(self) -> None:
        """Before the workers run: raise the signal received so far, if any (its first
        raise may have been swallowed)."""
        if self.signum is not None and not self._launched:
            raise _interruption(self.signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A step of the set-up that a signal must not cut in half: it is acted on after."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
        if not self._deferred:
            self.check()

    @contextlib.contextmanager
    def launching(self) -> Iterator[StopRequest]:
        """The workers start: a signal received during set-up stops the sweep here, before
        any of them has a job; from here on a signal writes the stop file."""
        self.check()
        self._launched = True
        yield self

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self.stop_file.unlink(missing_ok=True)
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            self.stop_file.unlink(missing_ok=True)

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number."""
        return 128 + (self.signum or 0)


def _interruption(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)
