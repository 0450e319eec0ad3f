"""``hydra/launcher=zsharp_workers`` settings."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class WorkersLauncherConf:
    _target_: str = "hydra_plugins.zsharp_workers_launcher.launcher.WorkersLauncher"
    # How worker processes start: auto (forked where safe: Linux, one thread, CUDA not started
    # in the sweep's process; spawned otherwise), fork or spawn. spawn if something in the
    # sweep's process touches CUDA before the workers start (e.g. a Hydra callback calling
    # torch.cuda.is_available()) and forked workers fail with "Cannot re-initialize CUDA".
    start_method: str = "auto"


ConfigStore.instance().store(
    group="hydra/launcher", name="zsharp_workers", node=WorkersLauncherConf,
    provider="zsharp_sweeps",
)
