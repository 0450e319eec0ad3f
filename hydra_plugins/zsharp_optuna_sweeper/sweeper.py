"""Hydra's Optuna sweeper, run as long-lived workers that pull trials from the study.

A ``Sweeper`` on Hydra's public plugin interface (``setup``, ``sweep``). What it keeps from
``hydra_plugins.hydra_optuna_sweeper``: every setting users know (``n_trials``, ``n_jobs``,
``storage``, ``study_name``, ``sampler``, ``direction``, ``params``, ``max_failure_rate``,
``custom_search_space``) and the search-space syntax, parsed by the stock parser
(``zsharp_sweeps.sweep.sampling.parse_search_space``). Every trial runs the task function
Hydra gave the sweeper, as a Hydra job, so it sweeps any Hydra app. What it changes (see
``zsharp_sweeps/sweep/worker.py`` for the worker side):

- **Workers, not batches.** The launcher (``zsharp_workers`` on one host, submitit on SLURM,
  joblib) starts ``n_jobs`` workers, each pinned to one device (worker *i* on
  ``devices[(i // hardware.trials_per_gpu) % len(devices)]``). Each asks the study for a
  trial as soon as it is free: no batch barrier, data and kernels stay warm.
- **Resume.** ``n_trials`` is the size of the study: rerunning the same command continues
  it. By default the study lives in ``<sweep dir>/optuna.db``. The same command on another
  host, with an RDB ``storage`` URL, adds workers to the same study.
- **Faults.** Optuna's heartbeat notices a dead worker on any host; its trial becomes FAIL
  and a copy is enqueued. SIGINT/SIGTERM stop the workers cleanly: their trials FAIL and are
  retried on resume, their MLflow runs end KILLED.
- **Seeds.** A sampler seed gives each trial its own derived seed: the study is reproducible
  and never repeats a configuration across resumes or workers.
- **Failures** count over the study: the sweep stops once more than
  ``max_failure_rate * n_trials`` trials failed.
- **Checks first.** The storage URL, the tracking URI and the trial config at every edge of
  every swept value (composed; and checked by the task function if it declares
  ``check_config``, ``zsharp_sweeps.sweep.protocols.ChecksConfig``) are checked before
  anything is created; a bad one raises ``ConfigError`` naming the setting.

This project's training config adds, when its groups are present: MLflow (``tracking``: one
parent run per study, each trial's run nested under it and named after it), pruning
(``study.pruner``), devices (``hardware``) and objective names (``objectives``). A config
without them (any other Hydra app) gets none of these.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.trial import TrialState

from zsharp_sweeps.config import (
    ConfigError,
    HardwareConfig,
    StudyConfig,
    TrackingConfig,
    section,
)
from zsharp_sweeps.sweep.checks import check_separate_stores, check_sweeper_settings
from zsharp_sweeps.sweep.keep import check_keep, prune_checkpoints
from zsharp_sweeps.sweep.lifecycle import StopRequest
from zsharp_sweeps.sweep.placement import gpu_uuids, prepin_slot
from zsharp_sweeps.sweep.plan import HostPlan, StudyPlan, device_for
from zsharp_sweeps.sweep.progress import counted_trials, progress
from zsharp_sweeps.sweep.protocols import ChecksConfig, PrestartingLauncher
from zsharp_sweeps.sweep.quiet import optuna_experimental
from zsharp_sweeps.sweep.resume import (
    SETTINGS_ATTR,
    SPACE_ATTR,
    differences,
    fixed_settings,
    incompatible,
    space_settings,
)
from zsharp_sweeps.sweep.sampling import (
    SearchSpace,
    corner_values,
    excludes,
    grid_choices,
    is_grid_sampler,
    override_value,
    parse_search_space,
    sampler_factory,
)
from zsharp_sweeps.sweep.trial import EPOCH_METRIC_OF_OBJECTIVE, build_pruner
from zsharp_sweeps.sweep.worker import WorkerJob
from zsharp_sweeps.tracking import Tracker, override_param_key
from zsharp_sweeps.tracking.uris import absolute_sqlite_url, sqlite_path, sqlite_url
from zsharp_sweeps.tracking.view import SweepView, trials_table
from zsharp_sweeps.training.signals import Stopped

log = logging.getLogger(__name__)

#: What a worker imports before its first trial (MLflow alone takes a second or more): the
#: launcher's prestarted processes import them while the sweeper sets up.
WORKER_MODULES = ("zsharp_sweeps.sweep.worker", "zsharp_sweeps.tracking", "mlflow.tracking",
                  "optuna", "matplotlib.pyplot")

PARENT_RUN_ATTR = "mlflow_parent_run_id"


def _study_key(storage: str, study_name: str) -> str:
    """Names one study in one storage, without writing the storage URL (it may hold a
    password) into MLflow."""
    return hashlib.sha256(f"{storage}\n{study_name}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AppGroups:
    """The groups of this project's training config that the sweeper acts on; None for a
    config without them (any other Hydra app)."""

    tracking: TrackingConfig | None
    study: StudyConfig | None
    hardware: HardwareConfig | None
    objectives: list[str] | None

    @classmethod
    def of(cls, config: DictConfig) -> AppGroups:
        def group(name: str) -> Any:
            return section(config, name) if name in config else None

        objectives = config.get("objectives")
        return cls(group("tracking"), group("study"), group("hardware"),
                   list(objectives) if isinstance(objectives, ListConfig) else None)


class ZSharpOptunaSweeper(Sweeper):
    """``hydra/sweeper=zsharp_optuna``: the stock settings, workers that pull trials."""

    def __init__(self, sampler: Any, direction: Any, storage: str | None,
                 study_name: str | None, n_trials: int, n_jobs: int, max_failure_rate: float,
                 custom_search_space: str | None, params: DictConfig | None,
                 heartbeat_interval: int = 10, grace_period: int | None = None,
                 max_retry: int = 3, devices: list[str] | None = None,
                 report: bool | None = None, allow_changed_settings: bool = False,
                 keep_checkpoints: Any = "all") -> None:
        # Before anything exists: n_trials, n_jobs, max_failure_rate, study_name, heartbeat.
        check_sweeper_settings(n_trials=n_trials, n_jobs=n_jobs,
                               max_failure_rate=max_failure_rate, study_name=study_name,
                               heartbeat_interval=heartbeat_interval,
                               grace_period=grace_period, max_retry=max_retry)
        self.sampler_conf = sampler
        self.direction = direction
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.params = params
        self.custom_search_space_extender = None
        if custom_search_space:
            self.custom_search_space_extender = instantiate(
                {"_target_": custom_search_space, "_partial_": True})
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period or 3 * heartbeat_interval
        self.max_retry = max_retry
        self.devices = list(devices) if devices else None
        self.report = report
        try:
            self.keep_checkpoints = check_keep(keep_checkpoints)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.view: SweepView | None = None
        self.view_link: str | None = None
        self.allow_changed_settings = allow_changed_settings
        self.accepted_changes: list[str] = []
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None
        self.job: WorkerJob | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        """The launcher runs workers (``WorkerJob``), each of which runs ``task_function``
        once per trial; it is instantiated once, here, and gets its plans at launch."""
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        self.job = WorkerJob(hydra_context=hydra_context, task_function=task_function,
                             config=config)
        try:
            self.launcher = Plugins.instance().instantiate_launcher(
                config=config, hydra_context=hydra_context, task_function=self.job,
            )
        except Exception as exc:  # a launcher setting out of range: one line, like the rest
            cause = exc
            while cause.__cause__ is not None:
                cause = cause.__cause__
            if not isinstance(cause, ValueError):
                raise
            raise ConfigError(str(cause)) from None
        self.app = AppGroups.of(config)

    # ----- settings ----------------------------------------------------------------------
    def _directions(self) -> list[str]:
        direction = self.direction
        items = list(direction) if isinstance(direction, (list, tuple, ListConfig)) else [direction]
        return [str(getattr(d, "name", d)).lower() for d in items]

    def _storage_url(self) -> str:
        if self.storage:
            return absolute_sqlite_url(str(self.storage))
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        return sqlite_url(sweep_dir / "optuna.db")

    def _search_space(self, arguments: list[str]) -> tuple[SearchSpace, dict | None]:
        """The sweep's space and, for a grid sampler, its grid (``n_trials`` capped at its
        size)."""
        lines = [f"{k!s}={v}" for k, v in (self.params or {}).items()] + list(arguments)
        space = parse_search_space(lines)
        self._space_lines = {ln.split("=", 1)[0]: ln.split("=", 1)[-1] for ln in lines}
        grid = None
        if is_grid_sampler(self._sampler_conf()):
            try:
                grid = {name: grid_choices(d) for name, d in space.distributions.items()}
            except ValueError as exc:
                raise ConfigError(f"hydra/sweeper/sampler=grid: {exc}") from None
            size = 1
            for choices in grid.values():
                size *= len(choices)
            self.n_trials = min(self.n_trials, size)
        return space, grid

    def _sampler_conf(self) -> dict[str, Any]:
        conf = self.sampler_conf
        return dict(OmegaConf.to_container(conf) if OmegaConf.is_config(conf) else conf or {})

    # ----- checks before anything is created ---------------------------------------------
    def _check_urls(self, storage: str) -> None:
        from zsharp_sweeps.sweep.storage import check_storage_url
        from zsharp_sweeps.tracking import (
            check_tracking_uri,
            resolve_tracking_uri,
            tracking_uri_setting,
        )

        tracking = self.app.tracking
        if tracking is not None and tracking.enabled:
            check_separate_stores(storage, resolve_tracking_uri(tracking))
        check_storage_url(storage)
        if tracking is not None and tracking.enabled:
            check_tracking_uri(resolve_tracking_uri(tracking), tracking_uri_setting(tracking))
        if self.app.study is not None:
            try:
                build_pruner(self.app.study)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None

    def _check_configs(self, space: SearchSpace) -> None:
        """Compose the trial config at every edge of every swept value (one value moved at a
        time) and, where the task function can, check it: before the study or any run
        exists."""
        assert self.hydra_context is not None and self.config is not None
        check = (self.task_function.check_config
                 if isinstance(self.task_function, ChecksConfig) else None)
        base = {name: corner_values(d)[0] for name, d in space.distributions.items()}
        variants = [base] + [
            {**base, name: value}
            for name, d in space.distributions.items() for value in corner_values(d)[1:]
        ]
        for values in variants:
            overrides = space.fixed + [f"{k}={override_value(v)}" for k, v in values.items()]
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            if check is None:
                continue
            try:
                check(cfg)
            except ValueError as exc:
                swept = ", ".join(f"{k}={v}" for k, v in values.items())
                raise ConfigError(
                    f"{exc}" + (f" (with the swept values {swept})" if swept else "")
                ) from None

    def _check_devices(self, arguments: list[str]) -> None:
        """The devices the workers will be pinned to exist on this host: ``hardware=gpu_fast``
        on a machine without CUDA is one line naming it, before the study exists (it used to
        create the study and fail every trial, exit 0)."""
        from zsharp_sweeps.training.device import hardware_choice, resolve_device

        hardware = self.app.hardware
        if self.devices:
            for device in self.devices:
                if device.split(":")[0] in ("cuda", "mps"):
                    try:
                        resolve_device(device)
                    except ConfigError as exc:
                        raise ConfigError(f"hydra.sweeper.devices={self.devices}: {exc}") from None
        elif hardware is not None and hardware.device != "auto":
            resolve_device(hardware.device, chosen_by=hardware_choice(arguments))

    def _warn_recipe_conflicts(self, space: SearchSpace) -> None:
        """A warning for each swept number whose range excludes the value the composed config
        (the model's recipe: ``model=vit`` brings Adam at lr 1e-3) gives it: an SGD lr range
        forced on Adam makes every trial diverge. A warning, not a refusal: exploring beyond
        a recipe is a sweep's right, as with any Optuna sweeper."""
        assert self.config is not None
        choices = self.config.hydra.runtime.choices if "runtime" in self.config.hydra else {}
        recipe = ", ".join(f"{g}={choices[g]}" for g in ("model", "optimizer")
                           if choices and choices.get(g))
        for name, distribution in space.distributions.items():
            key = name.lstrip("+~")
            value = OmegaConf.select(self.config, key, default=None, throw_on_missing=False)
            if excludes(distribution, value):
                line = getattr(self, "_space_lines", {}).get(name)
                log.warning(
                    f"{key}: the swept range {line or distribution} excludes the recipe's "
                    f"value {key}={value}" + (f" ({recipe})" if recipe else "")
                    + ": if the recipe is right, every trial may diverge or stay at chance "
                    "(sweep configs follow the recipe by themselves: study.spaces)")

    # ----- the study ---------------------------------------------------------------------
    def _open_study(self, storage: str, stop: StopRequest | None = None) -> optuna.Study:
        from zsharp_sweeps.sweep.storage import open_storage
        from zsharp_sweeps.tracking.locks import sqlite_init_lock

        directions = self._directions()
        for attempt in range(5):
            try:
                # SQLite: serialise the first touch; a server database (hosts started
                # together) may see another host's half-made schema: retry after it.
                with sqlite_init_lock(storage), (stop.deferred() if stop is not None
                                                  else contextlib.nullcontext()):
                    rdb = open_storage(storage, heartbeat_interval=self.heartbeat_interval,
                                       grace_period=self.grace_period,
                                       max_retry=self.max_retry)
                    study = optuna.create_study(
                        study_name=self.study_name or "study", storage=rdb,
                        directions=directions, load_if_exists=True,
                    )
                break
            except sqlalchemy.exc.DBAPIError as exc:
                if attempt == 4:
                    raise
                log.info(f"Storage busy being created elsewhere ({type(exc).__name__}): retrying")
                time.sleep(1.0 + attempt)
        stored = [d.name.lower() for d in study.directions]
        if stored != directions:
            raise ConfigError(
                f"hydra.sweeper.direction={directions} but study {study.study_name!r} in "
                f"{storage} was created with {stored}: allowed {stored} for this study, or a "
                "new hydra.sweeper.study_name"
            )
        return study

    def _check_resume(self, study: optuna.Study, space: SearchSpace) -> None:
        """A rerun of a study runs its new trials with the settings and the search space of
        the earlier ones (``zsharp_sweeps.sweep.resume``): stored at the study's creation,
        compared on every rerun, a difference refused in one line before any trial starts,
        unless ``hydra.sweeper.allow_changed_settings=true`` accepts it. A space Optuna
        cannot take next to the study's trials is refused in any case."""
        assert self.config is not None
        new_study = f"a new study: hydra.sweeper.study_name={study.study_name}-2 (or another name)"
        clash = incompatible(study, space.distributions)
        if clash:
            raise ConfigError(
                f"the search space of study {study.study_name!r} changed in a way Optuna cannot "
                f"resume ({'; '.join(clash)}): rerun with its earlier space, or start {new_study}")
        settings = fixed_settings(self.config, space.distributions)
        swept = space_settings(space.distributions)
        old_settings = study.user_attrs.get(SETTINGS_ATTR)
        old_space = study.user_attrs.get(SPACE_ATTR)
        changed = []
        if old_settings is not None:
            changed += differences(old_settings, settings)
        if old_space is not None:
            changed += differences(old_space, swept, "search space ")
        if changed and not self.allow_changed_settings:
            raise ConfigError(
                f"study {study.study_name!r} ran its {len(study.trials)} trial(s) with other "
                f"settings ({'; '.join(changed)}): rerun with the same settings to resume, start "
                f"{new_study}, or accept the change with hydra.sweeper.allow_changed_settings=true")
        if changed:
            log.warning(f"Study {study.study_name}: resumed with changed settings "
                        f"(hydra.sweeper.allow_changed_settings=true): {'; '.join(changed)}")
            self.accepted_changes = changed
        if old_settings is None:
            study.set_user_attr(SETTINGS_ATTR, settings)
        if old_space is None:
            study.set_user_attr(SPACE_ATTR, swept)

    def _trials_per_device(self) -> int:
        return self.app.hardware.trials_per_gpu if self.app.hardware else 1

    def _devices(self) -> list[str]:
        if self.devices:
            return self.devices
        hardware = self.app.hardware
        if hardware is None:
            return ["cpu"]
        if hardware.device in ("auto", "cuda"):
            import torch

            # device_count asks NVML: the workers may still be forked after this
            # (zsharp_sweeps.training.device.cuda_available says why is_available is not used)
            count = torch.cuda.device_count()
            if count:
                return [f"cuda:{i}" for i in range(count)]
        return [hardware.device]

    # ----- mlflow ------------------------------------------------------------------------
    def _tracker(self) -> Tracker:
        return Tracker(self.app.tracking or TrackingConfig(enabled=False))

    def _parent_run(self, tracker: Tracker, study: optuna.Study, space: SearchSpace,
                    sampler_name: str) -> str | None:
        """The study's MLflow parent run: created once, reopened by resumes and other hosts."""
        if not tracker.enabled:
            return None
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id is not None and tracker.reopen(run_id):
            return run_id
        key = _study_key(self._storage_url(), study.study_name)
        run_id = tracker.start(
            run_name=f"sweep {study.study_name}",
            tags={"sweep": "true", "study_name": study.study_name, "study_key": key},
        )
        # Hosts started together may each have created one: all keep the oldest.
        chosen = tracker.oldest_running({"study_key": key}) or run_id
        if chosen != run_id:
            tracker.discard(run_id)
            tracker.reopen(chosen)
            study.set_user_attr(PARENT_RUN_ATTR, chosen)
            return chosen
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        params = {
            "study_name": study.study_name,
            "sampler": sampler_name,
            "directions": ",".join(d.name.lower() for d in study.directions),
            **{f"space.{k}": repr(v) for k, v in space.distributions.items()},
            **{f"fixed.{o.split('=', 1)[0]}": o.split("=", 1)[-1] for o in space.fixed},
        }
        tracker.log_params(params)
        return run_id

    def _finish_parent(self, tracker: Tracker, study: optuna.Study, status: str,
                       report: list[Path]) -> None:
        if not tracker.enabled or tracker.run_id is None:
            return
        state = progress(study)
        counts = {"complete": state.complete, "pruned": state.pruned, "fail": state.failed}
        tags = {f"trials_{k}": str(v) for k, v in counts.items()}
        tags["n_trials"] = str(self.n_trials)
        tags["storage"] = self._storage_url()
        metrics = {f"n_{k}": float(v) for k, v in counts.items()}
        if len(study.directions) == 1 and state.complete:
            best = study.best_trial
            metrics["best_value"] = float(best.value)
            tags["best_trial"] = str(best.number)
            tags.update({f"best.{override_param_key(k)}": str(v) for k, v in best.params.items()})
        best_trial = int(tags["best_trial"]) if "best_trial" in tags else None
        tags.update(self._log_trials_table(tracker, best_trial))
        tracker.set_tags(tags)
        tracker.log_metrics(metrics, step=state.finished)
        for path in report:
            tracker.log_artifact(path, "report")
        tracker.end(status)

    def _publish_view(self, tracker: Tracker, study: optuna.Study, space: SearchSpace,
                      objectives: list[str]) -> None:
        """The MLflow page of this sweep's trials, best first (``tracking/view.py``)."""
        if not tracker.enabled or tracker.run_id is None:
            return
        self.view = SweepView(
            parent_run_id=tracker.run_id, objective=objectives[0] if objectives else None,
            maximize=study.directions[0] == optuna.study.StudyDirection.MAXIMIZE,
            params=[override_param_key(k) for k in space.distributions],
            name=f"sweep {study.study_name}",
            curve=EPOCH_METRIC_OF_OBJECTIVE.get(objectives[0]) if objectives else None)
        try:  # a view is a convenience: it must not stop a sweep
            self.view_link = tracker.publish_view(self.view)
        except Exception as exc:
            log.warning(f"Could not save the MLflow view of the sweep: {exc!r}")

    def _log_trials_table(self, tracker: Tracker, best_trial: int | None) -> dict[str, str]:
        """The trials as an MLflow table artifact of the parent run (``trials.json``, best
        first) and the tag ``best_run_id``: the best complete trial's run."""
        if self.view is None:
            return {}
        try:
            rows, best = trials_table(tracker.child_runs(tracker.run_id), self.view,
                                      best_trial)
            tracker.log_table(rows, "trials.json")
        except Exception as exc:
            log.warning(f"Could not log the trials table to the parent run: {exc!r}")
            return {}
        return {"best_run_id": best} if best else {}

    def _write_report(self, study: optuna.Study, tracker: Tracker) -> list[Path]:
        """The end-of-sweep report (also without MLflow: it reads the study)."""
        from zsharp_sweeps.report import write_report

        out = Path(str(self.config.hydra.sweep.dir)) / "report"
        try:  # a report problem must not fail a finished sweep; say so and go on
            return list(write_report(study, out, tracker=tracker if tracker.enabled else None))
        except Exception as exc:
            log.warning(f"Could not write the sweep report to {out}: {exc!r}")
            return []

    # ----- the sweep ---------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.job is not None
        # One signal handler for the whole sweep, from its first check on: a Ctrl-C during
        # the set-up stops it before any worker has a job, wherever Python delivered it
        # (``StopRequest``); once the workers run, it asks them to stop.
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        stop = StopRequest(sweep_dir / f".stop-{socket.gethostname()}-{os.getpid()}")
        try:
            with stop.installed():
                self._set_up_and_sweep(arguments, stop)
        except KeyboardInterrupt as exc:  # Ctrl-C before the workers started, or a second one
            if isinstance(exc, Stopped):
                raise
            # Everything is recorded (the parent run, if any, ended KILLED).
            raise Stopped(int(getattr(exc, "signum", signal.SIGINT)),
                          "Sweep interrupted: rerun the same command to resume") from None

    def _set_up_and_sweep(self, arguments: list[str], stop: StopRequest) -> None:
        space, grid = self._search_space(arguments)
        if space.pinned:
            values = {line.split("=", 1)[0].lstrip("+~"): line for line in space.fixed}
            log.info("Pinned on the command line, not swept: "
                     + ", ".join(values.get(k.lstrip("+~"), k) for k in space.pinned))
        storage = self._storage_url()
        self._check_urls(storage)
        self._check_configs(space)
        self._check_devices(arguments)
        self._warn_recipe_conflicts(space)
        devices = self._devices()  # NVML only: CUDA must not start in this process yet
        # The launcher's worker processes start now (zsharp_workers: imports take seconds;
        # each then starts CUDA on its GPU), while the study and the MLflow parent run are
        # set up; they get the plans at launch.
        prestarting = isinstance(self.launcher, PrestartingLauncher) and self.n_jobs > 1
        if prestarting:
            labels = [device_for(devices, self._trials_per_device(), i)
                      for i in range(self.n_jobs)]
            self.launcher.prestart(self.n_jobs, preload=WORKER_MODULES,
                                   warm=functools.partial(prepin_slot, labels))
        try:
            self._sweep(storage, space, grid, stop, devices)
        finally:
            if prestarting:
                self.launcher.discard()

    def _sweep(self, storage: str, space: SearchSpace, grid: dict | None,
               stop: StopRequest, devices: list[str]) -> None:
        assert self.job is not None
        if sqlite_path(storage) is not None:
            sqlite_path(storage).parent.mkdir(parents=True, exist_ok=True)
        study = self._open_study(storage, stop)
        self._check_resume(study, space)
        objectives = self.app.objectives or []
        if len(objectives) != len(study.directions):
            objectives = []
        if study.metric_names is None and objectives:
            with optuna_experimental():
                study.set_metric_names(objectives)  # Optuna's plots and tables name them
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        make_sampler = sampler_factory(self._sampler_conf(), grid)
        sampler_name = type(make_sampler(None)).__name__
        seed = self._sampler_conf().get("seed")
        done = progress(study).finished
        size = (f"{self.n_trials} trials ({done} done, {max(self.n_trials - done, 0)} to go)"
                if done else f"{self.n_trials} trials")
        log.info(
            f"Study {study.study_name} in {storage} ({sampler_name}, seed {seed}): "
            f"{size}, {self.n_jobs} worker(s) on this host"
        )
        # MLflow opens (creates, migrates) its store: a Ctrl-C is acted on once it is done.
        with stop.deferred():
            tracker = self._tracker()
        status, error = "FAILED", None
        try:  # from here on the parent run ends KILLED/FAILED/FINISHED whatever happens
            with stop.deferred():  # a Ctrl-C here waits for the run to be recorded
                parent_run_id = self._parent_run(tracker, study, space, sampler_name)
                self._publish_view(tracker, study, space, objectives)
            if self.accepted_changes and tracker.enabled:
                tracker.set_tags({"allow_changed_settings": "true",
                                  "changed_settings": "; ".join(self.accepted_changes)[:4900]})
            study_pruner = self.app.study
            self.job.study = StudyPlan(
                study_name=study.study_name, storage=storage, n_trials=self.n_trials,
                max_failure_rate=self.max_failure_rate, space=space.distributions,
                fixed_overrides=space.fixed, make_sampler=make_sampler, sampler_seed=seed,
                directions=[d.name.lower() for d in study.directions],
                sweep_dir=str(sweep_dir),
                make_pruner=(functools.partial(build_pruner, study_pruner) if study_pruner
                             else optuna.pruners.NopPruner),
                objectives=objectives,
                epoch_metric=EPOCH_METRIC_OF_OBJECTIVE.get(objectives[0]) if objectives else None,
                parent_run_id=parent_run_id, heartbeat_interval=self.heartbeat_interval,
                grace_period=self.grace_period, max_retry=self.max_retry,
                custom_search_space_extender=self.custom_search_space_extender,
            )
            self.job.host = HostPlan(
                devices=devices,
                trials_per_device=self._trials_per_device(),
                main_pid=os.getpid(), stop_file=str(stop.stop_file),
                main_host=socket.gethostname(), device_uuids=gpu_uuids(devices),
                workers=max(1, self.n_jobs), share_cores=self.app.hardware is not None,
            )
            with stop.launching():  # a signal of the set-up stops the sweep here, at the latest
                returns = self._launch()
            error = self._worker_error(returns, study)
            # A worker in this process (n_jobs=1) receives the signal itself.
            stopped = [r.return_value["stopped"] for r in returns
                       if r.status == JobStatus.COMPLETED and r.return_value.get("stopped")]
            if stopped and stop.signum is None:
                stop.signum = stopped[0]
            status = "KILLED" if stop.signum else ("FAILED" if error else "FINISHED")
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            write = self.report if self.report is not None else self.app.tracking is not None
            report = (self._write_report(study, tracker)
                      if status == "FINISHED" and write else [])
            self._finish_parent(tracker, study, status, report)
            self._save_results(study)
            prune_checkpoints(study, sweep_dir, self.keep_checkpoints, status)
            self._summary(study, tracker, sweep_dir, status)
        if stop.signum:
            raise Stopped(stop.signum, "Sweep stopped: rerun the same command to resume")
        if error is not None:
            raise error

    def _worker_error(self, returns: list[JobReturn], study: optuna.Study
                      ) -> BaseException | None:
        """The error that makes the sweep fail, if any. A worker that died (its trial is
        retried by the others) only fails the sweep if the study was left unfinished."""
        from hydra_plugins.zsharp_workers_launcher.launcher import WorkerDied

        errors: list[BaseException] = []
        for ret in returns:
            if ret.status == JobStatus.FAILED:
                # Hydra prints "Error executing job with overrides: [...]" (the same for
                # every worker) before it raises: the error itself is reported below, once.
                try:
                    with contextlib.redirect_stderr(io.StringIO()):
                        ret.return_value  # noqa: B018  (raises the job's exception)
                except BaseException as exc:  # noqa: BLE001  the job's, whatever it was
                    errors.append(exc)
        died = [e for e in errors if isinstance(e, WorkerDied)]
        for exc in died:
            log.warning(f"{exc}: its trial was failed by the heartbeat and retried")
        others = [e for e in errors if not isinstance(e, WorkerDied)]
        if others:
            return others[0]
        if died and not progress(study).done(self.n_trials):
            return RuntimeError(
                f"{len(died)} worker(s) died and the study is unfinished "
                f"({progress(study).finished}/{self.n_trials}): rerun the command to resume"
            )
        return None

    def _launch(self) -> list[JobReturn]:
        """Start this host's workers through the configured launcher and wait for them."""
        assert self.job is not None and self.job.host is not None and self.job.study is not None
        host_plan = self.job.host = replace(self.job.host, launched_at=time.time())
        n_workers = host_plan.workers
        host = socket.gethostname()
        jobs = [
            [*self.job.study.fixed_overrides,
             f"hydra.sweep.subdir=workers/{host}-{os.getpid()}-{i}"]
            for i in range(n_workers)
        ]
        devices = ", ".join(host_plan.device_for(i) for i in range(n_workers))
        sweep_dir = self.job.study.sweep_dir
        log.info(f"Starting {n_workers} worker(s) on {devices}; logs in "
                 f"{sweep_dir}/workers/, one folder per trial in {sweep_dir}/")
        # The launchers log every job's overrides (here: the same for every worker) and
        # joblib's settings: not what a user wants to read once per worker.
        launcher_logs = [logging.getLogger(name) for name in
                         ("hydra_plugins.hydra_joblib_launcher",
                          "hydra_plugins.hydra_submitit_launcher",
                          "hydra._internal.core_plugins.basic_launcher")]
        levels = [lg.level for lg in launcher_logs]
        for lg in launcher_logs:
            lg.setLevel(logging.WARNING)
        try:
            return list(self.launcher.launch(jobs, initial_job_idx=0))
        finally:
            for lg, level in zip(launcher_logs, levels):
                lg.setLevel(level)

    def _summary(self, study: optuna.Study, tracker: Tracker, sweep_dir: Path,
                 status: str) -> None:
        state = progress(study)
        lines = [
            f"Sweep {status.lower()}: {state.finished}/{self.n_trials} trials "
            f"({state.complete} complete, {state.pruned} pruned, {state.failed} failed)"
        ]
        if len(study.directions) == 1 and state.complete:
            best = study.best_trial
            lines.append(f"  best value {best.value:.4f}: trial {best.number} {best.params}")
        from zsharp_sweeps.report import at_chance

        chance = at_chance(counted_trials(study.get_trials(deepcopy=False)))
        if chance:
            lines.insert(1, f"  {chance}")
        lines.append(f"  results: {sweep_dir / 'optimization_results.yaml'}")
        if (sweep_dir / "report").exists():
            lines.append(f"  report:  {sweep_dir / 'report'}")
        if tracker.enabled and tracker.run_id:
            lines.append(f"  MLflow:  parent run {tracker.run_id} in {tracker.uri}")
            if self.view_link:
                lines.append(f"  trials, best first: {self.view_link} (make ui serves it)")
        log.info("\n".join(lines))

    def _save_results(self, study: optuna.Study) -> None:
        complete = [t for t in counted_trials(study.get_trials(deepcopy=False))
                    if t.state == TrialState.COMPLETE]
        if not complete:
            log.warning("No trial completed: no best parameters to report")
            return
        if len(study.directions) == 1:
            best = study.best_trial
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
        else:
            results = {
                "name": "optuna",
                "solutions": [{"params": t.params, "values": t.values} for t in study.best_trials],
            }
        path = Path(str(self.config.hydra.sweep.dir))
        path.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), path / "optimization_results.yaml")
