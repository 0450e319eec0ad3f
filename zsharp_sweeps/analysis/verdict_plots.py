"""Figures of a verdict: validation curves per arm, and test accuracy against sharpness.

Why ``matplotlib.figure.Figure`` with an Agg canvas and not pyplot: pyplot keeps every figure
in a global registry (a leak unless closed) and would need the process-wide backend switched;
a bare Figure is rendered by Agg when saved, and a notebook still displays it. Not in
``zsharp_sweeps.report.plots`` because that module imports optuna and this package stays a leaf.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from zsharp_sweeps.analysis.verdict import SeedResult, Verdict

# Below this many epochs a zoomed panel of the final epochs shows nothing the full one hides.
ZOOM_MIN_EPOCHS = 8
# The zoomed panel shows the last quarter of training, where the arms separate.
ZOOM_FRACTION = 0.25
# Sharpness spanning more than this ratio (SGD vs SAM can differ 100x) gets a log axis.
LOG_RATIO = 30.0


def arm_colours(arms: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """One colour per arm, by position: the same arm order gives the same colours in every plot."""
    cmap = colormaps["tab10" if len(arms) <= 10 else "tab20"]
    return {arm: cmap(i % cmap.N) for i, arm in enumerate(arms)}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG (Agg) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _span(counts: Iterable[int]) -> str:
    counts = sorted(set(counts))
    return f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def val_curves_figure(verdict: Verdict) -> Figure:
    """Mean validation accuracy per epoch with a ±1 std band, one colour per arm.

    With ``ZOOM_MIN_EPOCHS`` epochs or more, a second panel zooms on the last quarter: the arms
    differ by tenths of a point there, invisible on an axis that starts at chance level.
    """
    arms = list(verdict.arms["arm"])
    colours = arm_colours(arms)
    drawn = [a for a in arms if a in verdict.curves]
    if not drawn:
        fig = _figure(6.5, 4.0)
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no validation curves recorded", ha="center", va="center")
        ax.set_axis_off()
        return fig
    longest = max(len(verdict.curves[a][0]) for a in drawn)
    zoom = longest >= ZOOM_MIN_EPOCHS
    fig = _figure(12.0 if zoom else 7.0, 4.6)
    axes = fig.subplots(1, 2) if zoom else [fig.subplots()]
    for ax in axes:
        for arm in drawn:
            epochs, mean, std = verdict.curves[arm]
            colour = colours[arm]
            ax.plot(epochs, 100 * mean, color=colour, lw=1.8,
                    label=f"{arm} (n={verdict.curve_n.get(arm, '?')})")
            ax.fill_between(epochs, 100 * (mean - std), 100 * (mean + std), color=colour,
                            alpha=0.2, lw=0)
        ax.set(xlabel="epoch", ylabel="validation accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if zoom:
        start = max(1, math.floor(longest * (1 - ZOOM_FRACTION)))
        _zoom(axes[1], verdict, drawn, start, longest)
        axes[0].axvspan(start, longest, color="grey", alpha=0.1, lw=0)
        axes[0].set_title("all epochs")
        axes[1].set_title(f"epochs {start}–{longest}")
    axes[0].legend(loc="lower right", fontsize="small", framealpha=0.9)
    seeds = _span(verdict.curve_n.get(a, 0) for a in drawn)
    fig.suptitle(f"Validation accuracy per epoch: mean ± std over {seeds} seeds")
    return fig


def _zoom(ax, verdict: Verdict, arms: Sequence[str], start: int, stop: int) -> None:
    """Limit ``ax`` to epochs start..stop and to the band the curves span there."""
    low, high = [], []
    for arm in arms:
        epochs, mean, std = verdict.curves[arm]
        window = epochs >= start
        if window.any():
            band = np.nan_to_num(std[window])
            low.append(np.min(100 * (mean[window] - band)))
            high.append(np.max(100 * (mean[window] + band)))
    if low:
        pad = max(0.05, 0.08 * (max(high) - min(low)))
        ax.set_ylim(min(low) - pad, max(high) + pad)
    ax.set_xlim(start, stop)


def sharpness_figure(results: Iterable[SeedResult], key: str = "sharpness/sam",
                     arms: Sequence[str] | None = None) -> Figure:
    """Test accuracy (%) against ``key``: each seed a dot, each arm's mean ± std a large marker.

    ``arms`` fixes the order (and so the colours, matching ``val_curves_figure``); by default
    the order in which arms first appear. Runs without a finite ``key`` are left out.
    """
    points: dict[str, list[tuple[float, float]]] = {a: [] for a in arms or ()}
    for r in results:
        value = r.sharpness.get(key, math.nan)
        if math.isfinite(value) and math.isfinite(r.test_acc):
            points.setdefault(r.arm, []).append((value, 100 * r.test_acc))
    points = {a: p for a, p in points.items() if p}
    if not points:
        raise ValueError(f"no result measured {key!r}")
    colours = arm_colours(list(arms) if arms else list(points))
    fig = _figure(7.0, 4.8)
    ax = fig.subplots()
    for arm, pts in points.items():
        x, y = np.array(pts).T
        colour = colours.get(arm, "grey")
        ax.scatter(x, y, s=14, color=colour, alpha=0.5, lw=0)
        err = (np.std(x, ddof=1), np.std(y, ddof=1)) if len(x) > 1 else (None, None)
        ax.errorbar(x.mean(), y.mean(), xerr=err[0], yerr=err[1], fmt="o", ms=9,
                    color=colour, mec="black", mew=0.8, ecolor=colour, elinewidth=1.4,
                    capsize=3, label=f"{arm} (n={len(x)})", zorder=3)
    xs = np.array([p[0] for pts in points.values() for p in pts])
    if (xs > 0).all() and xs.max() / xs.min() > LOG_RATIO:
        ax.set_xscale("log")
    ax.set(xlabel=key, ylabel="test accuracy (%)",
           title=f"Test accuracy vs {key}: seeds (dots), arm mean ± std (markers)")
    ax.margins(0.08)  # keep the large markers of the extreme arms inside the axes
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small", framealpha=0.9)
    return fig
