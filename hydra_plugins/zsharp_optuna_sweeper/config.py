"""``hydra/sweeper=zsharp_optuna``: the stock Optuna sweeper's settings, same keys and defaults.

Everything users know (``hydra.sweeper.n_trials``, ``storage``, ``study_name``, ``n_jobs``,
``sampler``, ``direction``, ``params``, ``max_failure_rate``) keeps its meaning, with one
sharpening: ``n_trials`` is the size of the study, so rerunning a sweep continues it.
"""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf


@dataclass
class ZSharpOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.zsharp_optuna_sweeper.sweeper.ZSharpOptunaSweeper"


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="zsharp_optuna",
    node=ZSharpOptunaSweeperConf,
    provider="zsharp_sweeps",
)
