"""What a run is handed besides its config: one ``RunContext``.

Why an object, not keyword arguments or config fields: a run needs facts that are not
settings of the experiment (the device a sweep worker was given, the name of its trial, the
MLflow run to nest under, who listens to its epochs, the data a worker keeps warm, where its
checkpoints go and which checkpoint a retry continues from). They travel together, from
whoever starts the run (the command line, a sweep worker, a test) to ``training.run``, and
nothing in between needs to know where they came from. A sweep worker builds one per trial
and makes it current for the trial's task function (``use_context``): the training floor
never imports the sweep runtime, and a user's own task function simply ignores it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from zsharp_sweeps.config import DataConfig
    from zsharp_sweeps.data import DataBundle

#: ``on_epoch_end(epoch, metrics)``: MLflow logging, Optuna reporting, timing.
EpochCallback = Callable[[int, dict[str, float]], None]
#: ``on_summary(summary)``: the finished run's summary metrics and per-epoch ``history``.
SummaryCallback = Callable[[Mapping[str, Any]], None]


class DataCache:
    """Datasets kept on a worker's device between its trials.

    A trial whose data settings, device and seed match an earlier trial's reuses its bundle:
    the loaders reshuffle from ``(seed, epoch)`` and ``engine.fit`` names every epoch, so a
    reused bundle yields exactly what a fresh one would. Only the latest few are kept so a
    sweep over ``data.*`` settings does not fill the GPU.
    """

    def __init__(self, max_entries: int = 2) -> None:
        self.max_entries = max_entries
        self._entries: dict[str, DataBundle] = {}
        self.hits = 0

    def get(self, cfg: DataConfig, device: torch.device, seed: int) -> DataBundle:
        from zsharp_sweeps.data import build_data

        key = repr((cfg, str(device), seed))
        bundle = self._entries.pop(key, None)
        if bundle is None:
            bundle = build_data(cfg, device, seed)
        else:
            self.hits += 1
        self._entries[key] = bundle  # most recent last
        while len(self._entries) > self.max_entries:
            self._entries.pop(next(iter(self._entries)))
        return bundle


@dataclass
class RunContext:
    """Everything a run gets besides its config. Every field has a single-run default.

    ``device``: the torch device to compute on (None: ``hardware.device``); ``device_label``:
    what the sweep calls it (``cuda:2``, ``cpu:1``), the run's MLflow ``device`` tag.
    ``run_name`` (None: ``tracking.run_name``, else ``<optimizer>-<model>-<dataset>``),
    ``parent_run_id`` (None: ``tracking.parent_run_id``) and ``tags`` say how the MLflow run is
    recorded; ``overrides`` are the command line's, saved as ``config/overrides.txt``.
    ``callbacks`` see every epoch, ``on_summary`` the finished run. ``data_cache`` keeps data
    on the device between runs. ``checkpoint_dir`` replaces ``trainer.checkpoint_dir`` (a
    sweep trial's folder); ``resume_from`` is a checkpoint directory to continue from when its
    config matches (a retried trial; otherwise the run starts at epoch 1 and says why), in a
    new MLflow run when ``new_run_on_resume``. ``log_prefix`` starts the run's per-epoch log
    lines (a sweep trial's ``[t7] ``: parallel workers' lines interleave in one log); empty
    for a single run. ``supersedes``: tags of MLflow runs of a dead
    attempt at this run that still say RUNNING; they are ended KILLED before it starts.
    """

    device: str | None = None
    device_label: str | None = None
    run_name: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    overrides: Sequence[str] = ()
    callbacks: list[EpochCallback] = field(default_factory=list)
    on_summary: list[SummaryCallback] = field(default_factory=list)
    data_cache: DataCache | None = None
    checkpoint_dir: Path | None = None
    resume_from: Path | None = None
    new_run_on_resume: bool = False
    supersedes: dict[str, str] | None = None
    log_prefix: str = ""


_current: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "zsharp_run_context", default=None
)


@contextlib.contextmanager
def use_context(context: RunContext) -> Iterator[RunContext]:
    """Make ``context`` the one ``current_context()`` returns within the block (a sweep
    worker, around the trial's task function)."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def current_context() -> RunContext | None:
    """The context a caller made current with ``use_context``, or None (a single run)."""
    return _current.get()
