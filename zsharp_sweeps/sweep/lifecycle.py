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

from zsharp_sweeps.training.signals import stop_pending

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
    """The main process's SIGINT/SIGTERM handler while workers run: write the stop file and
    let the workers finish their trials' bookkeeping, instead of dying and leaving them to
    the launcher (which kills them without cleanup). A second signal stops at once."""

    def __init__(self, stop_file: str | os.PathLike) -> None:
        self.stop_file = Path(stop_file)
        self.signum: int | None = None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            f"Received {signal.Signals(signum).name}: stopping the workers (their running "
            "trials are recorded FAIL and retried on resume); press Ctrl-C again to abort"
        )
        self.stop_file.parent.mkdir(parents=True, exist_ok=True)
        self.stop_file.touch()

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
