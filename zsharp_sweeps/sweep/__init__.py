"""The sweep runtime: long-lived workers that pull trials from the shared Optuna storage.

The sweeper side lives in ``hydra_plugins/zsharp_optuna_sweeper`` (Hydra discovers plugins
there): it validates, opens the study and the MLflow parent run, and starts the workers.
Here: the worker loop (``worker``), where a worker computes (``placement``), what a trial is
handed (``context``), per-trial seeds (``sampling``), which trials count (``progress``),
pruning (``trial``) and how workers end with the sweep (``lifecycle``).
"""

from zsharp_sweeps.sweep.trial import Pruned, TrialReporter, build_pruner

__all__ = ["Pruned", "TrialReporter", "build_pruner"]
