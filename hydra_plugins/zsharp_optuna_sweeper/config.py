"""``hydra/sweeper=zsharp_optuna``: the stock Optuna sweeper's settings (its public config
module), same keys and defaults, plus what long-lived workers need.

Everything users know (``hydra.sweeper.n_trials``, ``storage``, ``study_name``, ``n_jobs``,
``sampler``, ``direction``, ``params``, ``max_failure_rate``) keeps its meaning, with two
sharpenings: ``n_trials`` is the size of the study, so rerunning a sweep continues it, and
``n_jobs`` is the number of workers this host starts (each takes trials until the study is
full; set it to n_gpus x hardware.trials_per_gpu).
"""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf


@dataclass
class ZSharpOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.zsharp_optuna_sweeper.sweeper.ZSharpOptunaSweeper"
    # Optuna's heartbeat: a running trial whose worker has not written a heartbeat for
    # grace_period seconds (null: 3 x heartbeat_interval) is failed by any other worker
    # and retried, up to max_retry times.
    heartbeat_interval: int = 10
    grace_period: int | None = None
    max_retry: int = 3
    # Devices the workers are spread over (worker i on devices[(i // trials_per_gpu) % n]);
    # null: every visible GPU, else hardware.device. Labels like cpu:0, cpu:1 tag CPU workers.
    devices: list[str] | None = None
    # Write the end-of-sweep report (report/ in the sweep dir, and the parent run's
    # artifacts). null: for this project's training config (it has a tracking group), not
    # for other apps. A verdict's stages turn it off: the verdict writes its own analysis.
    report: bool | None = None
    # A rerun of a study whose fixed settings or search space differ from those its earlier
    # trials ran with is refused (resumes never mix settings); true accepts the change
    # deliberately (a warning, and tags on the MLflow parent run).
    allow_changed_settings: bool = False
    # Once the sweep is done: which trials keep their checkpoints (each keeps its last one,
    # up to ~72 MB for a ViT): all, best (the best trial; the Pareto front for several
    # objectives), none, or a number k (the k best). Never before the study is finished
    # (zsharp_sweeps/sweep/keep.py).
    keep_checkpoints: Any = "all"


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="zsharp_optuna",
    node=ZSharpOptunaSweeperConf,
    provider="zsharp_sweeps",
)
