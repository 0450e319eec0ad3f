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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import FloatRange
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from zsharp_sweeps.sweep.quiet import optuna_experimental

try:  # the stock plugin's search-space parser: private, so guarded and version-pinned
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
except ImportError as exc:  # pragma: no cover - depends on the installed plugin
    raise ImportError(
        "hydra-optuna-sweeper no longer provides _impl.create_params_from_overrides, which "
        "zsharp_sweeps/sweep/sampling.py uses to parse search spaces exactly as the stock "
        "sweeper does: install the version pyproject.toml pins (1.4.0rc3) or re-check the "
        "parser and widen the pin (tests/test_sweep_runtime.py)"
    ) from exc

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


def _instantiate(conf: dict, seed: int | None) -> Any:
    from hydra.utils import instantiate

    conf = dict(conf)
    if "seed" in conf:
        conf["seed"] = seed
    with optuna_experimental():  # QMC, GP ...
        return instantiate(
            conf,
            _execution_whitelist_=("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*"),
        )


def _make_sampler(conf: dict, grid: dict | None, seed: int | None) -> BaseSampler:
    sampler = _instantiate(conf, seed)
    if isinstance(sampler, functools.partial):  # the grid sampler needs its grid
        sampler = sampler(grid or {})
    return sampler


def is_grid_sampler(sampler_conf: Mapping[str, Any]) -> bool:
    """Whether ``hydra.sweeper.sampler`` is Optuna's grid sampler (built from the grid)."""
    sampler = _instantiate(dict(sampler_conf), None)
    return isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler


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


@dataclass(frozen=True)
class SearchSpace:
    """A sweep's overrides, split: the swept ones as Optuna distributions (in order), the
    others verbatim (fixed values, ``~key`` deletions, group choices). ``pinned`` names the
    keys a later plain value took out of the space (``optimizer.lr=0.05`` on the command line
    over the sweep config's ``optimizer.lr: tag(log, interval(...))``)."""

    distributions: dict[str, BaseDistribution]
    fixed: list[str]
    pinned: list[str] = field(default_factory=list)


def parse_search_space(lines: Sequence[str]) -> SearchSpace:
    """Sweep overrides in Hydra's Optuna-sweeper syntax (``optimizer.lr=tag(log,
    interval(0.01, 0.5))``, ``seed=range(0, 3)``, ``optimizer=choice(sam, zsharp)``), parsed
    by the stock plugin's own parser, so that a space means here exactly what it means to
    ``hydra/sweeper=optuna``. The one place this project reads hydra-optuna-sweeper's
    private module; the versions it was checked against are pinned by
    ``tests/test_sweep_runtime.py``.

    The last override of a key wins, as everywhere in Hydra: a plain value given after a
    key's range (the command line comes after ``hydra.sweeper.params``) pins it, and the key
    leaves the space (the stock sweeper treats a plain value as a fixed parameter too; it
    used to be dropped here silently)."""
    space, fixed_params, _deletions = create_params_from_overrides(list(lines))
    parsed = OverridesParser.create().parse_overrides(list(lines))
    last: dict[str, Any] = {}
    for o in parsed:
        last[o.key_or_group] = o
    space = dict(space)
    pinned = []
    for name in list(space):
        final = last.get(name.lstrip("+~"))
        if final is not None and not final.is_sweep_override() and not final.is_delete():
            del space[name]
            pinned.append(name)
    fixed = [o.input_line for o in parsed
             if o.get_key_element() not in space and o.input_line is not None
             and not (o.is_sweep_override() and o.key_or_group in map(_bare, pinned))]
    return SearchSpace(space, fixed, pinned)


def _bare(key: str) -> str:
    return key.lstrip("+~")


def excludes(distribution: BaseDistribution, value: Any) -> bool:
    """Whether a numeric search-space entry cannot reach ``value`` (a range whose ends both
    lie on one side of it, or numeric choices that all do): the recipe's own value is
    outside what the sweep tries."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(distribution, (FloatDistribution, IntDistribution)):
        low, high = distribution.low, distribution.high
    elif isinstance(distribution, CategoricalDistribution):
        numbers = [c for c in distribution.choices
                   if isinstance(c, (int, float)) and not isinstance(c, bool)]
        if len(numbers) != len(distribution.choices) or not numbers:
            return False
        low, high = min(numbers), max(numbers)
    else:
        return False
    return not low <= value <= high


def grid_choices(distribution: BaseDistribution) -> list[Any]:
    """Every value a discrete distribution takes, both ends included (what Optuna's grid
    sampler enumerates)."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution):
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    if isinstance(distribution, FloatDistribution) and distribution.step is not None:
        choices = list(FloatRange(distribution.low, distribution.high, distribution.step))
        if not choices or choices[-1] != distribution.high:
            choices.append(distribution.high)
        return choices
    raise ValueError(f"a grid sweep needs discrete values: {distribution!r} is continuous "
                     "(use choice(...) or range(...) with a step)")
