"""``python -m zsharp_sweeps.train``: the Hydra adapter of training.

Thin on purpose (docs/architecture.md): Hydra composes the config from ``conf/``; ``task``
validates it, runs it (``zsharp_sweeps.training.run``) and returns the objective(s), so any
Hydra sweeper can optimise it. Single runs and sweep trials take the same path: a sweep
worker (``hydra/sweeper=zsharp_optuna``) runs ``task`` once per trial, with the trial's
``RunContext`` (device, names, parent run, pruning, warm data, checkpoints) made current.
``main`` is the command-line edge: bad input is one line and exit status 2, a stop by a
signal 128 + the signal (``zsharp_sweeps.cli``).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from zsharp_sweeps import cli
from zsharp_sweeps.config import ConfigError, register_configs, validate
from zsharp_sweeps.training.context import RunContext, current_context
from zsharp_sweeps.training.failures import TrainingFailed
from zsharp_sweeps.training.run import (
    check_config as check_settings,
)
from zsharp_sweeps.training.run import (
    objective_values,
    record_rejected,
    run_experiment,
)
from zsharp_sweeps.training.signals import graceful_stop

# An absolute path: the same whether this runs as ``__main__`` or as an imported module.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

register_configs()


def check_config(cfg: DictConfig) -> None:
    """Every check that needs neither the machine nor the data: the schema's ranges, the
    model's parameters, the split sizes. The sweeper runs it at every edge of the search
    space before it creates anything (``zsharp_sweeps.sweep.protocols.ChecksConfig``)."""
    check_settings(validate(cfg))


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # called without Hydra (tests)
        return []


def _sweep_without_multirun() -> str | None:
    """The ``+sweep=NAME`` of a single run (no ``--multirun``): a search space that would
    be ignored, the run training the defaults instead."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # called without Hydra (tests)
        return None
    name = hydra_cfg.runtime.choices.get("sweep")
    return name if name and hydra_cfg.mode == RunMode.RUN else None


def task(cfg: DictConfig) -> float | tuple[float, ...]:
    """Hydra's task function: one configuration (``study.n_seeds`` runs) trained and
    recorded in MLflow; returns the objective(s) for the sweeper.

    SIGTERM (kill, SLURM, docker stop) and Ctrl-C are acted on between training steps, so no
    MLflow write is cut in half (a second signal stops at once); the run ends KILLED."""
    trial = current_context()  # a sweep trial's, made current by its worker
    context = trial or RunContext(overrides=_task_overrides())
    sweep = None if trial is not None else _sweep_without_multirun()
    if sweep is not None:
        raise cli.BadInput() from ConfigError(
            f"+sweep={sweep} is a sweep config: it needs --multirun (python -m "
            f"zsharp_sweeps.train --multirun +sweep={sweep} ...); without it one ordinary run "
            "would train and nothing would be swept")
    try:
        with graceful_stop():
            try:
                train_cfg = validate(cfg)
            except ConfigError as exc:
                if trial is not None:  # its (FAILED) MLflow run says what was wrong
                    record_rejected(cfg, trial, exc)
                raise
            summary = run_experiment(train_cfg, context)
    except cli.bad_input_errors() as exc:
        if trial is not None:
            raise  # the trial fails; the sweep goes on
        raise cli.BadInput() from exc  # a single run: to the command-line edge, exit 2
    except TrainingFailed as exc:
        if trial is not None:
            raise  # the trial fails with this one line as its reason; the sweep goes on
        raise cli.RunFailed() from exc  # a single run: one line at the edge, exit 1
    return objective_values(train_cfg, summary)


task.check_config = check_config  # type: ignore[attr-defined]  (the sweeper's ChecksConfig)

# No version_base: Hydra 1.4 deprecates the argument (it warned on every command, --help too).
_hydra_main = hydra.main(config_path=CONF_DIR, config_name="config")(task)


def main() -> None:
    """The command (``python -m zsharp_sweeps.train``, ``zsharp-train``)."""
    with cli.edge():
        _hydra_main()


if __name__ == "__main__":
    # Run the copy imported under the package name, not this ``__main__`` module: launchers
    # (joblib/loky, submitit) pickle the task function by reference, which needs a module
    # other processes can import.
    from zsharp_sweeps.train import main as entry_point

    entry_point()
