"""Sweep workers: long-lived processes that pull trials from the shared Optuna storage.

The sweeper (``hydra_plugins/zsharp_optuna_sweeper``) starts W workers through Hydra's
launcher (``zsharp_workers`` on one host, submitit on SLURM, joblib still works); the same
command on another host adds workers to the same study. Each worker is pinned to one device
for its life (``placement``: in a process of its own it sees only that GPU) and loops: ask
the study for a trial (``study.optimize(n_trials=1)``: Optuna's heartbeat, stale-trial check
and tell come with it), run the task function Hydra gave the sweeper as a Hydra job composed
with the trial's overrides (``run_job``, as Hydra's own launchers run jobs: the trial's
folder, ``.hydra/`` files, working directory, callbacks), and tell Optuna what it returned.
A free worker asks at once, so a short (pruned) trial never waits for a long one. Data on the
device, the CUDA context, cuDNN plans and compiled kernels stay warm between trials.

What a trial of this project's training needs beyond its config (device, names, the parent
MLflow run, the pruning reporter, warm data, checkpoints to resume) goes to the task
function in a ``RunContext`` made current around it; any other task function ignores it.
Lifecycle: see ``lifecycle`` (workers end with the sweep) and ``progress`` (which trials
count toward ``n_trials``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobStatus, run_job
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from zsharp_sweeps.config import ConfigError
from zsharp_sweeps.sweep.lifecycle import watchdog
from zsharp_sweeps.sweep.plan import HostPlan, StudyPlan
from zsharp_sweeps.sweep.progress import (
    FAIL_REASON_ATTR,
    INTERRUPTED_ATTR,
    REJECTED_ATTR,
    SURPLUS_ATTR,
    is_surplus,
    progress,
    retried_from,
)
from zsharp_sweeps.sweep.quiet import optuna_experimental, quiet_failed_trials
from zsharp_sweeps.sweep.records import record_results
from zsharp_sweeps.sweep.sampling import TrialSeededSampler, override_value, suggest
from zsharp_sweeps.sweep.storage import open_storage
from zsharp_sweeps.sweep.trial import TrialReporter
from zsharp_sweeps.training.context import DataCache, RunContext, use_context
from zsharp_sweeps.training.failures import OneLineFailure, TrainingFailed
from zsharp_sweeps.training.signals import check_stop, graceful_stop

log = logging.getLogger(__name__)

#: How often an idle worker looks again while the study's last trials run elsewhere (one of
#: them may die and be retried, and this worker should take the retry).
IDLE_POLL_S = 1.0
#: Trial user attribute: the trial's output folder (a retry resumes from its checkpoints).
DIR_ATTR = "dir"


class SurplusTrial(RuntimeError):
    """Asked after the study was full (workers raced for the last place); never counted."""


class MaxFailuresExceeded(OneLineFailure):
    """More trials failed than ``max_failure_rate`` allows over the whole study: one line at
    the command line, exit status 1."""


class RejectedValue(ValueError):
    """The task function returned something that is not the study's objective value(s)."""


#: Failures that are outcomes of a trial's settings, not bugs: their message is the whole
#: story (no traceback is logged for them).
EXPLAINED_FAILURES: tuple[type[BaseException], ...] = (TrainingFailed, ConfigError,
                                                       RejectedValue)

#: A trial's ``fail_reason`` is cut to this many characters.
FAIL_REASON_MAX = 500


def failure_reason(exc: BaseException) -> str:
    """Why a trial failed, in one line: the message of an explained failure (a diverged
    run, an invalid sampled config, a rejected return value), else the exception's type and
    the first line of its message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines) if isinstance(exc, EXPLAINED_FAILURES) else (lines or [""])[0]
    if not isinstance(exc, EXPLAINED_FAILURES):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= FAIL_REASON_MAX else text[: FAIL_REASON_MAX - 3] + "..."


def _retry(study: optuna.Study, trial: FrozenTrial, max_retry: int | None) -> None:
    """Enqueue a copy of ``trial`` exactly as Optuna does for a stale one (same params,
    ``failed_trial``/``retry_history`` system attrs), so every retry looks the same."""
    with optuna_experimental():
        RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, trial)


def trial_run_name(number: int, params: dict[str, Any]) -> str:
    """``t7 lr=0.0412 percentile=0.87 rho=0.113``: tellable apart in the MLflow UI."""
    parts = [f"t{number}"]
    for name, value in params.items():
        short = name.lstrip("+~").rsplit(".", 1)[-1]
        parts.append(f"{short}={value:.3g}" if isinstance(value, float) else f"{short}={value}")
    return " ".join(parts)[:250]


def objective_values(value: Any, n_objectives: int) -> float | list[float]:
    """What the task function returned, as Optuna's value(s); ``RejectedValue`` (with the
    stock sweeper's wording) for anything else, NaN included."""
    if n_objectives == 1:
        try:
            number = float(value)
        except (ValueError, TypeError):
            raise RejectedValue(f"Return value must be float-castable. Got '{value}'.") from None
        numbers = [number]
    else:
        try:
            numbers = [float(v) for v in value]
        except (ValueError, TypeError):
            raise RejectedValue(
                "Return value must be a list or tuple of float-castable values."
                f" Got '{value}'."
            ) from None
        if len(numbers) != n_objectives:
            raise RejectedValue(
                "The number of the values and the number of the objectives are"
                f" mismatched. Expect {n_objectives}, but actually {len(numbers)}."
            )
    if any(math.isnan(v) for v in numbers):
        raise RejectedValue(f"The objective value is NaN: {value!r}.")
    return numbers[0] if n_objectives == 1 else numbers


@contextlib.contextmanager
def _trial_log(path: Path) -> Iterator[None]:
    """The trial's log lines also go to ``<trial dir>/<job name>.log``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


@dataclass
class WorkerJob:
    """The launcher's task function: one worker, for as long as the study has trials.

    The launcher (and its prestarted processes) exists before the study does, so the plans
    are filled in just before ``launch``, which pickles this object to every worker. Each
    trial runs ``task_function`` as a Hydra job composed from ``config`` (the sweep's master
    config) with the trial's overrides.
    """

    hydra_context: HydraContext
    task_function: TaskFunction
    config: DictConfig
    study: StudyPlan | None = None
    host: HostPlan | None = None

    def __call__(self, cfg: DictConfig) -> dict[str, Any]:
        assert self.study is not None and self.host is not None, (
            "WorkerJob's plans are set before the launcher runs jobs")
        return run_worker(self)


class Worker:
    """One worker: a device, a study handle and the warm state it keeps between trials.
    ``Worker.join`` opens the study; ``run`` takes trials until it is full."""

    def __init__(self, job: WorkerJob, index: int, study: optuna.Study) -> None:
        assert job.study is not None and job.host is not None
        self.job, self.plan, self.host_plan = job, job.study, job.host
        self.index = index
        self.study = study
        self.host = socket.gethostname()
        self.data_cache = DataCache()
        self.trials_run = 0
        self.device = self.host_plan.device_for(index)  # the sweep's name: logs, tags
        self.compute_device = self.device  # what torch runs on (cuda:0 once isolated)
        self.gpu: str | None = None  # the UUID of the card it runs on, read back from CUDA
        self._current: int | None = None
        self._started = self._loaded = time.time()
        self.warmup_s = 0.0  # training steps before the first trial (training/warmup.py)

    @classmethod
    def join(cls, job: WorkerJob, index: int) -> Worker:
        """Open the study this worker works on (its storage with Optuna's heartbeat)."""
        started = time.time()
        plan = job.study
        assert plan is not None
        study = optuna.load_study(
            study_name=plan.study_name,
            storage=open_storage(plan.storage, heartbeat_interval=plan.heartbeat_interval,
                                 grace_period=plan.grace_period, max_retry=plan.max_retry),
            sampler=TrialSeededSampler(plan.make_sampler, plan.sampler_seed),
            pruner=plan.make_pruner(),
        )
        worker = cls(job, index, study)
        worker._started, worker._loaded = started, time.time()
        return worker

    @property
    def _early_device(self) -> str:
        """How long this process took to start CUDA before its job came, for the join line
        (``placement.prepin``; empty where it did not)."""
        from zsharp_sweeps.sweep.placement import prepinned

        early = prepinned()
        return f"; CUDA was ready before the job: {early.seconds:.1f}s then" if early else ""

    @property
    def label(self) -> str:
        return f"{self.host}/{self.index}"

    # ----- the loop ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Take trials until the study is full; returns what this worker did (``stopped``:
        the signal that ended it early, else None)."""
        where = self._pin_device()
        ready = time.time()
        launched = self.host_plan.launched_at
        # Where a worker's start goes (process and imports, study, CUDA): the workers of a
        # host should join together; one that lags shows which step queued.
        since = (f" {ready - launched:.1f}s after launch (process "
                 f"{self._started - launched:.1f}s, study "
                 f"{self._loaded - self._started:.1f}s, device {ready - self._loaded:.1f}s"
                 f"{self._early_device})" if launched else "")
        log.info(f"Worker {self.label} on {self.device}{where} joined study "
                 f"{self.plan.study_name}{since}")
        stopped = None
        done = threading.Event()
        # Optuna checks for stale trials only when a trial starts: this worker may be deep
        # in a long trial when another host dies, so a thread looks every heartbeat too.
        monitor = threading.Thread(target=self._watch_stale, args=(done,), daemon=True,
                                   name="zsharp-stale-trials")
        monitor.start()
        try:
            self._warm_up()
            while True:
                check_stop()
                self._fail_stale()
                state = progress(self.study)
                if state.done(self.plan.n_trials):
                    break
                if state.counted_failures > self.plan.max_failures():
                    raise MaxFailuresExceeded(
                        f"{state.counted_failures} of {state.finished} finished trials failed, "
                        f"more than hydra.sweeper.max_failure_rate={self.plan.max_failure_rate}"
                        f" of n_trials={self.plan.n_trials} allows (why each failed: the "
                        "trial lines above, or its fail_reason: python -m zsharp_sweeps.report "
                        f"{self.plan.sweep_dir})"
                    )
                if not state.has_work(self.plan.n_trials):
                    time.sleep(IDLE_POLL_S)
                    continue
                check_stop()
                self.study.optimize(
                    self.objective, n_trials=1, catch=(Exception,),
                    callbacks=[self._log_finished], gc_after_trial=False,
                    show_progress_bar=False,
                )
        except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM through the signal handler
            stopped = int(getattr(exc, "signum", signal.SIGINT))
            self._retry_interrupted()
        finally:
            done.set()
        return {"worker": self.label, "device": self.device, "trials": self.trials_run,
                "warmup_s": self.warmup_s,
                "stopped": stopped, "data_cache_hits": self.data_cache.hits}

    def _warm_up(self) -> None:
        """A few real steps of the sweep's base configuration before the first trial, so
        every trial starts with data, cuDNN, graphs and kernels warm (``training.warmup``).
        Only for this project's training (a config with ``hardware``); a warm-up that fails
        is skipped: the first trial then meets the same problem and is recorded with it."""
        from zsharp_sweeps.training.warmup import warm_up

        context = RunContext(device=self.compute_device, device_label=self.device,
                             data_cache=self.data_cache)
        try:
            cfg = self._compose(-1, list(self.plan.fixed_overrides))
            if OmegaConf.select(cfg, "hardware") is None:
                return
            result = warm_up(cfg, context)
        except Exception as exc:
            log.warning(f"Worker {self.label}: no warm-up ({type(exc).__name__}: {exc}); "
                        "its first trial pays for it")
            return
        self.warmup_s = result.seconds
        log.info(result.line(f"Worker {self.label}"))

    def _fail_stale(self) -> None:
        """Trials whose worker stopped beating: FAIL, and enqueue their retry."""
        with optuna_experimental():
            optuna.storages.fail_stale_trials(self.study)

    def _watch_stale(self, done: threading.Event) -> None:
        while not done.wait(self.plan.heartbeat_interval):
            try:
                self._fail_stale()
            except Exception as exc:  # a busy database: try again next beat
                log.debug(f"stale-trial check failed: {exc!r}")

    def _pin_device(self) -> str:
        """Streams, graphs, cuDNN and Triton launch on the current device: make it ours (and,
        in a process of its own, the only one it sees); the host's CPU cores are shared by
        its workers. Returns a note for the log line."""
        notes = []
        if self.device.startswith("cuda:"):
            from zsharp_sweeps.sweep.placement import pin_gpu

            try:
                pinned = pin_gpu(self.device, self.host_plan.device_uuids.get(self.device),
                                 own_process=os.getpid() != self.host_plan.main_pid)
            except RuntimeError as exc:
                if "forked subprocess" not in str(exc):
                    raise
                raise RuntimeError(
                    f"worker {self.label} was forked after CUDA had started in the sweep's "
                    "process (a Hydra callback or plugin touched torch.cuda before the "
                    "workers started): rerun with hydra.launcher.start_method=spawn"
                ) from exc
            self.compute_device, self.gpu = pinned.device, pinned.uuid
            if pinned.note:
                log.warning(f"Worker {self.label}: {pinned.note}")
            if pinned.isolated:
                notes.append(f"{pinned.uuid} only")
        if self.host_plan.workers > 1 and self.host_plan.share_cores:
            from zsharp_sweeps.sweep.placement import share_cores

            threads, cores = share_cores(self.host_plan.workers)
            notes.append(f"{threads} of {cores} cores")
        return f" ({', '.join(notes)})" if notes else ""

    def _retry_interrupted(self) -> None:
        """The interrupted trial is FAIL now (``optimize`` told it); enqueue its retry."""
        if self._current is None:
            return
        with contextlib.suppress(Exception):
            frozen = self._frozen(self._current)
            if frozen.state == TrialState.FAIL and frozen.user_attrs.get(INTERRUPTED_ATTR):
                _retry(self.study, frozen, self.plan.max_retry)
                log.warning(f"Trial {frozen.number} interrupted: recorded FAIL, enqueued again")

    def _frozen(self, number: int) -> FrozenTrial:
        return next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)

    def _log_finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get(SURPLUS_ATTR):
            return
        value = ""
        state = trial.state.name.lower()
        if trial.state == TrialState.COMPLETE:
            names = self.plan.objectives or ["value"] * len(trial.values)
            value = ": " + ", ".join(f"{name}={v:.4f}" for name, v in zip(names, trial.values))
        elif trial.state == TrialState.FAIL:
            state = "failed"
            if trial.user_attrs.get(FAIL_REASON_ATTR):
                value = f": {trial.user_attrs[FAIL_REASON_ATTR]}"
        wall = trial.user_attrs.get("wall_s")
        (log.warning if trial.state == TrialState.FAIL else log.info)(
            f"trial {trial.number} {state}{value} "
            f"({trial_run_name(trial.number, trial.params)}) on {self.device}"
            + (f" in {wall:.1f}s" if wall is not None else "")
        )

    # ----- one trial -----------------------------------------------------------------------
    def objective(self, trial: optuna.Trial) -> float | list[float]:
        self._current = trial.number
        try:
            # A stop that lands between the ask and the training (the signal is acted on
            # here) interrupts this trial too: it must be retried, not counted as failed.
            check_stop()
        except KeyboardInterrupt as exc:
            self._interrupted(trial, exc)
            raise
        if is_surplus(self.study, trial.number, self.plan.n_trials):
            trial.set_user_attr(SURPLUS_ATTR, True)
            self._requeue_if_retry(trial)
            raise SurplusTrial(f"trial {trial.number}: the study already has its trials")
        started = time.perf_counter()
        trial.set_user_attr("worker", {"host": self.host, "pid": os.getpid(),
                                       "index": self.index, "device": self.device,
                                       "compute_device": self.compute_device,
                                       "gpu": self.gpu, "warmup_s": self.warmup_s})
        trial.set_user_attr(INTERRUPTED_ATTR, False)  # a retry copies its original's attrs
        if FAIL_REASON_ATTR in trial.user_attrs:  # ... its reason too, stale for the retry
            trial.set_user_attr(FAIL_REASON_ATTR, None)
        try:
            return self._run(trial, started)
        except KeyboardInterrupt as exc:
            self._interrupted(trial, exc)
            raise
        except Exception as exc:
            # Optuna records it FAIL; dashboards and the report show this line.
            reason = failure_reason(exc)
            with contextlib.suppress(Exception):
                trial.set_user_attr(FAIL_REASON_ATTR, reason)
            if not isinstance(exc, EXPLAINED_FAILURES):  # a bug: its traceback is needed
                log.error(f"trial {trial.number} failed: {reason}", exc_info=exc)
            raise

    @staticmethod
    def _interrupted(trial: optuna.Trial, exc: KeyboardInterrupt) -> None:
        """Mark a trial stopped by a signal: it does not count, its retry does."""
        with contextlib.suppress(Exception):
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            name = signal.Signals(int(getattr(exc, "signum", signal.SIGINT))).name
            trial.set_user_attr(FAIL_REASON_ATTR, f"interrupted ({name}): retried")

    def _requeue_if_retry(self, trial: optuna.Trial) -> None:
        """A surplus ask may have popped an enqueued retry: put its parameters back."""
        frozen = self._frozen(trial.number)
        if retried_from(frozen) is not None:
            _retry(self.study, frozen, None)

    def _compose(self, number: int, overrides: list[str]) -> DictConfig:
        """The trial's job config, as a launcher composes a job: the master config with the
        trial's overrides; the job's number is the trial's (its folder, ``hydra.job.num``)."""
        job = self.job
        cfg = job.hydra_context.config_loader.load_sweep_config(job.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = f"{cfg.hydra.job.name}_{number}"
            cfg.hydra.job.num = number
        return cfg

    def _run(self, trial: optuna.Trial, started: float) -> float | list[float]:
        params = {name: suggest(trial, name, dist) for name, dist in self.plan.space.items()}
        if self.plan.custom_search_space_extender is not None:
            self.plan.custom_search_space_extender(self.job.config, trial)
            params = dict(trial.params)
        overrides = [*self.plan.fixed_overrides,
                     *(f"{name}={override_value(v)}" for name, v in params.items())]
        cfg = self._compose(trial.number, overrides)
        out_dir = Path(str(OmegaConf.select(cfg, "hydra.sweep.dir"))) / str(
            OmegaConf.select(cfg, "hydra.sweep.subdir"))
        trial.set_user_attr(DIR_ATTR, str(out_dir.resolve()))
        context = self._context(trial, params, overrides, out_dir)
        epoch_walls: list[float] = []
        context.callbacks.append(lambda epoch, m: epoch_walls.append(m.get("epoch_wall_s", 0.0)))
        context.on_summary.append(lambda summary: record_results(trial, summary))
        with _trial_log(out_dir / f"{cfg.hydra.job.name}.log"):
            log.info(f"trial {trial.number} started on {self.device}: {context.run_name} "
                     f"(overrides: {out_dir / '.hydra' / 'overrides.yaml'})")
            try:
                with use_context(context):
                    value = self._run_job(cfg)  # raises the task's exception
            finally:
                wall = time.perf_counter() - started
                self.trials_run += 1
                with contextlib.suppress(Exception):
                    trial.set_user_attr("wall_s", wall)
                    trial.set_user_attr("overhead_s", wall - sum(epoch_walls))
        try:
            return objective_values(value, len(self.plan.directions))
        except RejectedValue as exc:
            trial.set_user_attr(REJECTED_ATTR, str(exc))
            raise

    def _run_job(self, cfg: DictConfig) -> Any:
        """One Hydra job in this process, as Hydra's launchers run one (``run_job`` puts
        Hydra's config and working directory back afterwards); returns what the task
        function returned, or raises what it raised. The worker keeps its own logging: the
        trial's lines also go to the trial's log file (``_trial_log``).

        The task's exception is taken as it was raised, not from ``JobReturn.return_value``,
        which prints "Error executing job with overrides: [...]" first: the worker logs one
        line per failed trial, with its reason."""
        job = self.job
        raised: list[Exception] = []

        @functools.wraps(job.task_function)
        def task_function(cfg: DictConfig) -> Any:
            try:
                return job.task_function(cfg)
            except Exception as exc:
                raised.append(exc)
                raise

        ret = run_job(hydra_context=job.hydra_context, task_function=task_function,
                      config=cfg, job_dir_key="hydra.sweep.dir",
                      job_subdir_key="hydra.sweep.subdir", configure_logging=False)
        if ret.status == JobStatus.FAILED and raised:
            raise raised[0]
        return ret.return_value

    def _context(self, trial: optuna.Trial, params: dict[str, Any], overrides: list[str],
                 out_dir: Path) -> RunContext:
        """What this project's training needs for the trial, beyond its config."""
        tags = {"study_name": self.plan.study_name, "trial_number": str(trial.number),
                "worker": self.label}
        retry_of = retried_from(self._frozen(trial.number))
        resume_from = supersedes = None
        if retry_of is not None:
            tags["retry_of"] = str(retry_of)
            previous = self._frozen(retry_of).user_attrs.get(DIR_ATTR)
            resume_from = Path(previous) / "checkpoints" if previous else None
            supersedes = {"study_name": self.plan.study_name, "trial_number": str(retry_of)}
        callbacks = []
        if self.plan.epoch_metric is not None:
            callbacks.append(TrialReporter(trial, self.plan.epoch_metric,
                                           len(self.plan.directions)))
        return RunContext(
            device=self.compute_device, device_label=self.device,
            run_name=trial_run_name(trial.number, params), parent_run_id=self.plan.parent_run_id,
            tags=tags, overrides=overrides, callbacks=callbacks, data_cache=self.data_cache,
            checkpoint_dir=out_dir / "checkpoints", resume_from=resume_from,
            new_run_on_resume=True, supersedes=supersedes, log_prefix=f"[t{trial.number}] ",
        )


def run_worker(job: WorkerJob) -> dict[str, Any]:
    """The launcher's job: one worker, for as long as the study has trials. Its index is the
    launcher's job number (Hydra's public ``HydraConfig``: ``hydra.job.num``)."""
    assert job.host is not None
    try:
        index = int(HydraConfig.get().job.num)
    except (ValueError, TypeError):  # called outside a Hydra job (tests): one worker
        index = 0
    # Our own "trial N complete: ..." lines say what Optuna's INFO lines say, per worker.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_failed_trials()
    with watchdog(job.host.stop_file, job.host.main_pid, job.host.main_host or None), \
            graceful_stop():
        return Worker.join(job, index).run()
