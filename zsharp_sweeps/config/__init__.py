"""The config schema: what every setting means, its range, and how a composed config is
checked (``validate``). A leaf of the package: ``import zsharp_sweeps.config`` imports nothing
else of it (so no torch); the registries of datasets, models and optimizers are checked
against the names here. Layout: ``checks`` (``ConfigError`` and the one way to refuse a
value), ``schema`` (the dataclasses), ``validate``, ``store`` (Hydra's ConfigStore).
"""

from zsharp_sweeps.config.checks import (
    BASE_OPTIMIZERS,
    DATASETS,
    FILTERS,
    KERNELS,
    MODELS,
    THRESHOLD_METHODS,
    ConfigError,
)
from zsharp_sweeps.config.schema import (
    GROUP_SCHEMAS,
    KEEP_CHECKPOINTS,
    OBJECTIVES,
    OPTIMIZER_SCHEMAS,
    OPTIMIZER_SETTINGS,
    PRUNERS,
    SCHEDULERS,
    AdamConfig,
    AdamWConfig,
    ASAMConfig,
    DataConfig,
    FSAMConfig,
    HardwareConfig,
    ModelConfig,
    OptimizerConfig,
    SAMConfig,
    SAMDirectionConfig,
    SAMFamilyConfig,
    SAMMagnitudeConfig,
    SGDConfig,
    SharpnessConfig,
    StudyConfig,
    TrackingConfig,
    TrainConfig,
    TrainerConfig,
    ZSharpConfig,
    dataset_names,
    optimizer_config,
)
from zsharp_sweeps.config.store import register_configs, schema_config_name
from zsharp_sweeps.config.validate import flatten, optimizer_from, section, validate

__all__ = [
    "BASE_OPTIMIZERS", "DATASETS", "FILTERS", "GROUP_SCHEMAS", "KEEP_CHECKPOINTS", "KERNELS",
    "MODELS", "OBJECTIVES", "OPTIMIZER_SCHEMAS", "OPTIMIZER_SETTINGS", "PRUNERS", "SCHEDULERS",
    "THRESHOLD_METHODS", "ASAMConfig", "AdamConfig", "AdamWConfig", "ConfigError", "DataConfig",
    "FSAMConfig", "HardwareConfig", "ModelConfig", "OptimizerConfig", "SAMConfig",
    "SAMDirectionConfig", "SAMFamilyConfig", "SAMMagnitudeConfig", "SGDConfig",
    "SharpnessConfig", "StudyConfig", "TrackingConfig", "TrainConfig", "TrainerConfig",
    "ZSharpConfig", "dataset_names", "flatten", "optimizer_config", "optimizer_from",
    "register_configs", "schema_config_name", "section", "validate",
]
