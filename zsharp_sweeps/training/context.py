"""What one sweep trial is handed by its worker, explicitly, instead of config fields or
process-wide singletons: the live Optuna trial, the worker's device, the MLflow parent run,
the trial's name and folder, and the worker's warm data cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import torch

if TYPE_CHECKING:
    from zsharp_sweeps.config import DataConfig
    from zsharp_sweeps.data import DataBundle


class DataCache:
    """Datasets kept on the worker's device between trials.

    A trial whose data settings, device and seed match an earlier trial's reuses its bundle:
    the loaders reshuffle from ``(seed, epoch)`` and ``engine.fit`` names every epoch, so a
    reused bundle yields exactly what a fresh one would. Only the latest few are kept so a
    sweep over ``data.*`` settings does not fill the GPU.
    """

    def __init__(self, max_entries: int = 2) -> None:
        self.max_entries = max_entries
        self._entries: dict[str, DataBundle] = {}
        self.hits = 0
        self.misses = 0

    def get(self, cfg: DataConfig, device: torch.device, seed: int) -> DataBundle:
        from zsharp_sweeps.data import build_data

        key = repr((cfg, str(device), seed))
        bundle = self._entries.pop(key, None)
        if bundle is None:
            self.misses += 1
            bundle = build_data(cfg, device, seed)
        else:
            self.hits += 1
        self._entries[key] = bundle  # most recent last
        while len(self._entries) > self.max_entries:
            self._entries.pop(next(iter(self._entries)))
        return bundle


@dataclass
class TrialContext:
    """One sweep trial's handles. ``trial`` reports per-epoch values and answers the
    pruner; ``device`` is the worker's for its whole life, as the sweep names it (``cpu:N``
    labels a CPU worker); ``compute_device`` is what torch runs it on (``cuda:0`` in a worker
    process that sees only its own GPU; None: ``device``)."""

    trial: optuna.Trial
    n_objectives: int
    device: str
    run_name: str
    out_dir: Path
    compute_device: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    data_cache: DataCache | None = None
    #: Extra ``on_epoch_end(epoch, metrics)`` callbacks (the worker's timing).
    callbacks: list[Callable[[int, dict[str, float]], None]] = field(default_factory=list)
