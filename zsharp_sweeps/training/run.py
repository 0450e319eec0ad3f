"""One configuration, trained and recorded: a single run, or ``study.n_seeds`` of them.

``check_config`` checks what the schema cannot (the model's parameters against its
constructor, split sizes against the dataset) without the machine; ``run_experiment`` then
checks what needs the machine (device, dataset files, tracking store, checkpoint to resume),
still before any MLflow run opens, builds data, model and optimizer, fits, and records the
run. Everything that is not a setting comes in a :class:`RunContext`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from zsharp_sweeps.config import ConfigError, TrainConfig, flatten, section, validate
from zsharp_sweeps.data import ensure_available, get_spec
from zsharp_sweeps.metrics.sharpness import compute_sharpness
from zsharp_sweeps.tracking import Tracker, git_commit, overrides_as_params
from zsharp_sweeps.training.build import build_parts, check_graphable
from zsharp_sweeps.training.checkpoint import (
    Checkpointer,
    Resume,
    checkpoint_dir_for,
    prepare_resume,
)
from zsharp_sweeps.training.context import RunContext
from zsharp_sweeps.training.curves import plot_curves
from zsharp_sweeps.training.device import (
    hardware_choice,
    resolve_device,
    seed_everything,
    use_device,
)
from zsharp_sweeps.training.engine import fit
from zsharp_sweeps.training.hardware import resolve_hardware
from zsharp_sweeps.training.health import chance_band, learning_advice, learning_problem

log = logging.getLogger(__name__)


# ----- checks before anything exists ----------------------------------------------------
def data_shape(cfg: TrainConfig) -> dict[str, int]:
    """The dataset's ``in_channels``, ``num_classes`` and ``image_size`` (what the model is
    sized to), from the dataset table: nothing is loaded."""
    data = cfg.data
    spec = get_spec(data.synthetic_like if data.name == "synthetic" else data.name)
    return {"in_channels": spec.in_channels, "num_classes": spec.num_classes,
            "image_size": data.image_size or spec.image_size}


def check_config(cfg: TrainConfig) -> None:
    """What the schema cannot check, checked without the machine and without loading data:
    the model's name and every ``model.params`` value (the model is built on the meta device,
    so its constructor's own checks run and nothing is allocated), and the split sizes
    against the dataset's official size. Raises ``ConfigError`` naming the setting."""
    from zsharp_sweeps.models import build_model

    if cfg.data.val_size == 0:
        raise ConfigError(
            "data.val_size=0 leaves no validation split, but the objective and best_val_acc are "
            "measured on it (the test set is never tuned on): allowed data.val_size >= 1"
        )
    data = cfg.data
    n_train = data.synthetic_size if data.name == "synthetic" else get_spec(data.name).train_images
    if data.val_size >= n_train:
        raise ConfigError(
            f"data.val_size={data.val_size} is invalid: allowed < {n_train}, the number of "
            f"training images of {data.name}."
        )
    with torch.device("meta"):
        build_model(cfg.model, **data_shape(cfg))


@dataclass
class Prepared:
    """A run's config with the context applied, and what the checks found."""

    cfg: TrainConfig
    device: torch.device
    resume: Resume | None
    resolved: dict[str, Any]
    #: Tags the checks add to the run (e.g. what ``hardware=auto`` chose and why).
    tags: dict[str, str]


def prepare(cfg: TrainConfig, context: RunContext) -> Prepared:
    """Every check that needs the machine, before any MLflow run opens: the device, the
    CUDA-graph preconditions, the checkpoint to resume from, the dataset's files (downloaded
    if allowed). A bad value costs nothing and leaves nothing half-written."""
    check_config(cfg)
    device = resolve_device(context.device or cfg.hardware.device,
                            None if context.device else hardware_choice(context.overrides))
    # hardware=auto -> concrete values for this device (logged; tags record why)
    cfg, hardware_tags = resolve_hardware(cfg, device)
    check_graphable(cfg.hardware, device)
    if context.checkpoint_dir is not None:
        cfg = replace(cfg, trainer=replace(cfg.trainer, checkpoint_dir=str(context.checkpoint_dir)))
    resume = None
    if context.resume_from is not None and Path(context.resume_from).is_dir():
        # A retried sweep trial continues where its dead attempt stopped, if it trained the
        # same thing; otherwise it starts over and says why.
        candidate = replace(cfg, trainer=replace(cfg.trainer, resume=str(context.resume_from)))
        try:
            resume = prepare_resume(candidate, _resolved(candidate))
            cfg = candidate
        except ConfigError as exc:
            log.warning(f"{context.run_name or 'run'} starts at epoch 1: {exc}")
    else:
        resume = prepare_resume(cfg, _resolved(cfg))
    # Files on disk (downloaded if allowed) before the MLflow run opens: a dataset that
    # cannot be had is one error line, not a FAILED run.
    ensure_available(cfg.data)
    return Prepared(cfg, device, resume, _resolved(cfg), hardware_tags)


def _resolved(cfg: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


# ----- one run ---------------------------------------------------------------------------
def sharpness_fn(cfg: TrainConfig, data):
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


def run_training(cfg: DictConfig | TrainConfig, context: RunContext | None = None
                 ) -> dict[str, Any]:
    """Check, build, fit and record one training run; returns the summary metrics (with
    ``run_id`` and the per-epoch ``history``)."""
    context = context or RunContext()
    train_cfg = cfg if isinstance(cfg, TrainConfig) else validate(cfg)
    prepared = prepare(train_cfg, context)
    use_device(prepared.device, prepared.cfg.hardware.num_threads)
    return _run(prepared, context)


def _run(prepared: Prepared, context: RunContext) -> dict[str, Any]:
    cfg, device, resume, resolved = prepared.cfg, prepared.device, prepared.resume, prepared.resolved
    checkpoint_dir = checkpoint_dir_for(cfg)
    tracker = Tracker(cfg.tracking)
    if context.supersedes:
        tracker.end_running_runs(context.supersedes)
    label = context.device_label or context.device or cfg.hardware.device
    tags = {**identity_tags(cfg), "device": label if ":" in label else str(device),
            **prepared.tags, **context.tags}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    run_name = context.run_name or default_run_name(cfg)
    started = time.perf_counter()
    resume_run_id = resume.run_id if resume is not None else None
    if resume_run_id is not None and context.new_run_on_resume:
        # A sweep's retried trial: the killed attempt's run stays KILLED, this one links it.
        tags["resumed_from"] = resume_run_id
        resume_run_id = None
    parent_run_id = context.parent_run_id or cfg.tracking.parent_run_id
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
            tracker.log_text("\n".join(context.overrides) + "\n", "config/overrides.txt")

        seed_everything(cfg.seed, cfg.hardware.deterministic)
        data = (context.data_cache.get(cfg.data, device, cfg.seed)
                if context.data_cache is not None else None)
        data, model, optimizer = build_parts(cfg, device, data=data)
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
                keep=cfg.trainer.keep_checkpoints,
            )
        # Data, model, optimizer and the run's params: what a warm sweep worker saves.
        setup_s = time.perf_counter() - started
        try:
            result = fit(
                model, optimizer, data, cfg,
                on_epoch_end=[log_epoch, *context.callbacks],
                sharpness_fn=sharpness_fn(cfg, data),
                checkpointer=checkpointer,
                resume=resume.payload if resume is not None else None,
                log_prefix=context.log_prefix,
            )
        except BaseException as exc:  # a pruned trial is over: tidy as if it had finished
            if checkpointer is not None and getattr(exc, "run_state", None) == "PRUNED":
                checkpointer.finish()
            raise  # anything else keeps its checkpoints, to resume from
        problem = learning_problem(result.history, data.num_classes, data.num_val,
                                   data.num_train, advice=learning_advice(cfg))
        if problem is not None:  # a run that did not learn says so (log and MLflow tag)
            log.warning("%s: %s", run_name, problem.message)
            tracker.set_tags({"learning": problem.verdict, "learning_warning": problem.message})
        last_sharpness = {
            k: v for k, v in result.history[-1].items() if k.startswith("sharpness/")
        }
        summary: dict[str, Any] = {
            **result.summary, **last_sharpness, "train_time_s": time.perf_counter() - started,
            "setup_s": setup_s,
        }
        final = {
            k: v for k, v in summary.items()
            if not math.isnan(v) and not k.startswith("sharpness/")
        }
        tracker.log_metrics(final, step=cfg.trainer.epochs)
        if tracker.enabled:
            figure = plot_curves(result.history, title=run_name)
            tracker.log_figure(figure, "curves.png")
        summary["run_id"] = tracker.run_id
        # The accuracy below which this run's data cannot tell it from guessing: a sweep's
        # report says so when its best trial is below it (not an MLflow metric).
        summary["chance_acc"] = chance_band(data.num_classes, data.num_val or data.num_train)
        # Every epoch, resumed ones included: what a sweep trial records for its analysis.
        summary["history"] = result.history
        if checkpointer is not None:
            checkpointer.finish(result.history)  # trainer.keep_checkpoints
    log.info(
        "done: %s best_val_acc=%.4f final_test_acc=%.4f in %.1fs%s",
        run_name, summary["best_val_acc"], summary["final_test_acc"], summary["train_time_s"],
        f" (MLflow run {tracker.run_id} in {tracker.uri})" if tracker.enabled else "",
    )
    return summary


# ----- one configuration -----------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def run_experiment(cfg: TrainConfig, context: RunContext | None = None) -> dict[str, Any]:
    """One configuration: a single run, or ``study.n_seeds`` runs whose summaries are averaged.

    With several seeds, one MLflow run per configuration holds the per-epoch means and the
    mean +- std of the summary, and each seed is a run nested under it; the context's
    callbacks (a sweep's pruning) see the first seed. ``context.on_summary`` gets the summary.
    """
    context = context or RunContext()
    if cfg.study.n_seeds == 1:
        summary = run_training(cfg, context)
    else:
        summary = _run_seeds(cfg, context)
    for callback in context.on_summary:
        callback(summary)
    return summary


def _run_seeds(cfg: TrainConfig, context: RunContext) -> dict[str, Any]:
    n_seeds = cfg.study.n_seeds
    for i in range(n_seeds):  # every seed's checks before the group's run opens
        prepare(replace(cfg, seed=cfg.seed + i), context)
    tracker = Tracker(cfg.tracking)
    name = context.run_name or default_run_name(cfg)
    group_name = name if context.run_name else f"{name}-x{n_seeds}seeds"
    group_tags = {**context.tags, **identity_tags(cfg), "n_seeds": str(n_seeds)}
    with tracker.run(run_name=group_name, tags=group_tags,
                     parent_run_id=context.parent_run_id or cfg.tracking.parent_run_id):
        tracker.log_params(flatten(_resolved(cfg)))
        histories: list[list[dict[str, float]]] = []
        summaries: list[dict[str, Any]] = []
        for i in range(n_seeds):
            seed = cfg.seed + i
            history: list[dict[str, float]] = []
            seed_context = replace(
                context, parent_run_id=tracker.run_id, run_name=f"{name} seed={seed}",
                tags={**context.tags, "seed": str(seed)}, on_summary=[],
                callbacks=[*(context.callbacks if i == 0 else []),
                           lambda epoch, m, h=history: h.append(dict(m))],
            )
            summaries.append(run_training(replace(cfg, seed=seed), seed_context))
            histories.append(history)
        for epoch_idx in range(cfg.trainer.epochs):
            keys = histories[0][epoch_idx].keys()
            tracker.log_metrics(
                {k: float(np.mean([h[epoch_idx][k] for h in histories])) for k in keys},
                step=epoch_idx + 1,
            )
        summary: dict[str, Any] = {}
        for key in summaries[0]:
            if key in ("run_id", "history"):
                continue
            mean, std = _mean_std([s[key] for s in summaries])
            summary[key], summary[f"{key}_std"] = mean, std
        tracker.log_metrics(
            {k: v for k, v in summary.items() if not math.isnan(v)}, step=cfg.trainer.epochs
        )
        summary["run_id"] = tracker.run_id
    return summary


def objective_values(cfg: TrainConfig, summary: Mapping[str, Any]) -> float | tuple[float, ...]:
    """What a sweeper optimises: one float, or a tuple for a multi-objective study."""
    values = tuple(float(summary[name]) for name in cfg.objectives)
    return values[0] if len(values) == 1 else values


def record_rejected(cfg: DictConfig, context: RunContext, error: ConfigError) -> None:
    """A sweep trial whose config is invalid still gets its (FAILED) MLflow run, nested
    under the sweep's run, with the trial's overrides as params."""
    try:
        tracking = section(cfg, "tracking")
    except Exception:  # the tracking section itself is broken: nothing to record into
        return
    if not tracking.enabled:
        return
    tracker = Tracker(tracking)
    name = f"{context.run_name} (rejected)" if context.run_name else "rejected"
    try:
        with tracker.run(run_name=name, tags=context.tags,
                         parent_run_id=context.parent_run_id or tracking.parent_run_id):
            tracker.log_params(overrides_as_params(context.overrides))
            raise error
    except ConfigError:
        pass
