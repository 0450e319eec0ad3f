"""Pruners for tests, importable by path from a sweep's trial processes."""

from __future__ import annotations

import optuna


class AlwaysPrune(optuna.pruners.BasePruner):
    """Prunes every trial at its first report: makes PRUNED deterministic in tests."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True
