"""From a composed config to validated dataclasses: ``validate`` (the whole run) and
``section`` (one group, when another may be broken).

The optimizer group has one schema per option: ``optimizer`` is checked against the schema
of ``optimizer.name``, so a setting that optimizer does not have is refused, naming it.
``optimizer_shared`` gives a setting to whichever optimizer of a sweep or recipe has it
(``optimizer=choice(sgd,sam,zsharp) optimizer_shared.rho=0.1``: rho 0.1 for sam and zsharp,
nothing for sgd); it replaces the option's own value, and giving the same setting both ways
with different values is an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from zsharp_sweeps.config.checks import ConfigError
from zsharp_sweeps.config.schema import (
    GROUP_SCHEMAS,
    OPTIMIZER_SCHEMAS,
    OptimizerConfig,
    TrainConfig,
    not_a_setting,
)


def _plain(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain containers, the ``hydra`` node left out (never resolved)."""
    if isinstance(cfg, DictConfig):
        return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k])
                else cfg[k] for k in cfg if k != "hydra"}
    return {k: v for k, v in dict(cfg).items() if k != "hydra"}


def _structured(schema: type, values: Mapping[str, Any]) -> Any:
    """``values`` merged onto ``schema``: types and every ``__post_init__`` range checked."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), dict(values)))
    except ConfigError:
        raise
    except Exception as exc:  # omegaconf type/key errors: re-raise as one clear type
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        raise ConfigError(f"invalid config: {exc}") from exc


def optimizer_from(node: Mapping[str, Any], shared: Mapping[str, Any] | None = None
                   ) -> OptimizerConfig:
    """The ``optimizer`` group on its option's schema, with the ``optimizer_shared`` values
    that optimizer has."""
    values = dict(node or {})
    name = values.get("name", "zsharp")
    if name not in OPTIMIZER_SCHEMAS:
        raise ConfigError(f"optimizer.name={name!r} is invalid: allowed one of "
                          f"{', '.join(OPTIMIZER_SCHEMAS)}.")
    schema = OPTIMIZER_SCHEMAS[name]
    own = schema.settings()
    for key in values:
        if key not in own:
            raise ConfigError(not_a_setting(name, key))
    defaults = dataclasses.asdict(schema())
    for key, value in (shared or {}).items():
        if key not in own:
            continue
        given = values.get(key, defaults[key])
        if given != defaults[key] and given != value:
            raise ConfigError(
                f"optimizer.{key}={given!r} and optimizer_shared.{key}={value!r} both set it "
                f"for optimizer {name!r}: give one of them")
        values[key] = value
    return _structured(schema, values)


def validate(cfg: DictConfig | Mapping[str, Any]) -> TrainConfig:
    """Merge a composed config onto the schema and run every range check.

    The ``hydra`` node is dropped first. Raises ``ConfigError`` (a ``ValueError``) naming the
    first bad setting.
    """
    container = _plain(cfg)
    optimizer_node = container.pop("optimizer", None)
    train = _structured(TrainConfig, container)
    optimizer = optimizer_from(optimizer_node, train.optimizer_shared)
    return dataclasses.replace(train, optimizer=optimizer)


def section(cfg: DictConfig, group: str) -> Any:
    """One group of a composed config as its validated schema (e.g. ``TrackingConfig``),
    without validating the rest: the sweeper and a rejected trial need tracking and study
    settings even when another section is invalid. Keys the schema lacks are ignored."""
    node = cfg.get(group)
    raw = (OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node) or {}
    schema = GROUP_SCHEMAS[group]
    if group == "optimizer":
        schema = OPTIMIZER_SCHEMAS.get(raw.get("name", "zsharp"), schema)
    names = {f.name for f in dataclasses.fields(schema)}
    return schema(**{k: v for k, v in raw.items() if k in names})


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys (``optimizer.rho``), lists kept as their string form."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
