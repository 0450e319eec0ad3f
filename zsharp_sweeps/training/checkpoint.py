"""Per-epoch checkpoints: what a killed run, or a sweep trial retried after its worker died,
resumes from, bit for bit.

Why every piece of state is in it: a resumed run must produce the numbers the uninterrupted
run would have (``tests/test_checkpoint.py`` pins this), so a checkpoint holds

* the model's ``state_dict`` and the optimizer's: for the SAM family that includes the base
  optimizer's state (momentum buffers, Adam moments), Friendly-SAM's momentum and ZSharp's
  random-filter generator (``SAMBase.state_dict``);
* the lr scheduler and the fp16 ``GradScaler``;
* the epoch just finished and the history of per-epoch metrics so far (so the summary and the
  best-validation epoch are right after a resume);
* the random number generators: Python's, NumPy's, torch's CPU generator and every CUDA
  device's. The training loaders draw their shuffle and augmentation from generators seeded
  by ``(seed, epoch)`` (``zsharp_sweeps.data.loaders``), so ``fit`` calling
  ``loader.set_epoch`` restores them without storing them;
* the MLflow run id, so the resumed run logs its remaining epochs into the same run;
* the resolved config, so resuming under a different config is refused with the keys that
  differ (only tracking, sweep identity, device and progress settings may change).

Layout: ``<checkpoint_dir>/epoch-0003.pt``. Each file is written to a temporary name,
flushed to disk and renamed over its final name (``os.replace`` is atomic on POSIX), so a
process killed mid-write leaves the previous checkpoint intact and never a torn file. While
a run goes on, only its latest and its best-validation checkpoint stay on disk; when it has
finished, ``trainer.keep_checkpoints`` decides: ``last``, ``best`` or ``none``.

Files load with ``torch.load(weights_only=True)``: NumPy's generator state is stored as a
tensor, so nothing needs unpickling arbitrary objects.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zsharp_sweeps.config import KEEP_CHECKPOINTS, ConfigError, TrainConfig, flatten

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NAME = re.compile(r"^epoch-(\d+)\.pt$")

#: Config keys (dotted prefixes) that may differ between a run and the run it resumes: where
#: results go, which sweep trial it is, which device and how chatty. Anything else changes
#: what is computed, so resuming across it is refused.
RESUME_MAY_DIFFER: tuple[str, ...] = (
    "trainer.checkpoint", "trainer.checkpoint_dir", "trainer.resume", "trainer.keep_checkpoints",
    "trainer.progress", "tracking.", "study.", "hardware.device", "hardware.num_threads",
    "hardware.trials_per_gpu",
)


@dataclass
class TrainingState:
    """The live objects a checkpoint is taken from and restored into (``fit`` builds it)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None = None
    history: list[dict[str, float]] = field(default_factory=list)


# --- random number generators ------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every global generator the training loop may draw from (dropout, sharpness probes)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`. CUDA states are restored when the device count matches
    (a run resumed on a host with other GPUs keeps its fresh CUDA generators, logged)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    np.random.set_state((
        npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
        npy["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint has CUDA generator states for %d devices, this host has %d: "
                "CUDA generators not restored", len(cuda), torch.cuda.device_count(),
            )


# --- taking and restoring ----------------------------------------------------------------
def snapshot(
    epoch: int,
    state: TrainingState,
    *,
    run_id: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to continue after ``epoch`` (1-based), as one ``torch.save``-able dict."""
    return {
        "format": FORMAT_VERSION,
        "epoch": int(epoch),
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "history": [dict(h) for h in state.history],
        "rng": rng_state(),
        "run_id": run_id,
        "config": dict(config) if config is not None else None,
    }


def restore(payload: Mapping[str, Any], state: TrainingState) -> int:
    """Load ``payload`` into ``state`` (RNGs last, so nothing after it draws); returns the
    epoch the checkpoint was taken after. ``state.history`` is replaced in place."""
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    if state.scaler is not None and payload.get("scaler") is not None:
        state.scaler.load_state_dict(payload["scaler"])
    state.history[:] = [dict(h) for h in payload["history"]]
    set_rng_state(payload["rng"])
    return int(payload["epoch"])


# --- files ---------------------------------------------------------------------------------
def checkpoint_path(directory: str | os.PathLike, epoch: int) -> Path:
    return Path(directory) / f"epoch-{epoch:04d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the checkpoints in ``directory``, oldest first (none: ``[]``)."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``directory``, or None (what a retried trial resumes from)."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_atomic(payload: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(dict(payload), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return target


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file (on the CPU; ``restore`` moves tensors to the model's device)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise ConfigError(
            f"trainer.resume={str(path)!r} is invalid: allowed a zsharp-sweeps checkpoint "
            f"(format {FORMAT_VERSION}), got a file without that format"
        )
    return payload


def resolve_resume(resume: str | os.PathLike, *, seed_subdir: str | None = None) -> Path | None:
    """The checkpoint file ``trainer.resume`` points at.

    A file: itself (it must exist). A directory: its latest checkpoint, looked up in
    ``seed_subdir`` below it when given (runs of a multi-seed configuration checkpoint into
    ``seed-<seed>/``); an existing directory with no checkpoint yet gives None, i.e. start
    at epoch 1: a sweep trial whose worker died during its first epoch is retried that way.
    """
    path = Path(resume).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(
            f"trainer.resume={str(resume)!r} is invalid: allowed an existing checkpoint file "
            "(epoch-NNNN.pt) or a checkpoint directory; nothing exists at that path"
        )
    if seed_subdir is not None:
        path = path / seed_subdir
    return latest_checkpoint(path)


def _may_differ(key: str, patterns: Sequence[str]) -> bool:
    """``"study."`` matches every key below ``study``; ``"hardware.device"`` only itself."""
    return any(
        key.startswith(p) if p.endswith(".") else key == p or key.startswith(p + ".")
        for p in patterns
    )


def config_differences(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    may_differ: Sequence[str] = RESUME_MAY_DIFFER,
) -> list[str]:
    """Dotted keys whose values differ between two (nested) configs, ignoring ``may_differ``."""
    old, new = flatten(saved), flatten(current)
    missing = object()
    return [
        key for key in sorted(set(old) | set(new))
        if not _may_differ(key, may_differ) and old.get(key, missing) != new.get(key, missing)
    ]


def check_compatible(
    saved: Mapping[str, Any] | None, current: Mapping[str, Any], path: str | os.PathLike
) -> None:
    """Refuse to resume a checkpoint written under a different config (names the keys)."""
    if saved is None:
        return
    diffs = config_differences(saved, current)
    if diffs:
        old, new = flatten(saved), flatten(current)
        shown = ", ".join(
            f"{k}: checkpoint {old.get(k, '<unset>')!r} vs now {new.get(k, '<unset>')!r}"
            for k in diffs[:5]
        )
        more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
        raise ConfigError(
            f"trainer.resume={str(path)!r} is invalid: the checkpoint was written under another "
            f"config ({shown}{more}); allowed: the same config, where only "
            + ", ".join(p.rstrip(".") for p in RESUME_MAY_DIFFER) + " may differ"
        )


# --- the per-run writer --------------------------------------------------------------------
def _best_epoch(history: Sequence[Mapping[str, float]]) -> int | None:
    """The first epoch with the highest finite ``val_acc`` (what ``best_val_acc`` reports)."""
    best, best_epoch = -math.inf, None
    for row in history:
        value = row.get("val_acc", math.nan)
        if math.isfinite(value) and value > best:
            best, best_epoch = value, int(row["epoch"])
    return best_epoch


class Checkpointer:
    """Writes one run's checkpoint after every epoch and tidies the directory.

    During the run the latest checkpoint (to resume from) and the best-validation one (for
    ``keep="best"``) are kept; :meth:`finish` applies ``keep`` once the run has ended.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        run_id: str | None = None,
        config: Mapping[str, Any] | None = None,
        keep: str = "last",
    ) -> None:
        if keep not in KEEP_CHECKPOINTS:
            raise ConfigError(
                f"trainer.keep_checkpoints={keep!r} is invalid: allowed one of "
                + ", ".join(KEEP_CHECKPOINTS)
            )
        self.directory = Path(directory)
        self.run_id = run_id
        self.config = dict(config) if config is not None else None
        self.keep = keep
        self.history: list[dict[str, float]] = []

    def save(self, epoch: int, state: TrainingState) -> Path:
        """Checkpoint the state after ``epoch``; older ones that are neither the best nor
        the latest are deleted."""
        path = save_atomic(
            snapshot(epoch, state, run_id=self.run_id, config=self.config),
            checkpoint_path(self.directory, epoch),
        )
        self.history = [dict(h) for h in state.history]
        self._prune(keep_epochs={epoch, _best_epoch(self.history)})
        return path

    def finish(self, history: Sequence[Mapping[str, float]] | None = None) -> list[Path]:
        """Apply ``keep`` now that the run is over (``history``: the run's per-epoch metrics,
        default what the last :meth:`save` saw); returns what is left on disk."""
        if history is not None:
            self.history = [dict(h) for h in history]
        found = list_checkpoints(self.directory)
        if not found:
            return []
        if self.keep == "none":
            self._prune(keep_epochs=set())
            with contextlib.suppress(OSError):
                self.directory.rmdir()  # only if nothing else lives there
            return []
        if self.keep == "best":
            best = _best_epoch(self.history) if self.history else None
            keep = {best if best is not None else found[-1][0]}
        else:
            keep = {found[-1][0]}
        self._prune(keep_epochs=keep)
        return [path for _, path in list_checkpoints(self.directory)]

    def _prune(self, keep_epochs: set[int | None]) -> None:
        for epoch, path in list_checkpoints(self.directory):
            if epoch not in keep_epochs:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


# --- what a training run needs ---------------------------------------------------------------
def _seed_subdir(cfg: TrainConfig) -> str | None:
    """Runs of a multi-seed configuration share its settings: each checkpoints apart."""
    return f"seed-{cfg.seed}" if cfg.study.n_seeds > 1 else None


def checkpoint_dir_for(cfg: TrainConfig) -> Path | None:
    """Where this run writes its checkpoints, or None when it writes none.

    ``trainer.checkpoint_dir`` if set, else ``<Hydra output dir>/checkpoints`` inside a Hydra
    run; a run started from Python without Hydra and without a directory writes none.
    ``seed-<seed>/`` below it for each run of a multi-seed configuration.
    """
    tcfg = cfg.trainer
    if not tcfg.checkpoint:
        return None
    if tcfg.checkpoint_dir is not None:
        base = Path(tcfg.checkpoint_dir).expanduser()
    else:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        base = Path(HydraConfig.get().runtime.output_dir) / "checkpoints"
    sub = _seed_subdir(cfg)
    return base / sub if sub else base


@dataclass
class Resume:
    """A checkpoint chosen by ``trainer.resume`` and checked against the run's config."""

    path: Path
    payload: dict[str, Any]

    @property
    def epoch(self) -> int:
        return int(self.payload["epoch"])

    @property
    def run_id(self) -> str | None:
        return self.payload.get("run_id")

    @property
    def history(self) -> list[dict[str, float]]:
        return self.payload["history"]


def prepare_resume(cfg: TrainConfig, resolved: Mapping[str, Any]) -> Resume | None:
    """Load and check the checkpoint ``trainer.resume`` names (None: start at epoch 1).

    Runs before any MLflow run is opened, so a wrong path or a checkpoint of another config
    fails with a ``ConfigError`` that names ``trainer.resume`` and costs nothing.
    """
    if cfg.trainer.resume is None:
        return None
    path = resolve_resume(cfg.trainer.resume, seed_subdir=_seed_subdir(cfg))
    if path is None:
        log.info("trainer.resume=%s holds no checkpoint yet: starting at epoch 1",
                 cfg.trainer.resume)
        return None
    payload = load_checkpoint(path)
    check_compatible(payload.get("config"), resolved, path)
    log.info("resuming from %s (after epoch %d)", path, payload["epoch"])
    return Resume(path, payload)
