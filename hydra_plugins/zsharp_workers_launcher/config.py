"""``hydra/launcher=zsharp_workers`` settings."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class WorkersLauncherConf:
    _target_: str = "hydra_plugins.zsharp_workers_launcher.launcher.WorkersLauncher"
    # Seconds a worker gets to record its running trial after a stop request (SIGINT/SIGTERM
    # of the sweep) before it is killed.
    stop_timeout_s: float = 60.0


ConfigStore.instance().store(
    group="hydra/launcher", name="zsharp_workers", node=WorkersLauncherConf,
    provider="zsharp_sweeps",
)
