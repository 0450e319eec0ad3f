"""Run a batch of sweep trials concurrently as threads of the sweeper's own process.

Why: k trials launched as k processes on one GPU are time-sliced by the driver (no two
processes run kernels at once without MPS), so a small model gains nothing from sharing the
GPU. Threads of one process, each trial on its own CUDA stream, do run concurrently: ResNet-20
on an H100 reaches about 2x the throughput of one trial at k = 8 (docs/benchmarks.md, which
also shows why more is not available: one trial with 16x the batch gains 2.2x).

How each trial stays itself:
- Hydra keeps the job's config in a process-wide singleton (``HydraConfig``); while a batch
  runs it is replaced by one whose value is per thread, so every trial reads its own overrides,
  output directory and job number. Hydra's own ``run_job`` does the rest (``.hydra/`` files,
  the return value or the exception), without reconfiguring logging per job, which would be
  process-wide.
- Each trial thread makes its CUDA device current and runs on its own stream
  (``zsharp_sweeps.train`` does that for any trial off the main thread), CUDA graphs are
  captured in thread-local mode, and model construction (seeded global RNG) is serialised,
  so a trial's initial weights do not depend on its neighbours.
- Refused: ``hydra.job.chdir=true`` (the working directory is process-wide) and
  ``hardware.compile=true`` (TorchDynamo is not thread-safe).

What is not per trial: the global CPU/CUDA random number generators after construction
(augmentation, dropout), so concurrent trials are reproducible statistically, not bit for bit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


class _PerThreadHydraConfig(HydraConfig):
    """``HydraConfig`` whose ``cfg`` is per thread (threads without one see ``fallback``'s)."""

    def __init__(self, fallback: HydraConfig) -> None:  # noqa: D107 - no super(): cfg is a property
        self._local = threading.local()
        self._fallback = fallback

    @property  # type: ignore[override]
    def cfg(self) -> Any:
        return getattr(self._local, "cfg", self._fallback.cfg)

    @cfg.setter
    def cfg(self, value: Any) -> None:
        self._local.cfg = value


class StreamsLauncher(Launcher):
    def __init__(self, n_jobs: int = 4) -> None:
        if n_jobs < 1:
            raise ValueError(f"hydra.launcher.n_jobs={n_jobs} is invalid: allowed an integer >= 1")
        self.n_jobs = n_jobs
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _check(self, cfg: DictConfig) -> None:
        if cfg.hydra.job.chdir:
            raise ValueError(
                "hydra/launcher=zsharp_streams runs trials as threads of one process, which share "
                "one working directory: allowed hydra.job.chdir=false"
            )
        if cfg.get("hardware", {}).get("compile", False):
            raise ValueError(
                "hydra/launcher=zsharp_streams runs trials as threads, and torch.compile is not "
                "thread-safe: allowed hardware.compile=false (keep hardware.cuda_graph=true)"
            )

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        assert self.task_function is not None
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs as threads of one process (streams)")
        configs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides)
            )
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = str(idx)
                sweep_config.hydra.job.num = idx
            self._check(sweep_config)
            configs.append(sweep_config)

        def run(sweep_config: DictConfig) -> JobReturn:
            return run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
                configure_logging=False,
            )

        original = HydraConfig.instance()
        Singleton._instances[HydraConfig] = _PerThreadHydraConfig(original)
        try:
            with ThreadPoolExecutor(max_workers=self.n_jobs, thread_name_prefix="trial") as pool:
                returns = list(pool.map(run, configs))
        finally:
            Singleton._instances[HydraConfig] = original
        return returns
