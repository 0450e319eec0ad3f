"""What a run prints while it trains: progress bars on a terminal, one line per epoch elsewhere.

Why: tqdm redraws its bars with carriage returns and ANSI escape codes. In a terminal that
is a live bar; in a log file, a CI log, ``| tee`` or a SLURM ``.out`` file it is a wall of
``\\r`` and ``\\x1b[A`` noise. Off a terminal the same information is one plain log line per
epoch, which reads well anywhere.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TextIO

__all__ = ["EPOCH_LINE_KEYS", "epoch_line", "show_progress_bars"]

#: The metrics of the per-epoch line (in this order), when the epoch has them.
EPOCH_LINE_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_acc")


def show_progress_bars(progress: bool, stream: TextIO | None = None) -> bool:
    """Bars only if ``trainer.progress`` is on and ``stream`` (tqdm's: stderr) is a TTY."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(progress and isatty is not None and isatty())


def epoch_line(epoch: int, epochs: int, metrics: Mapping[str, float]) -> str:
    """``epoch 2/3: train_loss=0.4312 ... (12.3 s)``: the bar's information as plain text."""
    parts = [f"{k}={metrics[k]:.4f}" for k in EPOCH_LINE_KEYS if k in metrics]
    took = f" ({metrics['epoch_time_s']:.1f} s)" if "epoch_time_s" in metrics else ""
    return f"epoch {epoch}/{epochs}: {' '.join(parts)}{took}"
