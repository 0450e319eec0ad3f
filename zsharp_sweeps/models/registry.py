"""The model registry: one name -> constructor table and the config-driven builder.

Why a registry: configs name a model (``model.name=resnet20``) and pass free keyword
arguments (``model.params``); the registry maps the name to a constructor and checks
the keywords against that constructor's signature *before* building, so a typo in a
sweep override fails at once with a message that names the setting and the accepted
keys, instead of as a ``TypeError`` deep inside a half-started run.

Every constructor takes the dataset's shape as keyword-only arguments
(``in_channels``, ``num_classes``, ``image_size``) plus its own keyword parameters
with defaults; ``conf/model/<name>.yaml`` spells those defaults out.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from torch import nn

from zsharp_sweeps.config import MODELS as MODEL_NAMES
from zsharp_sweeps.config import ConfigError
from zsharp_sweeps.config.checks import check

# Arguments every constructor receives from the dataset, never from ``model.params``.
DATASET_ARGS: tuple[str, ...] = ("in_channels", "num_classes", "image_size")

ModelConstructor = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelConstructor)

MODELS: dict[str, ModelConstructor] = {}


class _ModelConfigLike(Protocol):
    name: str
    params: Mapping[str, Any]


def register_model(name: str) -> Callable[[F], F]:
    """Register ``fn`` under ``name`` (used as ``@register_model("resnet20")``).

    The constructor must accept ``in_channels``, ``num_classes`` and ``image_size`` as
    keyword arguments; its other keyword parameters become the accepted
    ``model.params`` keys. Registering a name twice is an error, so two modules can
    never silently shadow each other.
    """

    def decorator(fn: F) -> F:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered ({MODELS[name]!r})")
        params = inspect.signature(fn).parameters
        missing = [a for a in DATASET_ARGS if a not in params]
        if missing:
            raise TypeError(f"model constructor {fn.__qualname__} lacks arguments {missing}")
        if name not in MODEL_NAMES:
            raise ValueError(f"model {name!r} is not in zsharp_sweeps/config/checks.py: MODELS "
                             "(the names model.name is checked against): add it there")
        MODELS[name] = fn
        return fn

    return decorator


def model_param_defaults(name: str) -> dict[str, Any]:
    """The ``model.params`` keys of ``name`` and their defaults (what its YAML lists)."""
    if name not in MODELS:
        raise ConfigError(_unknown_name_message(name))
    sig = inspect.signature(MODELS[name])
    return {
        key: p.default
        for key, p in sig.parameters.items()
        if key not in DATASET_ARGS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def _unknown_name_message(name: str) -> str:
    return f"model.name={name!r} is invalid: allowed one of {', '.join(sorted(MODELS))}."


def _plain_params(params: Any) -> dict[str, Any]:
    """``model.params`` as a plain dict (it may arrive as an OmegaConf DictConfig)."""
    if params is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(params, DictConfig):
            return dict(OmegaConf.to_container(params, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency of the project
        pass
    if not isinstance(params, Mapping):
        raise ConfigError(f"model.params={params!r} is invalid: allowed a mapping of keywords.")
    return dict(params)


def build_model(
    cfg: _ModelConfigLike, *, in_channels: int, num_classes: int, image_size: int
) -> nn.Module:
    """Build ``cfg.name`` with ``cfg.params`` for a dataset of the given shape.

    ``cfg`` is a :class:`zsharp_sweeps.config.ModelConfig` (or anything with ``name``
    and ``params``). Raises :class:`~zsharp_sweeps.config.ConfigError` (a
    ``ValueError``) for an unknown name (listing the valid ones), for a key in
    ``params`` the constructor does not accept (listing the accepted ones), and for
    values the constructor rejects (e.g. a ViT patch size that does not divide the
    image).
    """
    name = cfg.name
    if name not in MODELS:
        raise ConfigError(_unknown_name_message(name))
    for arg, value in (
        ("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{arg}={value!r} is invalid for model {name!r}: allowed an int >= 1.")
    params = _plain_params(cfg.params)
    accepted = model_param_defaults(name)
    for key in params:
        if key not in accepted:
            hint = (
                f" {key} is set by the dataset, not by model.params."
                if key in DATASET_ARGS else ""
            )
            allowed = ", ".join(accepted) if accepted else "none (this model takes no params)"
            raise ConfigError(
                f"model.params.{key} is not a parameter of model {name!r}: "
                f"accepted keys are {allowed}.{hint}"
            )
    return MODELS[name](
        in_channels=in_channels, num_classes=num_classes, image_size=image_size, **params
    )


def check_param(ok: bool, key: str, value: Any, allowed: str, hint: str = "") -> None:
    """Reject a bad ``model.params`` value with a message naming ``model.params.<key>``.

    Constructors call this on their own arguments so that a bad sweep value (say a
    head count that does not divide the width) fails while building, with the setting
    named, not later as a shape error in the first forward pass.
    """
    check(ok, f"model.params.{key}", value, allowed, hint)


def check_positive_int(key: str, value: Any) -> None:
    """``value`` must be an int >= 1 (bools, which are ints to Python, are refused)."""
    check_param(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        key, value, "an int >= 1",
    )


def check_dropout(key: str, value: Any) -> None:
    """``value`` must be a probability in [0, 1)."""
    check_param(
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1,
        key, value, "a probability in [0, 1)",
    )
