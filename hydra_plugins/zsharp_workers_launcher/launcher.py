"""Start each job (a sweep worker) as a process of its own and wait for all of them.

Why not joblib: its process pool (loky) treats one dead worker as a broken pool. When a
worker is SIGKILLed (out of memory, a lost GPU, ``kill -9``), loky SIGKILLs every other
worker of the host too and the sweep aborts with ``TerminatedWorkerError``; the survivors
get no chance to record their trials. Here every worker is an independent spawned process:
one that dies is reported (its trial is failed by Optuna's heartbeat and retried by the
others), the rest go on. A pool also keeps idle processes after their task; a worker here
is a process that ends with its job. Jobs run exactly as Hydra's own launchers run them
(``run_job``: the job's config, ``.hydra/`` files, logging, the return value).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections.abc import Sequence
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


def _execute(payload: bytes, results: Any) -> None:
    """In the worker process: rebuild Hydra's state, run the job, send back its return."""
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


class WorkersLauncher(Launcher):
    """``hydra/launcher=zsharp_workers``: every job at once, each in its own process."""

    def __init__(self, stop_timeout_s: float = 60.0) -> None:
        self.stop_timeout_s = stop_timeout_s
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.task_function is not None
        setup_globals()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        if len(job_overrides) == 1:  # one worker: in this process (a laptop's quick sweep)
            state = Singleton.get_state()
            try:
                return [_run(initial_job_idx, list(job_overrides[0]), self.hydra_context,
                             self.config, self.task_function)]
            finally:
                Singleton.set_state(state)
        ctx = multiprocessing.get_context("spawn")  # a fresh CUDA context per worker
        results = ctx.SimpleQueue()
        state = Singleton.get_state()
        procs = {}
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            payload = cloudpickle.dumps((idx, list(overrides), self.hydra_context, self.config,
                                         self.task_function, state))
            proc = ctx.Process(target=_execute, args=(payload, results),
                               name=f"zsharp-worker-{idx}")
            proc.start()
            procs[idx] = proc
        returns: dict[int, JobReturn] = {}
        try:
            self._wait(procs, results, returns)
        except KeyboardInterrupt:  # a second Ctrl-C: stop now
            for proc in procs.values():
                if proc.is_alive():
                    proc.kill()
            raise
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
