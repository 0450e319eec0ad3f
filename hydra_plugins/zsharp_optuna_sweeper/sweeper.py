"""Hydra's Optuna sweeper, extended where zsharp-sweeps needs more than it gives.

What it adds to ``hydra_plugins.hydra_optuna_sweeper`` (whose search-space parsing, trial
configuration and sampler handling it reuses unchanged):

- **Resume.** ``n_trials`` is the size of the study, not the number of trials to add:
  rerunning the same command with the same ``study_name`` and storage continues it. By
  default the study lives in ``<sweep dir>/optuna.db``. Trials left RUNNING by a killed
  sweep on this host are marked FAIL (``interrupted``) and their parameters re-enqueued.
- **Pruning** (hydra issue 1954). Each trial learns its study, storage and number through
  ``study.*`` overrides; the training process reports per-epoch metrics and raises
  ``Pruned``; here that becomes TrialState.PRUNED instead of a failure.
- **GPU slots.** Each trial of a parallel batch gets ``study.slot=i``; the trainer maps it
  to ``cuda:(i // hardware.trials_per_gpu) % n_gpus``.
- **MLflow.** One parent run per study (search space, sampler, directions; the best value
  and parameters when done); each trial's run is nested under it. The parent run's id is
  stored in the study, so resumed sweeps and parallel workers share it.
- Several workers (processes or hosts) may run the same command against one RDB storage:
  each re-counts the finished trials before every batch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobStatus
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from zsharp_sweeps.config import section
from zsharp_sweeps.tracking import Tracker, override_param_key

log = logging.getLogger(__name__)

WORKER_ATTR = "zsharp:worker"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
INTERRUPTED_ATTR = "interrupted"


def _sqlite_absolute(url: str) -> str:
    """Trials run in other processes: make a relative sqlite path absolute."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        return prefix + str(Path(url[len(prefix) :]).resolve())
    return url


def _quote(value: Any) -> str:
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _counts_toward_study(trial: optuna.trial.FrozenTrial) -> bool:
    if trial.state == TrialState.WAITING:
        return False
    return not trial.user_attrs.get(INTERRUPTED_ATTR, False)


class ZSharpOptunaSweeperImpl(OptunaSweeperImpl):
    """The stock implementation with a resumable, prunable, tracked ``sweep`` loop."""

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.worker = {"host": socket.gethostname(), "pid": os.getpid()}

    # ----- study -------------------------------------------------------------------------
    def _storage_url(self) -> str:
        if self.storage:
            return _sqlite_absolute(str(self.storage))
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{sweep_dir / 'optuna.db'}"

    def _recover_interrupted(self, study: optuna.Study) -> list[int]:
        """Trials left RUNNING by a dead sweep process on this host: FAIL them, retry them."""
        recovered = []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = trial.system_attrs.get(WORKER_ATTR)
            if not worker or worker.get("host") != self.worker["host"]:
                continue
            if _pid_alive(int(worker["pid"])):
                continue
            study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED_ATTR, True)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            recovered.append(trial.number)
        if recovered:
            log.info(f"Resuming: trials {recovered} were interrupted; re-enqueued their params")
        return recovered

    # ----- mlflow ------------------------------------------------------------------------
    def _parent_run(self, tracker, study: optuna.Study, space: dict, fixed: dict) -> str | None:
        """The study's MLflow parent run: created once, reopened by resumes and other workers."""
        if not tracker.enabled:
            return None
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        client = tracker._client
        if run_id is not None:
            with contextlib.suppress(Exception):
                client.update_run(run_id, status="RUNNING")
                tracker.run_id = run_id
                return run_id
        run = client.create_run(
            tracker.experiment_id,
            run_name=f"sweep-{study.study_name}",
            tags={"sweep": "true", "study_name": study.study_name},
        )
        tracker.run_id = run.info.run_id
        study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
        params = {
            "study_name": study.study_name,
            "sampler": type(study.sampler).__name__,
            "directions": ",".join(d.name.lower() for d in study.directions),
            **{f"space.{override_param_key(k)}": repr(v) for k, v in space.items()},
            **{f"fixed.{override_param_key(k)}": v for k, v in fixed.items()},
        }
        tracker.log_params(params)
        return run.info.run_id

    def _finish_parent(self, tracker, study: optuna.Study, status: str) -> None:
        if not tracker.enabled or tracker.run_id is None:
            return
        trials = study.get_trials(deepcopy=False)
        counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
        tags = {
            f"trials_{k}": str(v) for k, v in counts.items() if k in ("complete", "pruned", "fail")
        }
        tags["n_trials"] = str(self.n_trials)
        tags["storage"] = self._storage_url()
        metrics = {
            f"n_{k}": float(v) for k, v in counts.items() if k in ("complete", "pruned", "fail")
        }
        if len(study.directions) == 1 and counts["complete"]:
            best = study.best_trial
            metrics["best_value"] = float(best.value)
            tags["best_trial"] = str(best.number)
            tags.update({f"best.{k}": str(v) for k, v in best.params.items()})
        tracker.set_tags(tags)
        tracker.log_metrics(metrics, step=len(trials))
        if status == "FINISHED":
            from zsharp_sweeps.report import write_report

            out = Path(str(self.config.hydra.sweep.dir)) / "report"
            try:  # a report problem must not fail a finished sweep; say so and go on
                for path in write_report(study, out, tracker=tracker):
                    tracker.log_artifact(path, "report")
            except Exception as exc:
                log.warning(f"Could not write the sweep report to {out}: {exc!r}")
        tracker._client.set_terminated(tracker.run_id, status=status)

    def _close_orphan_runs(self, tracker, study: optuna.Study, numbers: list[int]) -> None:
        """MLflow runs of interrupted trials that a hard kill left RUNNING: mark KILLED."""
        if not tracker.enabled or not numbers:
            return
        for number in numbers:
            runs = tracker._client.search_runs(
                [tracker.experiment_id],
                filter_string=(
                    f"tags.study_name = '{study.study_name}' and "
                    f"tags.trial_number = '{number}' and attributes.status = 'RUNNING'"
                ),
            )
            for run in runs:
                tracker._client.set_tag(run.info.run_id, "run_state", "KILLED")
                tracker._client.set_terminated(run.info.run_id, status="KILLED")

    # ----- the loop ----------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        is_grid = (
            isinstance(self.sampler, functools.partial)
            and self.sampler.func == optuna.samplers.GridSampler
        )
        space, fixed_params, fixed_overrides = create_params_from_overrides(params_conf)
        if is_grid:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()}
            self.sampler = self.sampler(grid)
            size = 1
            for choices in grid.values():
                size *= len(choices)
            self.n_trials = min(self.n_trials, size)
        for name in fixed_params:
            space.pop(name, None)

        storage = self._storage_url()
        study_cfg = section(self.config, "study")
        from zsharp_sweeps.locks import sqlite_init_lock
        from zsharp_sweeps.sweep import build_pruner

        with sqlite_init_lock(storage):  # parallel workers may start on a new database
            study = optuna.create_study(
                study_name=self.study_name or "study",
                storage=storage,
                sampler=self.sampler,
                pruner=build_pruner(study_cfg),
                directions=self._get_directions(),
                load_if_exists=True,
            )
        log.info(f"Study {study.study_name} in {storage} ({type(self.sampler).__name__})")
        interrupted = self._recover_interrupted(study)
        tracker = Tracker(section(self.config, "tracking"))
        parent_run_id = self._parent_run(tracker, study, space, fixed_params)
        self._close_orphan_runs(tracker, study, interrupted)

        status = "FAILED"
        try:
            self._run_batches(study, storage, parent_run_id, space, fixed_params, fixed_overrides)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self._finish_parent(tracker, study, status)
        self._save_results(study)

    def _run_batches(
        self,
        study: optuna.Study,
        storage: str,
        parent_run_id: str | None,
        space: dict,
        fixed_params: dict,
        fixed_overrides: list[str],
    ) -> None:
        while True:
            done = sum(_counts_toward_study(t) for t in study.get_trials(deepcopy=False))
            remaining = self.n_trials - done
            if remaining <= 0:
                log.info(f"Study {study.study_name} has {done}/{self.n_trials} trials: done")
                return
            batch = min(self.n_jobs, remaining)
            trials = [study.ask() for _ in range(batch)]
            for trial in trials:
                study._storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, self.worker)
            overrides = self._configure_trials(trials, space, fixed_params, fixed_overrides)
            overrides = [
                tuple(ov)
                + (
                    f"study.name={_quote(study.study_name)}",
                    f"study.storage={_quote(storage)}",
                    f"study.trial_number={trial.number}",
                    f"study.slot={slot}",
                    *([f"study.parent_run_id={parent_run_id}"] if parent_run_id else []),
                )
                for slot, (trial, ov) in enumerate(zip(trials, overrides))
            ]
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            failures = self._tell(study, trials, returns)
            if returns and len(failures) / len(returns) > self.max_failure_rate:
                log.error(
                    f"{len(failures)} of {len(returns)} trials failed "
                    f"(max_failure_rate={self.max_failure_rate})"
                )
                for ret in returns:
                    ret.return_value  # noqa: B018  re-raises the job's exception

    def _tell(self, study: optuna.Study, trials: list, returns: list) -> list[BaseException]:
        from zsharp_sweeps.sweep import Pruned

        failures: list[BaseException] = []
        n_objectives = len(study.directions)
        for trial, ret in zip(trials, returns):
            if ret.status == JobStatus.FAILED:
                error = ret._return_value
                if isinstance(error, (Pruned, optuna.TrialPruned)):
                    study.tell(trial, state=TrialState.PRUNED)
                    log.info(f"Trial {trial.number} pruned")
                    continue
                study.tell(trial, state=TrialState.FAIL)
                log.warning(f"Trial {trial.number} failed: {error!r}")
                failures.append(error)
                continue
            try:
                value = ret.return_value
                values = [float(v) for v in value] if n_objectives > 1 else [float(value)]
                if len(values) != n_objectives:
                    raise ValueError(f"expected {n_objectives} objective values, got {values}")
            except (TypeError, ValueError) as exc:
                study.tell(trial, state=TrialState.FAIL)
                log.warning(f"Trial {trial.number} returned a bad value: {exc}")
                failures.append(exc)
                continue
            study.tell(trial, values=values)
        return failures

    def _save_results(self, study: optuna.Study) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            log.warning("No trial completed: no best parameters to report")
            return
        if len(study.directions) == 1:
            best = study.best_trial
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
            log.info(f"Best parameters: {best.params}")
            log.info(f"Best value: {best.value}")
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

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        stock = self.sweeper
        self.sweeper = ZSharpOptunaSweeperImpl(
            stock.sampler,
            stock.direction,
            stock.storage,
            stock.study_name,
            stock.n_trials,
            stock.n_jobs,
            stock.max_failure_rate,
            None,
            stock.params,
        )
        self.sweeper.custom_search_space_extender = stock.custom_search_space_extender
