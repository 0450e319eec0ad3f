"""The verdict's settings (``conf/verdict/*.yaml``, ``verdict.*`` on the command line) and
their checks.

Why a schema of its own: a verdict is a protocol (who is compared, with which budget, on
which seeds), not a training setting. Keeping it apart from ``TrainConfig`` means every
training group and key still means exactly what it means to ``zsharp_sweeps.train``, and a
protocol mistake (a reference that is not compared, a final seed that tuning used) is one
line before any study or run exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from zsharp_sweeps.config import ConfigError

SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("none", "median", "successive_halving", "hyperband")


def _check(ok: bool, setting: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{setting}={value!r} is invalid: allowed {allowed}")


@dataclass
class ArmConfig:
    """One compared optimizer: its ``optimizer=`` option, fixed overrides that make it what
    it is (the random-filter control is ZSharp with ``optimizer.filter=random``) and its own
    search space beyond the learning rate (Hydra's Optuna-sweeper syntax)."""

    optimizer: str = MISSING
    overrides: list[str] = field(default_factory=list)
    space: dict[str, str] = field(default_factory=dict)


@dataclass
class TuneConfig:
    """Stage 1: every arm gets the same trial budget, epochs, sampler and pruner, judged on
    the validation split at one training seed (``seed``) that the final stage never uses."""

    trials: int = 16
    epochs: int = 10
    sampler: str = "tpe"
    sampler_seed: int = 0
    pruner: str = "hyperband"
    seed: int = 0


@dataclass
class FinalConfig:
    """Stage 2: each arm's best configuration (by validation) retrained on fresh seeds, the
    same seeds for every arm so that results pair by seed. ``epochs`` null: the training
    config's ``trainer.epochs``."""

    seeds: list[int] = field(default_factory=lambda: [100, 101, 102, 103, 104])
    epochs: int | None = None


@dataclass
class VerdictConfig:
    """A whole comparison; see docs/verdict.md."""

    protocol: str = "equal_budget"
    name: str = MISSING
    optimizers: list[str] = field(default_factory=lambda: ["sgd", "sam", "asam", "fsam",
                                                           "zsharp"])
    reference: str = "zsharp"
    arms: dict[str, ArmConfig] = field(default_factory=dict)
    # The learning-rate range by base optimizer (optimizer.base of the arm's composed
    # config): an SGD range for SGD, an Adam range for Adam.
    lr_space: dict[str, str] = field(default_factory=dict)
    tune: TuneConfig = field(default_factory=TuneConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    # Where the studies live: null = sqlite:///<dir>/optuna.db; a postgresql+psycopg:// URL
    # lets other hosts join with the same command.
    storage: str | None = None
    dir: str = MISSING
    # Workers of each stage's sweep on this host (hydra.sweeper.n_jobs of that sweep).
    n_jobs: int = 1
    # Sweeps that run at once (each arm's tuning, then its retraining as soon as its tuning
    # is done); 0 = all arms at once.
    concurrent: int = 0

    def __post_init__(self) -> None:
        _check(bool(self.optimizers), "verdict.optimizers", self.optimizers,
               "a non-empty list of arms: " + ", ".join(self.arms))
        for name in self.optimizers:
            _check(name in self.arms, "verdict.optimizers", name,
                   "arms defined under verdict.arms: " + ", ".join(self.arms))
        _check(len(set(self.optimizers)) == len(self.optimizers), "verdict.optimizers",
               self.optimizers, "each arm once")
        _check(self.reference in self.optimizers, "verdict.reference", self.reference,
               "one of the compared arms (verdict.optimizers): " + ", ".join(self.optimizers))
        _check(self.tune.trials >= 1, "verdict.tune.trials", self.tune.trials, ">= 1")
        _check(self.tune.epochs >= 1, "verdict.tune.epochs", self.tune.epochs, ">= 1")
        _check(self.tune.sampler in SAMPLERS, "verdict.tune.sampler", self.tune.sampler,
               "one of " + ", ".join(SAMPLERS))
        _check(self.tune.pruner in PRUNERS, "verdict.tune.pruner", self.tune.pruner,
               "one of " + ", ".join(PRUNERS))
        seeds = list(self.final.seeds)
        _check(len(seeds) >= 2, "verdict.final.seeds", seeds,
               "at least 2 seeds (a mean, a std and paired tests need replicates)")
        _check(len(set(seeds)) == len(seeds), "verdict.final.seeds", seeds,
               "distinct seeds")
        _check(self.tune.seed not in seeds, "verdict.final.seeds", seeds,
               f"seeds that tuning never used (verdict.tune.seed={self.tune.seed} is one of "
               "them): the final runs must be fresh replicates")
        _check(self.final.epochs is None or self.final.epochs >= 1, "verdict.final.epochs",
               self.final.epochs, "null (trainer.epochs) or >= 1")
        _check(self.n_jobs >= 1, "verdict.n_jobs", self.n_jobs, ">= 1 (workers per sweep)")
        _check(self.concurrent >= 0, "verdict.concurrent", self.concurrent,
               ">= 0 (0: every arm at once)")
        for name, arm in self.arms.items():
            for key in arm.space:
                _check(not key.startswith("seed") and key != "optimizer",
                       f"verdict.arms.{name}.space", key,
                       "hyperparameters only: the optimizer is the arm, and a seed is a "
                       "replicate, never a hyperparameter")

    @property
    def arms_compared(self) -> dict[str, ArmConfig]:
        return {name: self.arms[name] for name in self.optimizers}


def register_verdict_schema() -> None:
    """``verdict_schema`` in Hydra's ConfigStore, which ``conf/verdict/*.yaml`` start from."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="verdict_schema", node=VerdictConfig, replace=True)


def load_settings(node: DictConfig) -> VerdictConfig:
    """The ``verdict`` section, type-checked and range-checked (one ``ConfigError`` line)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        # Resolved in place: its interpolations (the name from model and data) reach the
        # whole config.
        raw = OmegaConf.to_container(node, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(VerdictConfig), raw)
        settings = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        message = str(exc).splitlines()[0]
        raise ConfigError(f"verdict.{key}: {message}" if key else message) from None
    except ValueError as exc:  # __post_init__ of a nested section
        raise ConfigError(str(exc)) from None
    assert isinstance(settings, VerdictConfig)
    return settings
