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
apart. Here a process is started with nothing but a pipe, all of them at once, and gets its
job through the pipe. ``prestart`` starts them before the sweep has a study, so their
imports overlap the sweeper's own set-up.
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
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import cloudpickle
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

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


def _execute(jobs: Connection, results: Any, preload: tuple[str, ...] = ()) -> None:
    """In the worker process: import what the job will need, wait for the job, rebuild
    Hydra's state, run the job, send back its return."""
    for name in preload:  # while the sweeper is still setting up: off the critical path
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    try:
        payload = jobs.recv_bytes()
    except EOFError:  # the sweep ended (or failed) before it needed this worker
        return
    finally:
        jobs.close()
    idx, overrides, hydra_context, config, task_function, singleton_state = cloudpickle.loads(
        payload
    )
    setup_globals()
    Singleton.set_state(singleton_state)
    ret = _run(idx, overrides, hydra_context, config, task_function)
    ret.hydra_cfg = None  # large and not needed by the sweeper
    try:
        blob = cloudpickle.dumps((idx, ret))
    except Exception as exc:  # an unpicklable return value or exception
        ret.return_value = RuntimeError(f"job {idx}: {exc!r}")
        ret.status = JobStatus.FAILED
        blob = cloudpickle.dumps((idx, ret))
    results.put(blob)
    # The result is sent and every run and trial is recorded. multiprocessing still runs its
    # finalizers (semaphores) when this returns; then, as the first exit handler, the process
    # ends without the interpreter's teardown: collecting CUDA tensors only delays the
    # sweep's end, and a library's C++ destructors aborted some workers' exits ("terminate
    # called without an active exception").
    logging.shutdown()
    atexit.register(os._exit, 0)


@dataclass
class _Slot:
    """A started worker process and the pipe its job will come through."""

    proc: multiprocessing.process.BaseProcess
    jobs: Connection


class WorkersLauncher(Launcher):
    """``hydra/launcher=zsharp_workers``: every job at once, each in its own process."""

    def __init__(self, stop_timeout_s: float = 60.0) -> None:
        self.stop_timeout_s = stop_timeout_s
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self._ctx = multiprocessing.get_context("spawn")  # a fresh CUDA context per worker
        self._results = None
        self._idle: list[_Slot] = []

    def prestart(self, n_workers: int, preload: Sequence[str] = ()) -> None:
        """Start ``n_workers`` processes now, each importing the modules in ``preload``;
        ``launch`` hands them their jobs. Those it does not use end when ``discard`` (or this
        process's exit) closes their pipes."""
        while len(self._idle) < n_workers:
            self._idle.append(self._start(tuple(preload)))

    def discard(self) -> None:
        """Let the processes that got no job end."""
        idle, self._idle = self._idle, []
        for slot in idle:
            slot.jobs.close()
        for slot in idle:
            slot.proc.join(timeout=10)

    def _start(self, preload: tuple[str, ...] = ()) -> _Slot:
        if self._results is None:
            self._results = self._ctx.SimpleQueue()
        receive, send = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_execute, args=(receive, self._results, preload),
                                 name="zsharp-worker")
        proc.start()
        receive.close()  # the child holds it now: its death closes the pipe
        return _Slot(proc, send)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

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
        self.prestart(len(job_overrides))
        slots, self._idle = self._idle[: len(job_overrides)], self._idle[len(job_overrides):]
        self.discard()
        state = Singleton.get_state()
        procs = {}
        for offset, (overrides, slot) in enumerate(zip(job_overrides, slots)):
            idx = initial_job_idx + offset
            payload = cloudpickle.dumps((idx, list(overrides), self.hydra_context, self.config,
                                         self.task_function, state))
            with contextlib.suppress(OSError):  # a process that died: reported below
                slot.jobs.send_bytes(payload)
            slot.jobs.close()
            procs[idx] = slot.proc
        returns: dict[int, JobReturn] = {}
        try:
            self._wait(procs, self._results, returns)
        except KeyboardInterrupt:  # a second Ctrl-C: stop now
            for proc in procs.values():
                if proc.is_alive():
                    proc.kill()
            raise
        finally:
            self._results = None  # its semaphores go now, not at the interpreter's exit
        for idx, proc in procs.items():
            if idx not in returns:
                how = (f"killed by {signal.Signals(-proc.exitcode).name}"
                       if proc.exitcode is not None and proc.exitcode < 0
                       else f"exit code {proc.exitcode}")
                ret = JobReturn(overrides=list(job_overrides[idx - initial_job_idx]))
                ret.status = JobStatus.FAILED
                ret.return_value = WorkerDied(f"worker {idx} ended without a result ({how})")
                returns[idx] = ret
        return [returns[idx] for idx in sorted(returns)]

    @staticmethod
    def _wait(procs: dict, results: Any, returns: dict[int, JobReturn]) -> None:
        """Collect results until every process has ended (a dead one sends none)."""
        from multiprocessing.connection import wait

        pending = dict(procs)
        while pending:
            while not results.empty():
                idx, ret = cloudpickle.loads(results.get())
                returns[idx] = ret
            for idx in [i for i, p in pending.items() if not p.is_alive()]:
                pending.pop(idx).join()
            if pending:
                wait([p.sentinel for p in pending.values()], timeout=0.5)
        while not results.empty():
            idx, ret = cloudpickle.loads(results.get())
            returns[idx] = ret
