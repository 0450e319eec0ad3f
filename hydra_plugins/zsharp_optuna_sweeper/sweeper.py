"""Hydra's Optuna sweeper, run as long-lived workers that pull trials from the study.

What it keeps from ``hydra_plugins.hydra_optuna_sweeper``: every setting users know
(``n_trials``, ``n_jobs``, ``storage``, ``study_name``, ``sampler``, ``direction``,
``params``, ``max_failure_rate``, ``custom_search_space``) and its search-space parsing.
What it changes (see ``zsharp_sweeps/sweep/worker.py`` for the worker side):

- **Workers, not batches.** The launcher (joblib on one host, submitit on SLURM) starts
  ``n_jobs`` workers, each pinned to one device (worker *i* on
  ``devices[(i // hardware.trials_per_gpu) % len(devices)]``). Each asks the study for a
  trial as soon as it is free: no batch barrier, data and kernels stay warm.
- **Resume.** ``n_trials`` is the size of the study: rerunning the same command continues
  it. By default the study lives in ``<sweep dir>/optuna.db``. The same command on another
  host, with an RDB ``storage`` URL, adds workers to the same study.
- **Faults.** Optuna's heartbeat notices a dead worker on any host; its trial becomes FAIL
  and a copy is enqueued (``RetryFailedTrialCallback``). SIGINT/SIGTERM stop the workers
  cleanly: their trials FAIL and are retried on resume, their MLflow runs end KILLED.
- **Seeds.** A sampler seed gives each trial its own derived seed: the study is reproducible
  and never repeats a configuration across resumes or workers.
- **Failures** count over the study: the sweep stops once more than
  ``max_failure_rate * n_trials`` trials failed.
- **Checks first.** The storage URL, the tracking URI and the config (with every edge of
  every swept value) are validated before anything is created.
- **MLflow.** One parent run per study (search space, sampler, directions; the best value
  and parameters when done); each trial's run is nested under it and named after it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from zsharp_sweeps.config import ConfigError, section
from zsharp_sweeps.sweep.lifecycle import StopRequest
from zsharp_sweeps.sweep.placement import gpu_uuids
from zsharp_sweeps.sweep.progress import counted_trials, progress
from zsharp_sweeps.sweep.quiet import optuna_experimental
from zsharp_sweeps.sweep.sampling import corner_values, override_value, sampler_factory
from zsharp_sweeps.sweep.worker import SweepPlan, WorkerJob, open_storage
from zsharp_sweeps.tracking import Tracker, override_param_key
from zsharp_sweeps.uris import absolute_sqlite_url, sqlite_path, sqlite_url

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


def _fail(message: str) -> None:
    """A setup error: one line naming the setting, exit code 2, nothing created."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class ZSharpOptunaSweeperImpl(OptunaSweeperImpl):
    """The stock implementation's parsing with a worker-based ``sweep``."""

    def __init__(self, *args: Any, sampler_conf: Any = None, heartbeat_interval: int = 10,
                 grace_period: int | None = None, max_retry: int = 3,
                 devices: list[str] | None = None, report: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.report = report
        self.sampler_conf = sampler_conf
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period or 3 * heartbeat_interval
        self.max_retry = max_retry
        self.devices = list(devices) if devices else None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        # What the stock setup sets, except that the launcher runs workers (``WorkerJob``),
        # not the task function: it is instantiated once, here, with the plan filled in at
        # launch.
        self.job_idx = 0
        self.config, self.hydra_context = config, hydra_context
        self.sweep_dir = config.hydra.sweep.dir
        self.task_function = task_function
        self.job = WorkerJob()
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
            _fail(str(cause))

    # ----- set-up ------------------------------------------------------------------------
    def _storage_url(self) -> str:
        if self.storage:
            return absolute_sqlite_url(str(self.storage))
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        return sqlite_url(sweep_dir / "optuna.db")

    def _search_space(self, arguments: list[str]) -> tuple[dict, list[str], dict | None]:
        """(distributions, the sweep's fixed overrides verbatim, the grid or None)."""
        lines = self._parse_sweeper_params_config() + list(arguments)
        space, fixed_params, _ = create_params_from_overrides(lines)
        parsed = OverridesParser.create().parse_overrides(lines)
        fixed = [o.input_line for o in parsed if o.get_key_element() not in space]
        grid = None
        is_grid = (
            isinstance(self.sampler, functools.partial)
            and self.sampler.func == optuna.samplers.GridSampler
        )
        if is_grid:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()}
            size = 1
            for choices in grid.values():
                size *= len(choices)
            self.n_trials = min(self.n_trials, size)
        return space, fixed, grid

    def _check_configs(self, space: dict, fixed: list[str]) -> None:
        """Compose and validate the trial config at every edge of every swept value (one
        value moved at a time) before the study or any run exists."""
        from hydra import compose

        from zsharp_sweeps.config import validate

        base = {name: corner_values(d)[0] for name, d in space.items()}
        variants = [base] + [
            {**base, name: value}
            for name, d in space.items() for value in corner_values(d)[1:]
        ]
        for values in variants:
            overrides = fixed + [f"{k}={override_value(v)}" for k, v in values.items()]
            try:
                validate(compose(config_name=self._config_name(), overrides=overrides))
            except ConfigError as exc:
                swept = ", ".join(f"{k}={v}" for k, v in values.items())
                _fail(f"{exc}" + (f" (with the swept values {swept})" if swept else ""))

    def _config_name(self) -> str:
        return str(self.config.hydra.job.config_name)

    def _check_urls(self, storage: str) -> None:
        from zsharp_sweeps.sweep.storage import check_storage_url
        from zsharp_sweeps.tracking import (
            check_tracking_uri,
            resolve_tracking_uri,
            tracking_uri_setting,
        )

        try:
            check_storage_url(storage)
            tracking = section(self.config, "tracking")
            if tracking.enabled:
                check_tracking_uri(resolve_tracking_uri(tracking), tracking_uri_setting(tracking))
        except ConfigError as exc:
            _fail(str(exc))

    def _open_study(self, storage: str) -> optuna.Study:
        from zsharp_sweeps.locks import sqlite_init_lock
        from zsharp_sweeps.sweep.trial import build_pruner

        directions = [d.lower() for d in self._get_directions()]
        for attempt in range(5):
            try:
                # SQLite: serialise the first touch; a server database (hosts started
                # together) may see another host's half-made schema: retry after it.
                with sqlite_init_lock(storage):
                    rdb = open_storage(storage, heartbeat_interval=self.heartbeat_interval,
                                       grace_period=self.grace_period,
                                       max_retry=self.max_retry)
                    study = optuna.create_study(
                        study_name=self.study_name or "study", storage=rdb,
                        pruner=build_pruner(section(self.config, "study")),
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
            _fail(
                f"hydra.sweeper.direction={directions} but study {study.study_name!r} in "
                f"{storage} was created with {stored}: allowed {stored} for this study, or a "
                "new hydra.sweeper.study_name"
            )
        return study

    def _devices(self) -> list[str]:
        if self.devices:
            return self.devices
        hardware = section(self.config, "hardware")
        if hardware.device in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available():
                return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return [hardware.device]

    # ----- mlflow ------------------------------------------------------------------------
    def _parent_run(self, tracker: Tracker, study: optuna.Study, space: dict,
                    fixed: list[str]) -> str | None:
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
        chosen = self._oldest_parent(tracker, key) or run_id
        if chosen != run_id:
            tracker.discard(run_id)
            tracker.reopen(chosen)
            study.set_user_attr(PARENT_RUN_ATTR, chosen)
            return chosen
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        params = {
            "study_name": study.study_name,
            "sampler": self.sampler_name,
            "directions": ",".join(d.name.lower() for d in study.directions),
            **{f"space.{k}": repr(v) for k, v in space.items()},
            **{f"fixed.{o.split('=', 1)[0]}": o.split("=", 1)[-1] for o in fixed},
        }
        tracker.log_params(params)
        return run_id

    @staticmethod
    def _oldest_parent(tracker: Tracker, key: str) -> str | None:
        """The first parent run created for this new study (ties: the smallest id). Only
        RUNNING ones: a finished sweep of an older study with the same name is not this one."""
        from mlflow.tracking import MlflowClient

        runs = MlflowClient(tracker.uri).search_runs(
            [tracker.experiment_id],
            filter_string=f"tags.study_key = '{key}' and attributes.status = 'RUNNING'",
        )
        if not runs:
            return None
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id

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
        tracker.set_tags(tags)
        tracker.log_metrics(metrics, step=state.finished)
        for path in report:
            tracker.log_artifact(path, "report")
        tracker.end(status)

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
        assert self.config is not None
        self._process_searchspace_config()
        space, fixed, grid = self._search_space(arguments)
        storage = self._storage_url()
        self._check_urls(storage)
        self._check_configs(space, fixed)
        # The launcher's worker processes start now (zsharp_workers: imports take seconds),
        # while the study and the MLflow parent run are set up; they get the plan at launch.
        prestart = getattr(self.launcher, "prestart", None)
        if prestart is not None and self.n_jobs > 1:
            prestart(self.n_jobs, preload=WORKER_MODULES)
        try:
            self._sweep(storage, space, fixed, grid)
        except KeyboardInterrupt:  # Ctrl-C before the workers started, or a second one
            # Everything is recorded (the parent run, if any, ended KILLED): one line, no
            # traceback, the shell's exit status for SIGINT.
            print("Sweep interrupted: rerun the same command to resume", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
        finally:
            discard = getattr(self.launcher, "discard", None)
            if discard is not None:
                discard()

    def _sweep(self, storage: str, space: dict, fixed: list[str], grid: dict | None) -> None:
        if sqlite_path(storage) is not None:
            sqlite_path(storage).parent.mkdir(parents=True, exist_ok=True)

        study = self._open_study(storage)
        objectives = list(self.config.get("objectives", ["best_val_acc"]))
        if study.metric_names is None and len(objectives) == len(study.directions):
            with optuna_experimental():
                study.set_metric_names(objectives)  # Optuna's plots and tables name them
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        make_sampler = sampler_factory(OmegaConf.to_container(self.sampler_conf), grid)
        self.sampler_name = type(make_sampler(None)).__name__
        seed = self.sampler_conf.get("seed") if self.sampler_conf is not None else None
        log.info(
            f"Study {study.study_name} in {storage} ({self.sampler_name}, seed {seed}): "
            f"{self.n_trials} trials, {self.n_jobs} worker(s) on this host"
        )
        tracker = Tracker(section(self.config, "tracking"))
        hardware = section(self.config, "hardware")
        devices = self._devices()  # before the parent run: CUDA's start can take seconds
        device_uuids = gpu_uuids(devices)
        stop = StopRequest(str(sweep_dir / f".stop-{socket.gethostname()}-{os.getpid()}"))
        status, error = "FAILED", None
        try:  # from here on the parent run ends KILLED/FAILED/FINISHED whatever happens
            parent_run_id = self._parent_run(tracker, study, space, fixed)
            plan = SweepPlan(
                study_name=study.study_name, storage=storage, n_trials=self.n_trials,
                max_failure_rate=self.max_failure_rate, space=space, fixed_overrides=fixed,
                make_sampler=make_sampler, sampler_seed=seed,
                study=section(self.config, "study"), objectives=objectives,
                config_name=self._config_name(), sweep_dir=str(sweep_dir),
                devices=devices, device_uuids=device_uuids,
                trials_per_device=hardware.trials_per_gpu,
                main_pid=os.getpid(), stop_file=str(stop.stop_file),
                main_host=socket.gethostname(),
                parent_run_id=parent_run_id, heartbeat_interval=self.heartbeat_interval,
                grace_period=self.grace_period, max_retry=self.max_retry,
                custom_search_space_extender=self.custom_search_space_extender,
                host_workers=max(1, self.n_jobs),
            )
            with stop.installed():
                returns = self._launch(plan)
            error = self._worker_error(returns, study)
            # A worker in this process (n_jobs=1) receives the signal itself.
            stopped = [r.return_value["stopped"] for r in returns
                       if r.status.name == "COMPLETED" and r.return_value.get("stopped")]
            if stopped and stop.signum is None:
                stop.signum = stopped[0]
            status = "KILLED" if stop.signum else ("FAILED" if error else "FINISHED")
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            report = (self._write_report(study, tracker)
                      if status == "FINISHED" and self.report else [])
            self._finish_parent(tracker, study, status, report)
            self._save_results(study)
            self._summary(study, tracker, sweep_dir, status)
        if stop.signum:
            sys.exit(stop.exit_code)
        if error is not None:
            raise error

    def _worker_error(self, returns: list, study: optuna.Study) -> BaseException | None:
        """The error that makes the sweep fail, if any. A worker that died (its trial is
        retried by the others) only fails the sweep if the study was left unfinished."""
        from hydra_plugins.zsharp_workers_launcher.launcher import WorkerDied

        errors = [r._return_value for r in returns if r.status.name == "FAILED"]
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

    def _launch(self, plan: SweepPlan) -> list:
        """Start this host's workers through the configured launcher and wait for them."""
        n_workers = plan.host_workers
        plan = self.job.plan = dataclasses.replace(plan, launched_at=time.time())
        host = socket.gethostname()
        jobs = [
            [*plan.fixed_overrides, f"hydra.sweep.subdir=workers/{host}-{os.getpid()}-{i}"]
            for i in range(n_workers)
        ]
        devices = ", ".join(plan.device_for(i) for i in range(n_workers))
        log.info(f"Starting {n_workers} worker(s) on {devices}; logs in "
                 f"{plan.sweep_dir}/workers/, one folder per trial in {plan.sweep_dir}/")
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
        lines.append(f"  results: {sweep_dir / 'optimization_results.yaml'}")
        if (sweep_dir / "report").exists():
            lines.append(f"  report:  {sweep_dir / 'report'}")
        if tracker.enabled and tracker.run_id:
            lines.append(f"  MLflow:  parent run {tracker.run_id} in {tracker.uri} (make ui)")
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


class ZSharpOptunaSweeper(OptunaSweeper):
    """``hydra/sweeper=zsharp_optuna``: the stock plugin with ``ZSharpOptunaSweeperImpl``."""

    def __init__(self, *, heartbeat_interval: int = 10, grace_period: int | None = None,
                 max_retry: int = 3, devices: list[str] | None = None, report: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        stock = self.sweeper
        self.sweeper = ZSharpOptunaSweeperImpl(
            stock.sampler, stock.direction, stock.storage, stock.study_name, stock.n_trials,
            stock.n_jobs, stock.max_failure_rate, None, stock.params,
            sampler_conf=kwargs.get("sampler"), heartbeat_interval=heartbeat_interval,
            grace_period=grace_period, max_retry=max_retry, devices=devices, report=report,
        )
        self.sweeper.custom_search_space_extender = stock.custom_search_space_extender

