"""Resumes never mix settings: what a study's trials ran with, stored in the study, and the
refusal of a rerun that would run its new trials with something else.

Why: rerunning a sweep continues its study (``n_trials`` is the study's size). A rerun with
another fixed setting (``trainer.epochs=5`` where the first trials trained 20) would add
trials that are not comparable with the earlier ones, and the best trial, the report and
the sampler's model would mix them silently; a rerun with another search space made
Optuna fail every new trial (``ValueError: Cannot set different distribution kind``) while
the sweep exited 0. So the sweeper stores, when it creates a study, the fixed settings (the
composed config without the swept keys and without the settings of where and how fast
trials run) and the search space as user attributes, and compares them on every rerun,
before any trial starts. A difference is refused in one line naming the settings, unless
the user accepts it deliberately (``hydra.sweeper.allow_changed_settings=true``, recorded on
the MLflow parent run). The verdict does the same for its stages
(``zsharp_sweeps.verdict.plan.fingerprint``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    check_distribution_compatibility,
    distribution_to_json,
)

from zsharp_sweeps.config import flatten

#: Study user attributes: the fixed settings (flattened, ``key: value`` as strings) and the
#: search space (``name: distribution JSON``) the study's trials run with.
SETTINGS_ATTR = "zsharp:fixed_settings"
SPACE_ATTR = "zsharp:search_space"

#: Settings (dotted prefixes) that may differ between the runs of one study: where results
#: go, where the data lives (another host mounts it elsewhere), where and how fast trials
#: run, how chatty they are. Everything else changes what a trial computes.
#: (``training.checkpoint.RESUME_MAY_DIFFER`` says the same for a resumed run; ``study.*`` is
#: measured here: ``study.n_seeds`` changes the objective.)
MAY_DIFFER: tuple[str, ...] = (
    "trainer.checkpoint", "trainer.checkpoint_dir", "trainer.resume", "trainer.keep_checkpoints",
    "trainer.progress", "tracking.", "data.root", "data.download", "data.num_workers",
    "hardware.device", "hardware.num_threads", "hardware.trials_per_gpu",
    "hardware.warmup_steps", "hardware.compile_cache",
)


def _resolved(node: Any) -> Any:
    """A config group as plain containers, resolved where it can be (a group with an
    interpolation that needs a running Hydra job stays as written: the same on every
    rerun)."""
    if not OmegaConf.is_config(node):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # noqa: BLE001  any resolver's error
        return OmegaConf.to_container(node, resolve=False)


def _may_differ(key: str, swept: Iterable[str]) -> bool:
    if any(key == p or (p.endswith(".") and key.startswith(p)) or key.startswith(p + ".")
           for p in MAY_DIFFER):
        return True
    return any(key == s or key.startswith(s + ".") for s in swept)


def fixed_settings(config: DictConfig, swept: Iterable[str]) -> dict[str, str]:
    """The settings every trial of the study shares: the composed config (Hydra's own node
    left out) without the swept keys (``optimizer`` swept as a group takes its whole
    subtree) and without the settings that may differ (``MAY_DIFFER``)."""
    swept = [name.lstrip("+~") for name in swept]
    plain = {k: _resolved(config.get(k)) if OmegaConf.is_config(config.get(k)) else config.get(k)
             for k in config if k != "hydra"}
    return {k: repr(v) for k, v in sorted(flatten(plain).items()) if not _may_differ(k, swept)}


def space_settings(space: Mapping[str, BaseDistribution]) -> dict[str, str]:
    return {name: distribution_to_json(d) for name, d in space.items()}


def differences(old: Mapping[str, str], new: Mapping[str, str], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs (``(unset)`` where one side lacks
    it)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if a != b:
            out.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: str) -> str:
    """A distribution's JSON as its range (``FloatDistribution(0.01, 0.5, log)``)."""
    if value.startswith("{") and '"name"' in value:
        try:
            return repr(optuna.distributions.json_to_distribution(value))
        except Exception:  # noqa: BLE001
            return value
    return value


def incompatible(study: optuna.Study, space: Mapping[str, BaseDistribution]) -> list[str]:
    """Swept parameters whose new distribution Optuna refuses next to the study's past
    trials (a categorical with other choices, a float that became an int ...): every new
    trial would FAIL with Optuna's ``ValueError``."""
    out = {}
    for trial in study.get_trials(deepcopy=False):
        for name, old in trial.distributions.items():
            new = space.get(name)
            if new is None or name in out:
                continue
            try:
                check_distribution_compatibility(old, new)
            except ValueError:
                out[name] = f"{name}: {old!r} -> {new!r}"
    return list(out.values())
