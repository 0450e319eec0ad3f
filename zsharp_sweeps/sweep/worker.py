"""Sweep workers: long-lived processes that pull trials from the shared Optuna storage.

The sweeper (``hydra_plugins/zsharp_optuna_sweeper``) starts W workers through Hydra's
launcher (``zsharp_workers`` on one host, submitit on SLURM, joblib still works); the same
command on another host adds workers to the same study. Each worker is pinned to one device
for its life (``placement``: in a process of its own it sees only that GPU) and loops:
ask the study for a trial (``study.optimize(n_trials=1)``: Optuna's heartbeat, stale-trial
check and tell come with it), compose the trial's config with Hydra's compose API (the
sweep's overrides plus the sampled values), train it in-process and tell the result. A free
worker asks at once, so a short (pruned) trial never waits for a long one. Data on the
device, the CUDA context, cuDNN plans and compiled kernels stay warm between trials.

Everything a trial needs comes in a ``TrialContext``; only public Optuna/Hydra APIs are
used. Lifecycle: see ``lifecycle`` (workers end with the sweep) and ``progress`` (which
trials count toward ``n_trials``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from zsharp_sweeps.config import ConfigError, StudyConfig, section
from zsharp_sweeps.training.signals import check_stop
from zsharp_sweeps.training.context import DataCache, TrialContext
from zsharp_sweeps.sweep.lifecycle import watchdog
from zsharp_sweeps.sweep.progress import (
    INTERRUPTED_ATTR,
    SURPLUS_ATTR,
    is_surplus,
    progress,
    retried_from,
)
from zsharp_sweeps.sweep.quiet import optuna_experimental, quiet_interrupted_trials
from zsharp_sweeps.sweep.sampling import TrialSeededSampler, override_value, suggest
from zsharp_sweeps.sweep.trial import build_pruner

log = logging.getLogger(__name__)

#: How often an idle worker looks again while the study's last trials run elsewhere (one of
#: them may die and be retried, and this worker should take the retry).
IDLE_POLL_S = 1.0


class SurplusTrial(RuntimeError):
    """Asked after the study was full (workers raced for the last place); never counted."""


class MaxFailuresExceeded(RuntimeError):
    """More trials failed than ``max_failure_rate`` allows over the whole study."""


@dataclass(frozen=True)
class SweepPlan:
    """Everything a worker needs to join a study; built once by the sweeper, pickled to the
    workers by the launcher (joblib, submitit)."""

    study_name: str
    storage: str
    n_trials: int
    max_failure_rate: float
    space: dict[str, BaseDistribution]
    fixed_overrides: list[str]
    make_sampler: Callable[[int | None], optuna.samplers.BaseSampler]
    sampler_seed: int | None
    study: StudyConfig
    objectives: list[str]
    config_name: str
    sweep_dir: str
    devices: list[str]
    trials_per_device: int
    main_pid: int
    stop_file: str
    main_host: str = ""
    parent_run_id: str | None = None
    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retry: int = 3
    custom_search_space_extender: Callable[[DictConfig, optuna.Trial], None] | None = None
    #: ``{"cuda:2": "GPU-…"}``: lets a worker in its own process see only its card.
    device_uuids: dict[str, str] = field(default_factory=dict)
    #: ``time.time()`` when the sweep started its workers: each says how long it took to join.
    launched_at: float = 0.0
    #: Workers the sweep starts on this host: CPU workers share its cores between them.
    host_workers: int = 1

    def device_for(self, worker_index: int) -> str:
        return self.devices[(worker_index // self.trials_per_device) % len(self.devices)]

    def max_failures(self) -> int:
        """Failures the study may hold: beyond this its failure rate must exceed the bound."""
        return int(self.max_failure_rate * self.n_trials)


def open_storage(url: str, *, heartbeat_interval: int, grace_period: int,
                 max_retry: int) -> optuna.storages.RDBStorage:
    """The study's RDB storage with Optuna's heartbeat, so a dead worker's trial is noticed
    by every other worker (after ``grace_period`` s) and retried (up to ``max_retry``)."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with optuna_experimental():  # heartbeats
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                max_retry=max_retry
            ),
        )


def close_stale_runs(cfg: DictConfig, study_name: str, trial_number: int) -> None:
    """MLflow runs of a trial whose worker died (SIGKILL, lost host) stay RUNNING: the
    worker that retries the trial ends them KILLED."""
    from mlflow.tracking import MlflowClient

    from zsharp_sweeps.tracking import resolve_tracking_uri

    tracking = section(cfg, "tracking")
    if not tracking.enabled:
        return
    client = MlflowClient(resolve_tracking_uri(tracking))
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=(f"tags.study_name = '{study_name}' and "
                       f"tags.trial_number = '{trial_number}' and attributes.status = 'RUNNING'"),
    )
    for run in runs:
        client.set_tag(run.info.run_id, "run_state", "KILLED")
        client.set_terminated(run.info.run_id, status="KILLED")
        log.warning(f"MLflow run {run.info.run_id} of dead trial {trial_number}: ended KILLED")


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


#: Per-epoch metrics a trial keeps in its ``curves`` attribute (the verdict's curves).
CURVE_METRICS = ("val_acc", "val_loss", "test_acc", "train_loss", "epoch_wall_s")


def record_results(trial: optuna.Trial, summary: dict[str, Any]) -> None:
    """The trial's results in the study itself (``metrics``: the finite summary numbers,
    test accuracy and sharpness included; ``curves``: per-epoch metrics), so an analysis
    reads one storage, with or without MLflow, on any host."""
    metrics = {k: float(v) for k, v in summary.items()
               if isinstance(v, (int, float)) and math.isfinite(float(v))}
    trial.set_user_attr("metrics", metrics)
    history = summary.get("history") or []
    curves = {name: [float(row[name]) if math.isfinite(row.get(name, math.nan)) else None
                     for row in history]
              for name in CURVE_METRICS if any(name in row for row in history)}
    if curves:
        trial.set_user_attr("curves", curves)


@contextlib.contextmanager
def _trial_log(path: Path) -> Iterator[None]:
    """The trial's log lines also go to ``<trial dir>/train.log``."""
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
class Worker:
    """One worker: a device, a study handle and the warm state it keeps between trials."""

    plan: SweepPlan
    index: int
    job_config: DictConfig | None = None
    host: str = field(default_factory=socket.gethostname)
    data_cache: DataCache = field(default_factory=DataCache)
    trials_run: int = 0

    def __post_init__(self) -> None:
        self._started = time.time()
        self.device = self.plan.device_for(self.index)  # the sweep's name: logs, tags
        self.compute_device = self.device  # what torch runs on (cuda:0 once isolated)
        self.gpu: str | None = None  # the UUID of the card it runs on, read back from CUDA
        self.study = optuna.load_study(
            study_name=self.plan.study_name,
            storage=open_storage(self.plan.storage,
                                 heartbeat_interval=self.plan.heartbeat_interval,
                                 grace_period=self.plan.grace_period,
                                 max_retry=self.plan.max_retry),
            sampler=TrialSeededSampler(self.plan.make_sampler, self.plan.sampler_seed),
            pruner=build_pruner(self.plan.study),
        )
        self._loaded = time.time()
        self._current: int | None = None

    @property
    def label(self) -> str:
        return f"{self.host}/{self.index}"

    # ----- the loop ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Take trials until the study is full; returns what this worker did (``stopped``:
        the signal that ended it early, else None)."""
        where = self._pin_device()
        ready = time.time()
        # Where a worker's start goes (process and imports, study, CUDA): the workers of a
        # host should join together; one that lags shows which step queued.
        since = (f" {ready - self.plan.launched_at:.1f}s after launch (process "
                 f"{self._started - self.plan.launched_at:.1f}s, study "
                 f"{self._loaded - self._started:.1f}s, device {ready - self._loaded:.1f}s)"
                 if self.plan.launched_at else "")
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
            while True:
                check_stop()
                self._fail_stale()
                state = progress(self.study)
                if state.done(self.plan.n_trials):
                    break
                if state.failed > self.plan.max_failures():
                    raise MaxFailuresExceeded(
                        f"{state.failed} of {state.finished} finished trials failed, more than "
                        f"hydra.sweeper.max_failure_rate={self.plan.max_failure_rate} of "
                        f"n_trials={self.plan.n_trials} allows"
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
                "stopped": stopped, "data_cache_hits": self.data_cache.hits}

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
                pinned = pin_gpu(self.device, self.plan.device_uuids.get(self.device),
                                 own_process=os.getpid() != self.plan.main_pid)
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
        if self.plan.host_workers > 1:
            from zsharp_sweeps.sweep.placement import share_cores

            threads, cores = share_cores(self.plan.host_workers)
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
        if trial.state == TrialState.COMPLETE:
            values = trial.values
            value = ": " + ", ".join(
                f"{name}={v:.4f}" for name, v in zip(self.plan.objectives, values)
            )
        wall = trial.user_attrs.get("wall_s")
        log.info(
            f"trial {trial.number} {trial.state.name.lower()}{value} "
            f"({trial_run_name(trial.number, trial.params)}) on {self.device}"
            + (f" in {wall:.1f}s" if wall is not None else "")
        )

    # ----- one trial -----------------------------------------------------------------------
    def objective(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        self._current = trial.number
        check_stop()
        if is_surplus(self.study, trial.number, self.plan.n_trials):
            trial.set_user_attr(SURPLUS_ATTR, True)
            self._requeue_if_retry(trial)
            raise SurplusTrial(f"trial {trial.number}: the study already has its trials")
        started = time.perf_counter()
        trial.set_user_attr("worker", {"host": self.host, "pid": os.getpid(),
                                       "index": self.index, "device": self.device,
                                       "compute_device": self.compute_device,
                                       "gpu": self.gpu})
        trial.set_user_attr(INTERRUPTED_ATTR, False)  # a retry copies its original's attrs
        try:
            return self._run(trial, started)
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                trial.set_user_attr(INTERRUPTED_ATTR, True)
            raise

    def _requeue_if_retry(self, trial: optuna.Trial) -> None:
        """A surplus ask may have popped an enqueued retry: put its parameters back."""
        frozen = self._frozen(trial.number)
        if retried_from(frozen) is not None:
            _retry(self.study, frozen, None)

    def _run(self, trial: optuna.Trial, started: float) -> float | tuple[float, ...]:
        from zsharp_sweeps.config import validate
        from zsharp_sweeps.train import objective_values, record_rejected_trial, run_experiment

        params = {name: suggest(trial, name, dist) for name, dist in self.plan.space.items()}
        if self.plan.custom_search_space_extender is not None:
            self.plan.custom_search_space_extender(self.job_config, trial)
            params = dict(trial.params)
        out_dir = Path(self.plan.sweep_dir) / str(trial.number)
        # Each trial checkpoints every epoch into its folder.
        overrides = [*self.plan.fixed_overrides,
                     *(f"{name}={override_value(v)}" for name, v in params.items()),
                     f"trainer.checkpoint_dir={override_value(str(out_dir / 'checkpoints'))}"]
        run_name = trial_run_name(trial.number, params)
        tags = {"study_name": self.plan.study_name, "trial_number": str(trial.number),
                "worker": self.label}
        retry_of = retried_from(self._frozen(trial.number))
        if retry_of is not None:
            tags["retry_of"] = str(retry_of)
        context = TrialContext(
            trial=trial, n_objectives=len(self.plan.objectives), device=self.device,
            compute_device=self.compute_device,
            run_name=run_name, out_dir=out_dir, parent_run_id=self.plan.parent_run_id,
            tags=tags, data_cache=self.data_cache,
        )
        epoch_walls: list[float] = []
        context.callbacks.append(lambda epoch, m: epoch_walls.append(m.get("epoch_wall_s", 0.0)))
        out_dir.mkdir(parents=True, exist_ok=True)
        with _trial_log(out_dir / "train.log"):
            log.info(f"trial {trial.number} started on {self.device}: {run_name} "
                     f"(overrides: {out_dir / '.hydra' / 'overrides.yaml'})")
            if retry_of is not None:
                overrides = self._resume_from(retry_of, overrides)
            cfg = self._compose(overrides, out_dir)
            if retry_of is not None:
                close_stale_runs(cfg, self.plan.study_name, retry_of)
            try:
                train_cfg = validate(cfg)
            except ConfigError as exc:
                record_rejected_trial(cfg, overrides, exc, context)
                raise
            try:
                summary = run_experiment(train_cfg, overrides=overrides, context=context)
                record_results(trial, summary)
            finally:
                wall = time.perf_counter() - started
                self.trials_run += 1
                with contextlib.suppress(Exception):
                    trial.set_user_attr("wall_s", wall)
                    trial.set_user_attr("overhead_s", wall - sum(epoch_walls))
            return objective_values(train_cfg, summary)

    def _resume_from(self, retry_of: int, overrides: list[str]) -> list[str]:
        """A retry continues from the last checkpoint of the attempt it repeats (same
        parameters), unless the sweep's settings changed since (then: from epoch 1)."""
        from hydra import compose

        from zsharp_sweeps.training.checkpoint import prepare_resume
        from zsharp_sweeps.config import validate

        previous = Path(self.plan.sweep_dir) / str(retry_of) / "checkpoints"
        if not previous.is_dir():
            return overrides
        candidate = [*overrides, f"trainer.resume={override_value(str(previous))}"]
        try:
            train_cfg = validate(compose(config_name=self.plan.config_name,
                                         overrides=candidate))
            resolved = OmegaConf.to_container(OmegaConf.structured(train_cfg), resolve=True)
            prepare_resume(train_cfg, resolved)
        except ConfigError as exc:
            log.warning(f"Retry of trial {retry_of} starts at epoch 1: {exc}")
            return overrides
        return candidate

    def _compose(self, overrides: list[str], out_dir: Path) -> DictConfig:
        """The trial's config, as Hydra would compose it for a job with these overrides;
        written to ``<sweep dir>/<trial number>/.hydra/`` like a Hydra job's."""
        from hydra import compose

        cfg = compose(config_name=self.plan.config_name, overrides=list(overrides))
        hydra_dir = out_dir / ".hydra"
        hydra_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, hydra_dir / "config.yaml")
        OmegaConf.save(OmegaConf.create(list(overrides)), hydra_dir / "overrides.yaml")
        return cfg


@dataclass
class WorkerJob:
    """The launcher's task function. The launcher (and its worker processes, see
    ``prestart``) exists before the study does, so the plan is filled in just before
    ``launch``, which pickles it to every worker."""

    plan: SweepPlan | None = None

    def __call__(self, cfg: DictConfig) -> dict[str, Any]:
        assert self.plan is not None, "WorkerJob.plan is set before the launcher runs jobs"
        return run_worker(cfg, self.plan)


def run_worker(cfg: DictConfig, plan: SweepPlan) -> dict[str, Any]:
    """The launcher's job function: one worker, for as long as the study has trials."""
    from hydra.core.hydra_config import HydraConfig

    from zsharp_sweeps.training.signals import graceful_stop

    try:
        index = int(HydraConfig.get().job.num)
    except ValueError:  # called outside a Hydra job (tests): one worker
        index = 0
    # Our own "trial N complete: ..." lines say what Optuna's INFO lines say, per worker.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_interrupted_trials()
    with watchdog(plan.stop_file, plan.main_pid, plan.main_host or None), graceful_stop():
        worker = Worker(plan, index, job_config=cfg)
        return worker.run()
