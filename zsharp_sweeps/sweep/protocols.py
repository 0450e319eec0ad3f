"""What the sweeper asks of its launcher and of the task function beyond Hydra's interfaces.

Both are optional and declared here as typed protocols, checked with ``isinstance``: any
Hydra launcher and any task function work without them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from omegaconf import DictConfig


@runtime_checkable
class PrestartingLauncher(Protocol):
    """A launcher that can start its worker processes before it has their jobs.

    The sweeper calls ``prestart`` as soon as the configs are checked, so the processes'
    start (the imports in ``preload``, then ``warm(i)`` in the i-th process: this project
    starts CUDA there on the card its job will name) overlaps the study's and the MLflow
    parent run's set-up; ``launch`` then hands the i-th process its i-th job. ``discard``
    lets the processes that got no job end (the sweep failed or was interrupted first); it
    is always called.
    """

    def prestart(self, n_workers: int, preload: Sequence[str] = (),
                 warm: Callable[[int], None] | None = None) -> None: ...

    def discard(self) -> None: ...


@runtime_checkable
class ChecksConfig(Protocol):
    """A task function that can check a composed config without running it.

    The sweeper calls ``check_config`` with the trial config at every edge of the search
    space before it creates the study or any run, so a bad setting (a swept value out of
    range, a model parameter its constructor refuses) stops the sweep before anything is
    written. It raises ``ValueError`` (``zsharp_sweeps.config.ConfigError``) naming the
    setting. This project's ``zsharp_sweeps.train.task`` declares it.
    """

    def check_config(self, cfg: DictConfig) -> None: ...
