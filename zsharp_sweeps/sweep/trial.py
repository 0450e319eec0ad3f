"""The trial side of a sweep: report each epoch to Optuna and stop when the pruner says so.

Hydra's Optuna sweeper asks Optuna for parameters and only tells the final value (hydra
issue 1954: no pruning). Here a sweep worker runs each trial in-process with the trial's
own handle: validation accuracy is reported after every epoch and ``Pruned`` raised when
the study's pruner decides, which ``study.optimize`` records as PRUNED.
"""

from __future__ import annotations

import importlib

import optuna

from zsharp_sweeps.config import StudyConfig


class Pruned(optuna.TrialPruned):
    """Raised inside training when the pruner stops the trial; MLflow records it KILLED."""

    mlflow_status = "KILLED"
    run_state = "PRUNED"


def build_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    """The Optuna pruner named by ``study.pruner``, with its settings."""
    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.pruner_warmup_epochs
        )
    if cfg.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=cfg.pruner_min_resource, reduction_factor=cfg.pruner_reduction_factor
        )
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.pruner_min_resource, reduction_factor=cfg.pruner_reduction_factor
        )
    module_name, _, class_name = cfg.pruner.rpartition(".")
    try:
        pruner_cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"study.pruner={cfg.pruner!r}: cannot import it ({exc})") from exc
    pruner = pruner_cls()
    if not isinstance(pruner, optuna.pruners.BasePruner):
        raise ValueError(f"study.pruner={cfg.pruner!r} is not an optuna BasePruner subclass")
    return pruner


# The per-epoch metric that tracks each objective (what the pruner compares across trials).
EPOCH_METRIC_OF_OBJECTIVE = {
    "best_val_acc": "val_acc",
    "final_val_acc": "val_acc",
    "final_val_loss": "val_loss",
    "sharpness/sam": "sharpness/sam",
    "sharpness/hessian_top_eig": "sharpness/hessian_top_eig",
    "sharpness/hessian_trace": "sharpness/hessian_trace",
}


class TrialReporter:
    """An ``on_epoch_end`` callback bound to one live Optuna trial (the worker's handle).

    It reports ``metric``, the epoch metric behind the study's (first) objective
    (``EPOCH_METRIC_OF_OBJECTIVE``), so the pruner compares like with like. Optuna does not
    prune multi-objective studies; there it only records the intermediate values.
    """

    def __init__(self, trial: optuna.Trial, metric: str, n_objectives: int) -> None:
        self.metric = metric
        self.trial = trial
        self.single_objective = n_objectives == 1

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.metric not in metrics or not self.single_objective:
            return
        value = metrics[self.metric]
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            raise Pruned(
                f"trial {self.trial.number} pruned at epoch {epoch} ({self.metric}={value:.4f})"
            )
