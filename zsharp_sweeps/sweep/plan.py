"""What a sweep's workers are told: the study (the same for every host) and this host's part.

Why two objects: every host that joins a study must agree on the study's facts (its name and
storage, size, search space, sampler, failure bound, heartbeat), while devices, processes and
the stop file belong to the host that started the workers. The sweeper builds both once; the
launcher pickles them to the workers (``zsharp_sweeps.sweep.worker.WorkerJob``) together with
what Hydra gave the sweeper: its context, the master config and the task function each trial
runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from omegaconf import DictConfig
from optuna.distributions import BaseDistribution


@dataclass(frozen=True)
class StudyPlan:
    """The study, as every worker on every host sees it.

    ``fixed_overrides`` are the sweep's overrides that are not swept, verbatim; ``space`` the
    swept ones as Optuna distributions. ``pruner`` builds the study's pruner (picklable);
    ``epoch_metric`` is the per-epoch metric a trial reports for pruning (None: the task
    reports nothing); ``objectives`` name the values the task returns, in order.
    """

    study_name: str
    storage: str
    n_trials: int
    max_failure_rate: float
    space: dict[str, BaseDistribution]
    fixed_overrides: list[str]
    make_sampler: Callable[[int | None], optuna.samplers.BaseSampler]
    sampler_seed: int | None
    directions: list[str]
    sweep_dir: str
    make_pruner: Callable[[], optuna.pruners.BasePruner] = optuna.pruners.NopPruner
    objectives: list[str] = field(default_factory=list)
    epoch_metric: str | None = None
    parent_run_id: str | None = None
    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retry: int = 3
    custom_search_space_extender: Callable[[DictConfig, optuna.Trial], None] | None = None

    def max_failures(self) -> int:
        """Failures the study may hold: beyond this its failure rate must exceed the bound."""
        return int(self.max_failure_rate * self.n_trials)


@dataclass(frozen=True)
class HostPlan:
    """This host's workers: worker *i* computes on ``devices[(i // trials_per_device) %
    len(devices)]`` for its whole life; they end when the sweep's main process does or the
    stop file appears (``lifecycle``)."""

    devices: list[str]
    trials_per_device: int
    main_pid: int
    stop_file: str
    main_host: str = ""
    #: ``{"cuda:2": "GPU-…"}``: lets a worker in its own process see only its card.
    device_uuids: dict[str, str] = field(default_factory=dict)
    #: Workers the sweep starts on this host.
    workers: int = 1
    #: Whether the workers split the host's CPU cores (torch threads) between them.
    share_cores: bool = False
    #: ``time.time()`` when the sweep started its workers: each says how long it took to join.
    launched_at: float = 0.0

    def device_for(self, worker_index: int) -> str:
        return device_for(self.devices, self.trials_per_device, worker_index)


def device_for(devices: list[str], trials_per_device: int, worker_index: int) -> str:
    """The device worker ``worker_index`` of a host computes on, for its whole life:
    ``trials_per_device`` consecutive workers share each device, round the list."""
    return devices[(worker_index // trials_per_device) % len(devices)]
