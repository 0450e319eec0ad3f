"""``hydra/launcher=zsharp_streams`` settings (``hydra.launcher.n_jobs``)."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class StreamsLauncherConf:
    _target_: str = "hydra_plugins.zsharp_streams_launcher.launcher.StreamsLauncher"
    # Trials run at once (threads); the sweep recipes tie it to hydra.sweeper.n_jobs.
    n_jobs: int = 4


ConfigStore.instance().store(
    group="hydra/launcher", name="zsharp_streams", node=StreamsLauncherConf, provider="zsharp_sweeps"
)
