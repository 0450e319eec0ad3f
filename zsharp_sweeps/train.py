"""The training entry point: ``python -m zsharp_sweeps.train optimizer=zsharp model=vit``.

Thin on purpose (docs/architecture.md): compose and validate the config, build data, model and
optimizer from it, run the fit loop inside one MLflow run, return the objective as a
float so Hydra's Optuna sweeper can use it. ``run_training`` is the same without Hydra.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from zsharp_sweeps.training.build import build_parts, check_graphable
from zsharp_sweeps.training.checkpoint import Checkpointer, checkpoint_dir_for, prepare_resume
from zsharp_sweeps.config import (
    ConfigError,
    TrainConfig,
    register_configs,
    section,
    validate,
)
from zsharp_sweeps.data import DatasetUnavailableError, ensure_available
from zsharp_sweeps.training.engine import EpochCallback, fit
from zsharp_sweeps.training.health import learning_problem
from zsharp_sweeps.metrics.sharpness import compute_sharpness
from zsharp_sweeps.plots import plot_curves
from zsharp_sweeps.training.signals import exit_code, graceful_stop
from zsharp_sweeps.training.context import DataCache, TrialContext
from zsharp_sweeps.sweep.trial import TrialReporter
from zsharp_sweeps.tracking import Tracker, flatten, git_commit, overrides_as_params

log = logging.getLogger(__name__)

# An absolute path: the same whether this runs as ``__main__`` or as an imported module.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

register_configs()


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is missing is an error.

    A sweep worker passes its own device (``cuda:N``, or ``cpu:N``: a CPU worker's label).
    """
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"hardware.device={requested!r} but CUDA is not available on this machine: "
            "allowed here: auto, cpu"
        )
    if requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
        raise ConfigError(
            f"hardware.device={requested!r} but this machine has {torch.cuda.device_count()} "
            f"CUDA device(s): allowed cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
        )
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("hardware.device='mps' but MPS is not available: allowed here: auto, cpu")
    return torch.device(requested)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def _sharpness_fn(cfg: TrainConfig, data):
    """Sharpness metrics due at an epoch, on fixed un-augmented training batches."""
    scfg = cfg.sharpness
    if not (scfg.sam or scfg.hessian_top_eig or scfg.hessian_trace):
        return None
    batches = data.fixed_batches(scfg.num_batches, scfg.batch_size)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets)

    def measure(model: torch.nn.Module, epoch: int, is_last: bool) -> dict[str, float]:
        sam_due = scfg.sam and (epoch % scfg.sam_every == 0 or is_last)
        return compute_sharpness(
            model, loss_fn, batches,
            sam_rho=scfg.rho if sam_due else None,
            top_eig=scfg.hessian_top_eig and is_last,
            trace=scfg.hessian_trace and is_last,
            eig_iters=scfg.eig_iters, eig_tol=scfg.eig_tol, trace_samples=scfg.trace_samples,
        )

    return measure


def default_run_name(cfg: TrainConfig) -> str:
    """``tracking.run_name``, else ``<optimizer>-<model>-<dataset>``."""
    return cfg.tracking.run_name or f"{cfg.optimizer.name}-{cfg.model.name}-{cfg.data.name}"


def identity_tags(cfg: TrainConfig) -> dict[str, str]:
    """The tags the MLflow UI filters and groups runs by."""
    return {"optimizer": cfg.optimizer.name, "model": cfg.model.name, "dataset": cfg.data.name}


def run_training(
    cfg: DictConfig | TrainConfig,
    *,
    overrides: Sequence[str] = (),
    callbacks: Sequence[EpochCallback] = (),
    parent_run_id: str | None = None,
    run_tags: dict[str, str] | None = None,
    run_name: str | None = None,
    device: str | None = None,
    device_label: str | None = None,
    data_cache: DataCache | None = None,
    new_run_on_resume: bool = False,
) -> dict[str, float]:
    """Validate, build, fit and record one training run; returns the summary metrics.

    Validation happens before anything is built or any MLflow run is opened, so a bad
    value costs nothing and leaves nothing half-written. A sweep worker passes its
    ``device``, the name the sweep gives it (``device_label``, the run's ``device`` tag) and
    its warm ``data_cache``.
    """
    train_cfg = cfg if isinstance(cfg, TrainConfig) else validate(cfg)
    torch_device = resolve_device(device or train_cfg.hardware.device)
    device_label = device_label or device or train_cfg.hardware.device
    check_graphable(train_cfg.hardware, torch_device)
    if train_cfg.data.val_size == 0:
        raise ConfigError(
            "data.val_size=0 leaves no validation split, but the objective and best_val_acc are "
            "measured on it (the test set is never tuned on): allowed data.val_size >= 1"
        )
    if torch_device.type == "cuda" and torch_device.index is not None:
        # Streams, CUDA graphs and cuDNN work on the *current* device: make it this run's.
        torch.cuda.set_device(torch_device)
    if train_cfg.hardware.num_threads:
        torch.set_num_threads(train_cfg.hardware.num_threads)
    return _run_training(
        train_cfg, torch_device, device_label, overrides=overrides, callbacks=callbacks,
        parent_run_id=parent_run_id, run_tags=run_tags, run_name=run_name,
        data_cache=data_cache, new_run_on_resume=new_run_on_resume,
    )


def _run_training(
    train_cfg: TrainConfig,
    device: torch.device,
    device_label: str,
    *,
    overrides: Sequence[str],
    callbacks: Sequence[EpochCallback],
    parent_run_id: str | None,
    run_tags: dict[str, str] | None,
    run_name: str | None,
    data_cache: DataCache | None,
    new_run_on_resume: bool,
) -> dict[str, float]:
    resolved = OmegaConf.to_container(OmegaConf.structured(train_cfg), resolve=True)
    # trainer.resume is checked (path, config) before any MLflow run is opened.
    resume = prepare_resume(train_cfg, resolved)
    checkpoint_dir = checkpoint_dir_for(train_cfg)
    # Files on disk (downloaded if allowed) before the MLflow run opens: a dataset that
    # cannot be had is one error line, not a FAILED run.
    ensure_available(train_cfg.data)

    tracker = Tracker(train_cfg.tracking)
    tags = {**identity_tags(train_cfg), "device": device_label if ":" in device_label
            else str(device), **(run_tags or {})}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    run_name = run_name or default_run_name(train_cfg)
    started = time.perf_counter()
    resume_run_id = resume.run_id if resume is not None else None
    if resume_run_id is not None and new_run_on_resume:
        # A sweep's retried trial: the killed attempt's run stays KILLED, this one links it.
        tags["resumed_from"] = resume_run_id
        resume_run_id = None
    parent_run_id = parent_run_id or train_cfg.tracking.parent_run_id
    with tracker.run(run_name=run_name, tags=tags, parent_run_id=parent_run_id,
                     resume_run_id=resume_run_id):
        # Resumed into its own run: params and config are there already (and params cannot
        # change); only the remaining epochs get logged, so each epoch appears once.
        reopened = resume_run_id is not None and tracker.run_id == resume_run_id
        if reopened:
            tracker.set_tags({"resumed_after_epoch": str(resume.epoch)})
        else:
            tracker.log_params(flatten(resolved))
            tracker.log_text(OmegaConf.to_yaml(resolved), "config/resolved.yaml")
            tracker.log_text("\n".join(overrides) + "\n", "config/overrides.txt")

        seed_everything(train_cfg.seed, train_cfg.hardware.deterministic)
        data = data_cache.get(train_cfg.data, device, train_cfg.seed) if data_cache else None
        data, model, optimizer = build_parts(train_cfg, device, data=data)
        tracker.log_params(
            {
                "num_params": sum(p.numel() for p in model.parameters()),
                "num_train": data.num_train, "num_val": data.num_val, "num_test": data.num_test,
            }
        )

        def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
            tracker.log_metrics(metrics, step=epoch)

        if resume is not None and not reopened:  # a new run: it gets the earlier epochs too
            for row in resume.history:
                log_epoch(int(row["epoch"]), {k: v for k, v in row.items() if k != "epoch"})
        checkpointer = None
        if checkpoint_dir is not None:
            checkpointer = Checkpointer(
                checkpoint_dir, run_id=tracker.run_id, config=resolved,
                keep=train_cfg.trainer.keep_checkpoints,
            )
        # Data, model, optimizer and the run's params: what a warm sweep worker saves.
        setup_s = time.perf_counter() - started
        try:
            result = fit(
                model, optimizer, data, train_cfg,
                on_epoch_end=[log_epoch, *callbacks],
                sharpness_fn=_sharpness_fn(train_cfg, data),
                checkpointer=checkpointer,
                resume=resume.payload if resume is not None else None,
            )
        except BaseException as exc:  # a pruned trial is over: tidy as if it had finished
            if checkpointer is not None and getattr(exc, "run_state", None) == "PRUNED":
                checkpointer.finish()
            raise  # anything else keeps its checkpoints, to resume from
        problem = learning_problem(result.history, data.num_classes, data.num_val,
                                   data.num_train)
        if problem is not None:  # a run that did not learn says so (log and MLflow tag)
            log.warning("%s: %s", run_name, problem.message)
            tracker.set_tags({"learning": problem.verdict, "learning_warning": problem.message})
        last_sharpness = {
            k: v for k, v in result.history[-1].items() if k.startswith("sharpness/")
        }
        summary = {
            **result.summary, **last_sharpness, "train_time_s": time.perf_counter() - started,
            "setup_s": setup_s,
        }
        final = {
            k: v for k, v in summary.items()
            if not math.isnan(v) and not k.startswith("sharpness/")
        }
        tracker.log_metrics(final, step=train_cfg.trainer.epochs)
        if tracker.enabled:
            figure = plot_curves(result.history, title=run_name)
            tracker.log_figure(figure, "curves.png")
        summary["run_id"] = tracker.run_id  # type: ignore[assignment]
        # Every epoch, resumed ones included: what a sweep trial records for its analysis.
        summary["history"] = result.history  # type: ignore[assignment]
        if checkpointer is not None:
            checkpointer.finish(result.history)  # trainer.keep_checkpoints
    log.info(
        "done: %s best_val_acc=%.4f final_test_acc=%.4f in %.1fs%s",
        run_name, summary["best_val_acc"], summary["final_test_acc"], summary["train_time_s"],
        f" (MLflow run {tracker.run_id} in {tracker.uri})" if tracker.enabled else "",
    )
    return summary


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def run_experiment(
    cfg: TrainConfig, *, overrides: Sequence[str] = (), context: TrialContext | None = None
) -> dict[str, float]:
    """One configuration: a single run, or ``study.n_seeds`` runs whose summaries are averaged.

    Inside a sweep (``context`` given by the worker) the run is a child of the sweep's
    MLflow run, named after its trial, runs on the worker's device with its warm data,
    reports every epoch to its Optuna trial and stops when pruned. With several seeds, one
    MLflow run per configuration holds the per-epoch means and the mean +- std of the
    summary, and each seed is a run nested under it; pruning judges the first seed.
    """
    study = cfg.study
    tags: dict[str, str] = {}
    callbacks: list[EpochCallback] = []
    parent_run_id = device = device_label = data_cache = None
    name = default_run_name(cfg)
    if context is not None:
        tags = dict(context.tags)
        callbacks = [TrialReporter(context.trial, cfg.objectives[0], context.n_objectives),
                     *context.callbacks]
        parent_run_id, device, device_label, data_cache = (
            context.parent_run_id, context.compute_device or context.device, context.device,
            context.data_cache,
        )
        name = context.run_name
    if study.n_seeds == 1:
        return run_training(
            cfg, overrides=overrides, callbacks=callbacks, parent_run_id=parent_run_id,
            run_tags=tags, run_name=name if context else None, device=device,
            device_label=device_label, data_cache=data_cache,
            new_run_on_resume=context is not None,
        )

    tracker = Tracker(cfg.tracking)
    group_tags = {
        **tags, **identity_tags(cfg), "n_seeds": str(study.n_seeds),
    }
    group_name = name if context else f"{name}-x{study.n_seeds}seeds"
    with tracker.run(run_name=group_name, tags=group_tags,
                     parent_run_id=parent_run_id or cfg.tracking.parent_run_id):
        resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        tracker.log_params(flatten(resolved))
        histories: list[list[dict[str, float]]] = []
        summaries: list[dict[str, float]] = []
        for i in range(study.n_seeds):
            seed_cfg = replace(cfg, seed=cfg.seed + i)
            history: list[dict[str, float]] = []
            summaries.append(run_training(
                seed_cfg, overrides=overrides,
                callbacks=[*(callbacks if i == 0 else []),
                           lambda epoch, m, h=history: h.append(dict(m))],
                parent_run_id=tracker.run_id, run_tags={**tags, "seed": str(cfg.seed + i)},
                run_name=f"{name} seed={cfg.seed + i}", device=device,
                device_label=device_label, data_cache=data_cache,
                new_run_on_resume=context is not None,
            ))
            histories.append(history)
        for epoch_idx in range(cfg.trainer.epochs):
            keys = histories[0][epoch_idx].keys()
            tracker.log_metrics(
                {k: float(np.mean([h[epoch_idx][k] for h in histories])) for k in keys},
                step=epoch_idx + 1,
            )
        summary: dict[str, float] = {}
        for key in summaries[0]:
            if key in ("run_id", "history"):
                continue
            mean, std = _mean_std([s[key] for s in summaries])
            summary[key], summary[f"{key}_std"] = mean, std
        tracker.log_metrics(
            {k: v for k, v in summary.items() if not math.isnan(v)}, step=cfg.trainer.epochs
        )
        summary["run_id"] = tracker.run_id  # type: ignore[assignment]
    return summary


def objective_values(cfg: TrainConfig, summary: dict[str, float]) -> float | tuple[float, ...]:
    """What the sweeper optimises: one float, or a tuple for a multi-objective study."""
    values = tuple(float(summary[name]) for name in cfg.objectives)
    return values[0] if len(values) == 1 else values


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def record_rejected_trial(
    cfg: DictConfig, overrides: Sequence[str], error: Exception, context: TrialContext
) -> None:
    """A sweep trial whose config is invalid still gets its (FAILED) MLflow child run."""
    try:
        tracking = section(cfg, "tracking")
    except Exception:  # the tracking section itself is broken: nothing to record into
        return
    if not tracking.enabled:
        return
    tracker = Tracker(tracking)
    try:
        with tracker.run(run_name=f"{context.run_name} (rejected)", tags=context.tags,
                         parent_run_id=context.parent_run_id):
            tracker.log_params(overrides_as_params(overrides))
            raise error
    except ConfigError:
        pass


# No version_base: Hydra 1.4 deprecates the argument (it warned on every command, --help too).
@hydra.main(config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | tuple[float, ...]:
    """Hydra's task function: one training run; returns the objective(s) for the sweeper.

    Bad input (a setting, the tracking store, a dataset that cannot be had or whose files
    do not fit) ends with one line on stderr and exit status 2. SIGTERM (kill, SLURM,
    docker stop) and Ctrl-C end the MLflow run KILLED and the process with status
    128 + the signal number.
    """
    try:
        # Acted on between training steps, so no MLflow write is cut in half (a second
        # signal stops at once): see zsharp_sweeps.training.signals.graceful_stop.
        with graceful_stop():
            train_cfg = validate(cfg)
            summary = run_experiment(train_cfg, overrides=_task_overrides())
    except (ConfigError, DatasetUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        print(f"stopped ({exc or 'Ctrl-C'}): the run ends KILLED", file=sys.stderr)
        sys.exit(exit_code(exc))
    return objective_values(train_cfg, summary)


if __name__ == "__main__":
    # Run the copy imported under the package name, not this ``__main__`` module: launchers
    # (joblib/loky, submitit) pickle the task function by reference, which needs a module
    # other processes can import.
    from zsharp_sweeps.train import main as entry_point

    entry_point()
