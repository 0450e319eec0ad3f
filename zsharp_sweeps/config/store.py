"""The schemas in Hydra's ConfigStore, so every option of ``conf/`` starts from its schema."""

from __future__ import annotations

from zsharp_sweeps.config.schema import GROUP_SCHEMAS, OPTIMIZER_SCHEMAS


def schema_config_name(group: str, option: str | None = None) -> str:
    """The name a schema is stored under: ``data`` -> ``data_schema``; an optimizer option's
    own schema: ``optimizer``, ``zsharp`` -> ``optimizer_zsharp_schema``."""
    return f"{group}_{option}_schema" if option else f"{group}_schema"


def register_configs() -> None:
    """Store each group's schema as the root-level config ``<group>_schema`` (each optimizer's
    as ``optimizer_<name>_schema``) so every YAML option can start from it (``defaults:
    [/data_schema, _self_]``): any schema key can then be overridden from the command line
    without ``+``, a key the option's schema lacks is refused, and types are checked as Hydra
    composes. Root level, not inside the group: an option of the group would be offered by
    ``--help`` and tab completion as if it could be picked (``data=_schema``)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, schema in GROUP_SCHEMAS.items():
        if group == "optimizer":
            for name, option_schema in OPTIMIZER_SCHEMAS.items():
                store.store(name=schema_config_name(group, name), node=option_schema,
                            replace=True)
        else:
            store.store(name=schema_config_name(group), node=schema, replace=True)
