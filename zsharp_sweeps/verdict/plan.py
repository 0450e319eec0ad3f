"""From settings to sweeps: each arm's tuning sweep and retraining sweep, as the exact
``python -m zsharp_sweeps.train --multirun ...`` command lines a user could run by hand.

Why stages are ordinary sweeps: they inherit everything sweeps already do (workers on every
GPU of a host, other hosts joining through one storage, SLURM, heartbeats, retries from
checkpoints, resume, MLflow nesting), and a verdict's stage can be inspected, reported and
rerun with the tools people already know.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from zsharp_sweeps.config import ConfigError, TrainConfig, validate
from zsharp_sweeps.sweep.sampling import corner_values, override_value, parse_search_space
from zsharp_sweeps.tracking.uris import absolute_sqlite_url, sqlite_url
from zsharp_sweeps.verdict.settings import VerdictConfig

#: Override keys the verdict sets itself, per arm and stage: a command-line value for them
#: would be silently replaced, so it is refused with the setting to use instead.
OWNED = {
    "optimizer": "verdict.optimizers (the arms) and verdict.arms.<arm>",
    "seed": "verdict.tune.seed and verdict.final.seeds",
    "study.pruner": "verdict.tune.pruner",
    "study.n_seeds": "verdict.final.seeds",
    "objectives": "nothing: a verdict maximises best_val_acc",
}
#: Settings that may differ on a resume (where and how fast, not what is measured).
RESOURCE_KEYS = ("hardware.trials_per_gpu", "hardware.num_threads", "hardware.device")


@dataclass(frozen=True)
class Stage:
    """One sweep of the verdict: ``kind`` is ``tune`` or ``final``."""

    kind: str
    arm: str
    study_name: str
    n_trials: int
    sweep_dir: str
    overrides: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.kind}.{self.arm}"

    def command(self, python: str) -> list[str]:
        return [python, "-m", "zsharp_sweeps.train", "--multirun", *self.overrides]


@dataclass(frozen=True)
class ArmPlan:
    """An arm's tuning sweep; its final sweep needs the tuning's best parameters."""

    name: str
    tune: Stage
    base_overrides: tuple[str, ...]
    space: dict[str, str]

    def final(self, settings: VerdictConfig, common: Sequence[str], best: dict[str, Any],
              final_epochs: int, storage: str, root: Path, verdict_name: str) -> Stage:
        seeds = ", ".join(str(s) for s in settings.final.seeds)
        chosen = [f"{k}={override_value(v)}" for k, v in best.items()]
        study = f"{verdict_name}.final.{self.name}"
        launcher = launcher_overrides(common)
        common = [line for line in common if not is_launcher(line)]
        return Stage(
            kind="final", arm=self.name, study_name=study, n_trials=len(settings.final.seeds),
            sweep_dir=str(root / f"final-{self.name}"),
            overrides=tuple([
                *common, *self.base_overrides, *chosen, f"trainer.epochs={final_epochs}",
                "study.pruner=none", f"seed=choice({seeds})",
                *_sweeper(study, storage, len(settings.final.seeds), settings.n_jobs, "grid",
                          settings.tune.sampler_seed, str(root / f"final-{self.name}"),
                          launcher),
                *_tracking(verdict_name, "final", self.name),
            ]),
        )


def _sweeper(study: str, storage: str, n_trials: int, n_jobs: int, sampler: str,
             sampler_seed: int, sweep_dir: str, launcher: Sequence[str] = ()) -> list[str]:
    """The stage's sweeper settings; ``launcher``: the user's launcher overrides (e.g.
    ``+launcher=slurm hydra.launcher.partition=gpu``), else one host's workers."""
    return [
        "hydra/sweeper=zsharp_optuna", f"hydra/sweeper/sampler={sampler}",
        f"hydra.sweeper.sampler.seed={sampler_seed}",
        *(launcher or ["hydra/launcher=zsharp_workers"]),
        "hydra.sweeper.direction=maximize", f"hydra.sweeper.study_name={study}",
        f"hydra.sweeper.storage={override_value(storage)}", f"hydra.sweeper.n_trials={n_trials}",
        f"hydra.sweeper.n_jobs={n_jobs}", "hydra.sweeper.report=false",
        # A diverging trial is a result of tuning, not a broken sweep; a failed final run is
        # named by the analysis (its seed does not pair).
        "hydra.sweeper.max_failure_rate=0.5",
        f"hydra.sweep.dir={override_value(sweep_dir)}", "hydra.sweep.subdir=${hydra.job.num}",
    ]


def _tracking(verdict: str, stage: str, arm: str) -> list[str]:
    """Tags that let the MLflow UI filter a verdict's runs by stage and arm (the runner adds
    ``tracking.parent_run_id``: the verdict's run exists only once the plan is checked)."""
    return [f"++tracking.tags.verdict={override_value(verdict)}",
            f"++tracking.tags.verdict_stage={stage}", f"++tracking.tags.verdict_arm={arm}"]


def is_launcher(line: str) -> bool:
    """``launcher=slurm``, ``hydra/launcher=...``, ``hydra.launcher.partition=gpu``: where the
    stages' workers run, passed on to every stage's sweep."""
    key = override_key(line)
    return key in ("launcher", "hydra/launcher") or key.startswith("hydra.launcher.")


def launcher_overrides(common: Sequence[str]) -> list[str]:
    """The launcher part of the command line as a stage's sweep takes it (the ``launcher``
    group is not in the training config's defaults: ``+launcher=...``)."""
    out = []
    for line in common:
        if not is_launcher(line):
            continue
        out.append("+" + line.lstrip("+") if override_key(line) == "launcher" else line)
    return out


def override_key(line: str) -> str:
    """``+a.b=1`` -> ``a.b``; ``hydra/sweeper=x`` -> ``hydra/sweeper``."""
    return line.split("=", 1)[0].lstrip("+~")


def training_overrides(task_overrides: Sequence[str], settings: VerdictConfig) -> list[str]:
    """The command line's training overrides (``data=``, ``model=``, ``hardware.*``...), with
    the keys the verdict owns refused and ``trainer.epochs`` kept for the final stage."""
    swept = {key for arm in settings.arms_compared.values() for key in arm.space}
    swept.add("optimizer.lr")
    out = []
    for line in task_overrides:
        key = override_key(line)
        if is_launcher(line):
            out.append(line)
            continue
        if key == "verdict" or key.startswith("verdict.") or key.startswith("hydra"):
            continue
        owner = OWNED.get(key) or (OWNED["optimizer"] if key == "optimizer" else None)
        if owner is None and key in swept:
            owner = "verdict.arms.<arm>.space or verdict.lr_space (it is tuned)"
        if owner is not None:
            raise ConfigError(f"{line} is set by the verdict: use {owner}")
        out.append(line)
    return out


def storage_url(settings: VerdictConfig) -> str:
    if settings.storage:
        return absolute_sqlite_url(settings.storage)
    return sqlite_url(Path(settings.dir).resolve() / "optuna.db")


def _grid_size(space: dict[str, str]) -> int:
    distributions = parse_search_space([f"{k}={v}" for k, v in space.items()]).distributions
    return math.prod(len(corner_values(d)) for d in distributions.values())


def _arm_base(arm_name: str, settings: VerdictConfig) -> list[str]:
    arm = settings.arms[arm_name]
    return [f"optimizer={arm.optimizer}", *arm.overrides]


def _compose(overrides: Sequence[str]) -> DictConfig:
    from hydra import compose

    return compose(config_name="config", overrides=list(overrides))


def _validated(overrides: Sequence[str], where: str) -> TrainConfig:
    try:
        return validate(_compose(overrides))
    except ConfigError as exc:
        raise ConfigError(f"{exc} ({where})") from None
    except Exception as exc:  # Hydra's composition errors: unknown option, key, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{first} ({where})") from None


def check_space_corners(base: Sequence[str], space: dict[str, str], where: str) -> None:
    """Compose and validate the arm's config at every edge of every swept value (one moved
    at a time), as the sweeper does, before any study or run exists."""
    try:
        distributions = parse_search_space([f"{k}={v}" for k, v in space.items()]).distributions
    except Exception as exc:
        raise ConfigError(f"{where}: search space {space} does not parse: {exc}") from None
    corners = {name: corner_values(d) for name, d in distributions.items()}
    first = {name: values[0] for name, values in corners.items()}
    variants = [first] + [{**first, name: v} for name, values in corners.items()
                          for v in values[1:]]
    for values in variants:
        _validated([*base, *(f"{k}={override_value(v)}" for k, v in values.items())],
                   f"{where} with " + ", ".join(f"{k}={v}" for k, v in values.items()))


def build_plan(settings: VerdictConfig, common: Sequence[str],
               storage: str) -> tuple[list[ArmPlan], int]:
    """Every arm's tuning stage, each checked at the corners of its space; and the final
    stage's epochs. Raises ``ConfigError`` (one line) for anything that would fail later."""
    root = Path(settings.dir).resolve()
    plans = []
    final_epochs = settings.final.epochs
    launcher = launcher_overrides(common)
    common = [line for line in common if not is_launcher(line)]
    for name in settings.optimizers:
        base = [*common, *_arm_base(name, settings)]
        composed = _validated(base, f"verdict arm {name}")
        if final_epochs is None:
            final_epochs = composed.trainer.epochs
        lr = settings.lr_space.get(composed.optimizer.base_name)
        if lr is None:
            raise ConfigError(
                f"verdict.lr_space has no range for optimizer.base={composed.optimizer.base_name} "
                f"(arm {name}): allowed bases here: {', '.join(settings.lr_space)}"
            )
        space = {"optimizer.lr": lr, **settings.arms[name].space}
        tune_fixed = [*base, f"trainer.epochs={settings.tune.epochs}", "sharpness=none",
                      f"seed={settings.tune.seed}", f"study.pruner={settings.tune.pruner}"]
        check_space_corners(tune_fixed, space, f"verdict arm {name}")
        n_trials = settings.tune.trials
        if settings.tune.sampler == "grid":
            n_trials = min(n_trials, _grid_size(space))
        study = f"{settings.name}.tune.{name}"
        sweep_dir = str(root / f"tune-{name}")
        tune = Stage(
            kind="tune", arm=name, study_name=study, n_trials=n_trials, sweep_dir=sweep_dir,
            overrides=tuple([
                *tune_fixed,
                *_sweeper(study, storage, n_trials, settings.n_jobs, settings.tune.sampler,
                          settings.tune.sampler_seed, sweep_dir, launcher),
                *_tracking(settings.name, "tune", name),
                *(f"{k}={v}" for k, v in space.items()),
            ]),
        )
        plans.append(ArmPlan(name=name, tune=tune, base_overrides=tuple(_arm_base(name, settings)),
                             space=space))
    assert final_epochs is not None
    return plans, final_epochs


def fingerprint(settings: VerdictConfig, common: Sequence[str],
                plans: Sequence[ArmPlan], final_epochs: int) -> dict[str, Any]:
    """What the verdict's results depend on: a resume with other values would mix settings.
    Resources (workers, devices, concurrency, the reference) may change."""
    measured = [line for line in common
                if override_key(line) not in RESOURCE_KEYS and not is_launcher(line)]
    return {
        "protocol": settings.protocol,
        "training": sorted(measured),
        "tune": {"trials": settings.tune.trials, "epochs": settings.tune.epochs,
                 "sampler": settings.tune.sampler, "sampler_seed": settings.tune.sampler_seed,
                 "pruner": settings.tune.pruner, "seed": settings.tune.seed},
        "final": {"seeds": list(settings.final.seeds), "epochs": final_epochs},
        "arms": {p.name: {"overrides": list(p.base_overrides), "space": dict(p.space)}
                 for p in plans},
    }


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs; arms only in ``new`` are
    additions (allowed), not differences."""
    out = []
    for key in sorted(set(old) | set(new)):
        if prefix == "arms." and key not in old:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out
