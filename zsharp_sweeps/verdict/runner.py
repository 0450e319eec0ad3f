"""Run a verdict's sweeps: each arm's tuning, then (as soon as it is done) its retraining,
several sweeps at once, each a ``zsharp_sweeps.train --multirun`` process of its own.

Why processes and a scheduler rather than one sweep: every stage is a complete, resumable
sweep (its workers, retries and MLflow runs), and pipelining arms keeps the GPUs busy: an
arm whose tuning ended starts its final runs while the others still tune.

Faults: SIGTERM or Ctrl-C is passed once to every running sweep (each ends its trials
FAIL-for-retry and its runs KILLED), the verdict's MLflow run ends KILLED and the exit
status is 128 + the signal. If this process is killed outright, its sweeps get SIGTERM from
the kernel (``PR_SET_PDEATHSIG``). A rerun continues every stage where it stopped and never
repeats a finished trial: the stages' studies are the record of what is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from zsharp_sweeps.config import ConfigError
from zsharp_sweeps.sweep.records import StudyStore
from zsharp_sweeps.verdict.plan import Stage

log = logging.getLogger(__name__)

POLL_S = 1.0


class StageFailed(RuntimeError):
    """A stage's sweep ended with an error (not a stop the verdict asked for)."""


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the verdict's process dies (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Running:
    stage: Stage
    process: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.monotonic)
    device_s: float = 0.0


@dataclass
class Scheduler:
    """Starts stages as places free up (at most ``concurrent``), shares device time among
    the running ones, and stops them all on a signal."""

    state: StudyStore
    concurrent: int
    n_devices: int
    extra_overrides: list[str]
    running: list[Running] = field(default_factory=list)
    signum: int | None = None
    busy_s: float = 0.0

    def start(self, stage: Stage) -> None:
        Path(stage.sweep_dir).mkdir(parents=True, exist_ok=True)
        log_path = Path(stage.sweep_dir) / "sweep.log"
        command = stage.command(sys.executable) + self.extra_overrides
        (Path(stage.sweep_dir) / "command.txt").write_text(
            " ".join(_quote(c) for c in command[1:]) + "\n")
        handle = open(log_path, "a")  # noqa: SIM115 (closed when the process ends)
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        handle.close()
        self.running.append(Running(stage, process, log_path))
        log.info(f"{stage.key}: started ({stage.n_trials} trials, log {log_path})")

    def has_room(self) -> bool:
        return self.signum is None and len(self.running) < self.concurrent

    def tick(self, dt: float) -> list[tuple[Running, int]]:
        """Account ``dt`` seconds of device time to the running stages; returns those that
        ended, with their exit status."""
        if self.running:
            self.busy_s += dt
            share = dt * self.n_devices / len(self.running)
            for r in self.running:
                r.device_s += share
        ended = [(r, r.process.poll()) for r in self.running]
        ended = [(r, code) for r, code in ended if code is not None]
        for r, _ in ended:
            self.running.remove(r)
            self.record(r)
        return ended

    def record(self, r: Running) -> None:
        self.state.add(f"device_s.{r.stage.key}", r.device_s)
        self.state.add(f"wall_s.{r.stage.key}", time.monotonic() - r.started)
        r.device_s = 0.0

    def stop(self, signum: int) -> None:
        """Pass the signal to every running sweep (once per signal received)."""
        self.signum = signum
        for r in self.running:
            with contextlib.suppress(ProcessLookupError):
                r.process.send_signal(signum)

    def wait_all(self, timeout_s: float = 600.0) -> None:
        """Wait for the running sweeps to end after a stop; record their time."""
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while self.running and time.monotonic() < deadline:
            time.sleep(0.2)
            now = time.monotonic()
            self.tick(now - last)
            last = now
        for r in list(self.running):  # did not stop in time: end it (its trials are retried)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(r.process.pid, signal.SIGKILL)
            r.process.wait()
            self.running.remove(r)
            self.record(r)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def last_error(log_path: Path) -> str:
    """The sweep's own one-line error if it printed one, else its last lines."""
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1][len("error: "):]
    return " | ".join(lines[-3:])


def check_ended(r: Running, code: int, state: StudyStore) -> None:
    """A sweep that ended on its own must have finished its study."""
    stage = r.stage
    if code == 2:
        raise ConfigError(f"{stage.key}: {last_error(r.log_path)} (log: {r.log_path})")
    if code != 0:
        raise StageFailed(f"stage {stage.key} failed (exit {code}): "
                          f"{last_error(r.log_path)} (log: {r.log_path})")
    if not state.done(stage.study_name, stage.n_trials):
        raise StageFailed(f"stage {stage.key} ended with its study unfinished "
                          f"({state.progress(stage.study_name).finished}/{stage.n_trials}): "
                          f"see {r.log_path}")


@contextlib.contextmanager
def forwarded_signals(scheduler: Scheduler) -> Iterator[None]:
    """SIGINT and SIGTERM stop the scheduler (and are passed to the running sweeps) instead
    of raising here, so the verdict records its state before it exits."""
    previous = {}

    def handler(signum: int, _frame: object) -> None:
        scheduler.stop(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
