"""What Hydra's Optuna sweeper does not do: pruning, seeds, GPU slots, resumable studies.

The sweeper side lives in ``hydra_plugins/zsharp_optuna_sweeper`` (Hydra discovers plugins
there); the trial side, which runs inside each training process, lives here.
"""

from zsharp_sweeps.sweep.devices import assign_device
from zsharp_sweeps.sweep.trial import Pruned, StudyReporter, build_pruner

__all__ = ["Pruned", "StudyReporter", "assign_device", "build_pruner"]
