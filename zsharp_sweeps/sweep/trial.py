"""The trial side of a sweep: report each epoch to Optuna and stop when the pruner says so.

Hydra's Optuna sweeper asks Optuna for parameters and only tells the final value (hydra
issue 1954: no pruning). Here the training process re-opens the trial in the shared study
storage by number, reports validation accuracy after every epoch and raises ``Pruned``
when the study's pruner decides; the sweeper then records the trial as PRUNED.
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


class StudyReporter:
    """An ``on_epoch_end`` callback bound to one trial of a stored study.

    It reports the epoch metric behind the study's (first) objective, oriented like that
    objective, so the pruner compares like with like. Optuna does not prune
    multi-objective studies; there it only records the intermediate values.
    """

    def __init__(self, cfg: StudyConfig, objective: str) -> None:
        if cfg.name is None or cfg.storage is None or cfg.trial_number is None:
            raise ValueError("StudyReporter needs study.name, study.storage and study.trial_number")
        self.metric = EPOCH_METRIC_OF_OBJECTIVE[objective]
        self.study = optuna.load_study(
            study_name=cfg.name, storage=cfg.storage, pruner=build_pruner(cfg)
        )
        trial_id = self.study._storage.get_trial_id_from_study_id_trial_number(
            self.study._study_id, cfg.trial_number
        )
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.single_objective = len(self.study.directions) == 1

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.metric not in metrics or not self.single_objective:
            return
        value = metrics[self.metric]
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            raise Pruned(
                f"trial {self.trial.number} pruned at epoch {epoch} ({self.metric}={value:.4f})"
            )
