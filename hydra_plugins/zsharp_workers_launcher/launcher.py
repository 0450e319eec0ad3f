"""Start each job (a sweep worker) as a process of its own and wait for all of them.

Why not joblib: its process pool (loky) treats one dead worker as a broken pool. When a
worker is SIGKILLed (out of memory, a lost GPU, ``kill -9``), loky SIGKILLs every other
worker of the host too and the sweep aborts with ``TerminatedWorkerError``; the survivors
get no chance to record their trials. Here every worker is an independent spawned process:
one that dies is reported (its trial is failed by Optuna's heartbeat and retried by the
others), the rest go on. A pool also keeps idle processes after their task; a worker here
is a process that ends with its job. Jobs run exactly as Hydra's own launchers run them
(``run_job``: the job's config, ``.hydra/`` files, logging, the return value).

Start-up, measured on a 2-GPU host (docs/benchmarks.md): a spawned process imports the
sweep's main module (torch, Hydra, ...) before it reads its arguments, and the parent's
write of arguments larger than a pipe's buffer waits for that read, so workers whose job
(config, Hydra's state, the plan) travelled as arguments started one after another, 4-5 s
apart. Here a process starts with nothing but its two pipes (job in, result out), all of
them at once, and gets its job through the pipe. ``prestart`` starts them before the sweep
has a study: forked where that is safe (``fork_is_safe``: torch and the project are then
imported already), spawned otherwise, importing what the job needs while the sweeper sets
up, and running the sweeper's ``warm`` hook (this project's: start CUDA on the card the job
will name, ``zsharp_sweeps.sweep.placement.prepin``).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import cloudpickle
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from zsharp_sweeps.sweep.protocols import PrestartingLauncher

log = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    """A worker process ended without returning (killed by a signal, or crashed)."""


def _run(idx: int, overrides: list[str], hydra_context: HydraContext, config: DictConfig,
         task_function: TaskFunction) -> JobReturn:
    """One job, as Hydra's own launchers run it."""
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    return run_job(hydra_context=hydra_context, task_function=task_function,
                   config=sweep_config, job_dir_key="hydra.sweep.dir",
                   job_subdir_key="hydra.sweep.subdir")


def _execute(jobs: Connection, results: Connection, preload: tuple[str, ...] = (),
             inherited: tuple[Connection, ...] = (),
             warm: Callable[[int], None] | None = None, slot: int = 0) -> None:
    """In the worker process: import what the job will need, run ``warm(slot)``, wait for
    the job, rebuild Hydra's state, run the job, send back its return. ``inherited``: the
    launcher's ends of every worker's pipes, which a forked child holds copies of; closed
    here, or no worker would see its job pipe close when the sweep no longer needs it."""
    for conn in inherited:
        conn.close()
    # A forked worker inherits the sweep's own signal handlers (its set-up's StopRequest):
    # until its job installs its own, a worker has Python's, as a spawned one does.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        for name in preload:  # while the sweeper is still setting up: off the critical path
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        if warm is not None:
            try:
                warm(slot)
            except Exception as exc:  # a warm-up is an optimisation: the job still runs
                log.warning(f"worker process {os.getpid()}: warm-up before its job failed "
                            f"({type(exc).__name__}: {exc})")
        payload = jobs.recv_bytes()
    except EOFError:  # the sweep ended (or failed) before it needed this worker
        return
    except KeyboardInterrupt:  # Ctrl-C before the job came: the sweep's process handles it
        return
    finally:
        jobs.close()
    idx, overrides, hydra_context, config, task_function, singleton_state = cloudpickle.loads(
        payload
    )
    setup_globals()
    Singleton.set_state(singleton_state)
    ret = _run(idx, overrides, hydra_context, config, task_function)
    try:
        blob = cloudpickle.dumps((idx, ret))
    except Exception as exc:  # an unpicklable return value or exception
        ret.return_value = RuntimeError(f"job {idx}: {exc!r}")
        ret.status = JobStatus.FAILED
        blob = cloudpickle.dumps((idx, ret))
    results.send_bytes(blob)
    results.close()
    # The result is sent and every run and trial is recorded. multiprocessing still runs its
    # finalizers (semaphores) when this returns; then, as the first exit handler, a spawned
    # process ends without the interpreter's teardown: collecting CUDA tensors only delays
    # the sweep's end, and a library's C++ destructors aborted some workers' exits
    # ("terminate called without an active exception"). A forked one ends so anyway.
    logging.shutdown()
    atexit.register(os._exit, 0)


def fork_is_safe() -> bool:
    """Whether a worker may be forked from this process now: Linux (macOS's system libraries
    do not survive a fork), one thread, and CUDA not started (a forked child cannot use
    it). A forked worker starts in milliseconds with torch and the project already
    imported; a spawned one imports them again (seconds: 3-6 s on the GPU hosts measured)."""
    if not sys.platform.startswith("linux") or threading.active_count() > 1:
        return False
    torch = sys.modules.get("torch")
    return torch is None or not torch.cuda.is_initialized()


START_METHODS = ("auto", "fork", "spawn")


@dataclass
class _Slot:
    """A started worker process, the pipe its job will come through and the one its result
    goes back through."""

    proc: multiprocessing.process.BaseProcess
    jobs: Connection
    results: Connection


class WorkersLauncher(Launcher, PrestartingLauncher):
    """``hydra/launcher=zsharp_workers``: every job at once, each in its own process; its
    processes can start before their jobs exist (``PrestartingLauncher``)."""

    def __init__(self, start_method: str = "auto") -> None:
        if start_method not in START_METHODS:
            raise ValueError(
                f"hydra.launcher.start_method={start_method!r}: allowed {', '.join(START_METHODS)}"
            )
        self.start_method = start_method
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self._idle: list[_Slot] = []
        self._preload: tuple[str, ...] = ()
        self._warm: Callable[[int], None] | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def prestart(self, n_workers: int, preload: Sequence[str] = (),
                 warm: Callable[[int], None] | None = None) -> None:
        """Start ``n_workers`` processes now, each importing the modules in ``preload`` and
        then calling ``warm(i)``, i its place in the start order; ``launch`` hands the i-th
        of them its i-th job. Those it does not use end when ``discard`` (or this process's
        exit) closes their pipes."""
        self._preload, self._warm = tuple(preload), warm
        self._fill(n_workers)

    def _fill(self, n_workers: int) -> None:
        """Start processes (with the last ``prestart``'s preload and warm-up) until
        ``n_workers`` wait for a job; the i-th of them warms up as ``warm(i)``."""
        while len(self._idle) < n_workers:
            self._idle.append(self._start(len(self._idle)))

    def discard(self) -> None:
        """Let the processes that got no job end."""
        idle, self._idle = self._idle, []
        for slot in idle:
            slot.jobs.close()
        for slot in idle:
            slot.proc.join(timeout=10)
            slot.results.close()

    def _start(self, slot: int) -> _Slot:
        # Each process has its own pipes, so forked and spawned workers can mix (a queue
        # shared between them could not).
        fork = self.start_method == "fork" or (self.start_method == "auto" and fork_is_safe())
        ctx = multiprocessing.get_context("fork" if fork else "spawn")
        job_out, job_in = ctx.Pipe(duplex=False)
        result_out, result_in = ctx.Pipe(duplex=False)
        inherited = ((job_in, result_out, *(c for s in self._idle for c in (s.jobs, s.results)))
                     if fork else ())
        proc = ctx.Process(target=_execute, args=(job_out, result_in, self._preload, inherited,
                                                  self._warm, slot),
                           name="zsharp-worker")
        proc.start()
        log.debug(f"worker process {proc.pid} {'forked' if fork else 'spawned'}")
        job_out.close()  # the child holds these now: its death closes the pipes
        result_in.close()
        return _Slot(proc, job_in, result_out)

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.task_function is not None
        setup_globals()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        if len(job_overrides) == 1:  # one worker: in this process (a laptop's quick sweep)
            self.discard()
            state = Singleton.get_state()
            try:
                return [_run(initial_job_idx, list(job_overrides[0]), self.hydra_context,
                             self.config, self.task_function)]
            finally:
                Singleton.set_state(state)
        self._fill(len(job_overrides))
        slots, self._idle = self._idle[: len(job_overrides)], self._idle[len(job_overrides):]
        self.discard()
        state = Singleton.get_state()
        pending: dict[int, _Slot] = {}
        for offset, (overrides, slot) in enumerate(zip(job_overrides, slots)):
            idx = initial_job_idx + offset
            payload = cloudpickle.dumps((idx, list(overrides), self.hydra_context, self.config,
                                         self.task_function, state))
            with contextlib.suppress(OSError):  # a process that died: reported below
                slot.jobs.send_bytes(payload)
            slot.jobs.close()
            pending[idx] = slot
        returns: dict[int, JobReturn] = {}
        try:
            self._wait(pending, returns)
        except KeyboardInterrupt:  # a second Ctrl-C: stop now
            for slot in pending.values():
                if slot.proc.is_alive():
                    slot.proc.kill()
            raise
        for idx, slot in pending.items():
            slot.results.close()
            if idx not in returns:
                code = slot.proc.exitcode
                how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
                       else f"exit code {code}")
                ret = JobReturn(overrides=list(job_overrides[idx - initial_job_idx]))
                ret.status = JobStatus.FAILED
                ret.return_value = WorkerDied(f"worker {idx} ended without a result ({how})")
                returns[idx] = ret
        return [returns[idx] for idx in sorted(returns)]

    @staticmethod
    def _wait(slots: dict[int, _Slot], returns: dict[int, JobReturn]) -> None:
        """Collect each worker's result; a worker that dies closes its result pipe unsent
        (only it holds the writing end), so every pipe ends in a result or EOF."""
        from multiprocessing.connection import wait

        pending = {slot.results: idx for idx, slot in slots.items()}
        while pending:
            for conn in wait(list(pending)):
                idx = pending.pop(conn)
                with contextlib.suppress(EOFError):
                    _, returns[idx] = cloudpickle.loads(conn.recv_bytes())
        for slot in slots.values():
            slot.proc.join()
