"""``python -m zsharp_sweeps.verdict``: the Hydra adapter of the verdict (see ``app``).

Bad input is one line on stderr and exit status 2, before anything is created (a config
that does not compose too: ``zsharp_sweeps.cli``); a stop (SIGTERM, Ctrl-C) leaves every
stage resumable and exits 128 + the signal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from zsharp_sweeps import cli
from zsharp_sweeps.config import ConfigError, register_configs, section
from zsharp_sweeps.training.signals import exit_code, graceful_stop
from zsharp_sweeps.verdict.settings import load_settings, register_verdict_schema

register_configs()
register_verdict_schema()

# An absolute path: the same whether this runs as ``__main__`` or as an imported module.
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def _devices(cfg: DictConfig) -> tuple[int, str]:
    """Devices the stages' sweeps spread over: every visible GPU, else one (CPU, MPS)."""
    hardware = section(cfg, "hardware")
    if hardware.device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count(), "cuda"
    return 1, "cpu" if hardware.device in ("auto", "cpu") else hardware.device


@hydra.main(config_path=CONF_DIR, config_name="verdict")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from zsharp_sweeps.verdict.app import Stopped, prepare, run
    from zsharp_sweeps.verdict.plan import training_overrides
    from zsharp_sweeps.verdict.runner import StageFailed

    try:
        # A signal is acted on where it is safe (never inside a database write).
        with graceful_stop():
            settings = load_settings(cfg.verdict)
            common = training_overrides(list(HydraConfig.get().overrides.task), settings)
            verdict = prepare(settings, common, section(cfg, "tracking"), *_devices(cfg))
            run(verdict)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except Stopped as exc:
        print("Verdict stopped: rerun the same command to resume", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt as exc:  # during the checks: nothing to resume yet
        print("Verdict stopped before it started", file=sys.stderr)
        sys.exit(exit_code(exc))


def entry_point() -> None:
    """The command: Hydra's own errors (an unknown option, a misspelled key) are one line
    and exit status 2 too (``zsharp_sweeps.cli.edge``)."""
    with cli.edge():
        main()


if __name__ == "__main__":
    entry_point()
