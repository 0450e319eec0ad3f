"""How a trial gets its values: per-trial seeded samplers and public ``suggest_*`` calls.

Why a per-trial seed: a sampler seeded once per process restarts its sequence in every
process, so a resumed study re-proposes trial #0's values and W workers started together
propose the same W points. Every sampler we use keeps its real state in the study's
storage (TPE, CMA-ES, NSGA-II and the grid read past trials from it); the seed only drives
their random draws. Seeding trial *n* with ``derive_seed(study_seed, n)`` therefore gives a
reproducible study (same seed, same sequence) in which no two trials share a stream, no
matter how many processes or hosts ask.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from zsharp_sweeps.sweep.quiet import optuna_experimental

#: Samplers whose seed defines one structure for the whole study, which every trial must
#: share: QMC scrambles its sequence with it (and indexes it by trial number), the grid
#: shuffles its grid points with it (a trial's ``grid_id`` indexes that order). They keep
#: the study's seed; neither repeats a point, since both pick by what the storage holds.
STUDY_WIDE_SEED = (optuna.samplers.QMCSampler, optuna.samplers.GridSampler)


def derive_seed(study_seed: int, trial_number: int) -> int:
    """A 31-bit seed for one trial, stable across processes, Python versions and hosts."""
    digest = hashlib.sha256(f"{study_seed}:{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class TrialSeededSampler(BaseSampler):
    """Delegates each trial to a sampler built with that trial's derived seed.

    ``make(seed)`` builds the configured sampler (TPE, random, grid, CMA-ES, NSGA-II ...).
    With ``study_seed=None`` every trial's sampler is unseeded, as Optuna does by default.
    """

    def __init__(self, make: Callable[[int | None], BaseSampler], study_seed: int | None):
        self._make = make
        self._study_seed = study_seed
        self._by_trial: dict[int, BaseSampler] = {}
        probe = make(study_seed)
        self._study_wide = isinstance(probe, STUDY_WIDE_SEED)
        self._shared = probe if self._study_wide else None
        self.inner_name = type(probe).__name__

    def _for(self, trial: FrozenTrial) -> BaseSampler:
        if self._shared is not None:
            return self._shared
        sampler = self._by_trial.get(trial.number)
        if sampler is None:
            seed = None if self._study_seed is None else derive_seed(self._study_seed, trial.number)
            sampler = self._by_trial[trial.number] = self._make(seed)
        return sampler

    def infer_relative_search_space(self, study, trial):  # noqa: D102 (BaseSampler API)
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):  # noqa: D102
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):  # noqa: D102
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):  # noqa: D102
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state: TrialState, values):  # noqa: D102
        try:
            self._for(trial).after_trial(study, trial, state, values)
        finally:
            self._by_trial.pop(trial.number, None)

    def reseed_rng(self) -> None:  # noqa: D102  seeds are per trial already
        pass


def sampler_factory(
    sampler_conf: Mapping[str, Any], grid: Mapping[str, list] | None
) -> Callable[[int | None], BaseSampler]:
    """``make(seed)`` for the sweeper's ``hydra.sweeper.sampler`` config (picklable)."""
    return functools.partial(_make_sampler, dict(sampler_conf), dict(grid) if grid else None)


def _make_sampler(conf: dict, grid: dict | None, seed: int | None) -> BaseSampler:
    from hydra.utils import instantiate

    conf = dict(conf)
    if "seed" in conf:
        conf["seed"] = seed
    with optuna_experimental():  # QMC, GP ...
        sampler = instantiate(
            conf,
            _execution_whitelist_=("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*"),
        )
    if isinstance(sampler, functools.partial):  # the grid sampler needs its grid
        sampler = sampler(grid or {})
    return sampler


def suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    """Sample one search-space entry through Optuna's public ``suggest_*`` API."""
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(
            name, distribution.low, distribution.high, log=distribution.log,
            step=distribution.step,
        )
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(
            name, distribution.low, distribution.high, log=distribution.log,
            step=distribution.step,
        )
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    raise TypeError(f"{name}: unsupported distribution {distribution!r}")


def corner_values(distribution: BaseDistribution) -> list[Any]:
    """The values a search-space entry can take at its edges: every categorical choice,
    a range's low and high end. Enough to validate a sweep's config before it starts."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, (FloatDistribution, IntDistribution)):
        return [distribution.low, distribution.high]
    raise TypeError(f"unsupported distribution {distribution!r}")


def override_value(value: Any) -> str:
    """A sampled value as Hydra override syntax (strings quoted when they need it)."""
    if isinstance(value, str):
        special = set(" ,=[]{}()'\"\\:$")
        if value and not special & set(value):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_search_space(lines: list[str]) -> dict[str, BaseDistribution]:
    """Optuna distributions of sweep overrides in Hydra's Optuna-sweeper syntax
    (``optimizer.lr=tag(log, interval(0.01, 0.5))``, ``seed=range(0, 3)``); fixed values
    (``a=1``) are left out. The stock plugin's parser is used so that a space means here
    exactly what it means to ``hydra/sweeper=optuna``."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    space, _fixed, _ = create_params_from_overrides(list(lines))
    return dict(space)
