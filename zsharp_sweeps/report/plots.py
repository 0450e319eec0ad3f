"""Figures of a sweep's report (a run's own curves: ``zsharp_sweeps.training.curves``).

Sweep plots come from ``optuna.visualization.matplotlib`` wherever it has them: history,
importances, slice (objective vs each parameter, log axes for log-sampled ones), contour
(every pair), parallel coordinates and the Pareto front. What it does not draw is here:
per-trial validation curves read from MLflow. Optuna marks its matplotlib plots
experimental and switches pyplot to its ggplot style; both stay inside ``_optuna_figure``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import Colormap, ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
)
from optuna.trial import FrozenTrial  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

from zsharp_sweeps.sweep.quiet import optuna_experimental  # noqa: E402

# Below this many complete trials parameter importances are mostly noise: say so.
IMPORTANCE_MIN_TRIALS = 10
# More parameters than this make the contour matrix unreadable: keep the most important.
CONTOUR_MAX_PARAMS = 3

Target = Callable[[FrozenTrial], float] | None


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG and release it (pyplot keeps every open figure otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ----- sweep plots from optuna -----------------------------------------------------------
def _optuna_figure(plot: Callable[..., object], *args: object, **kwargs: object) -> Figure:
    """Call an optuna matplotlib plot without its ExperimentalWarning or global style change."""
    with optuna_experimental(), matplotlib.rc_context():
        axes = plot(*args, **kwargs)
    fig = np.ravel(axes)[0].figure
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                _plain_log_ticks(axis)
    return fig


def _plain_log_ticks(axis: matplotlib.axis.Axis) -> None:
    """Ticks at 1, 2, 5 x 10^k labelled ``0.02``: within one decade matplotlib labels every
    minor tick as ``2x10^-2`` and neighbours overlap."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def history_figure(study: optuna.Study, target: Target, name: str) -> Figure:
    fig = _optuna_figure(optuna_plots.plot_optimization_history, study,
                         target=target, target_name=name)
    fig.axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def importances_figure(
    study: optuna.Study, params: list[str], n_complete: int, target: Target, name: str
) -> Figure:
    """Importances, with a warning in the title when too few trials make them unreliable."""
    fig = _optuna_figure(optuna_plots.plot_param_importances, study, params=params,
                         target=target, target_name=name)
    if n_complete < IMPORTANCE_MIN_TRIALS:
        fig.axes[0].set_title(importance_warning(n_complete), loc="left", color="darkred",
                              fontsize=10)
    fig.set_size_inches(7, 1.6 + 0.5 * len(params))
    return fig


def importance_warning(n_complete: int) -> str:
    return (f"WARNING: importances from only {n_complete} complete trials "
            f"(< {IMPORTANCE_MIN_TRIALS}) are unreliable")


def slice_figure(study: optuna.Study, params: list[str], target: Target, name: str) -> Figure:
    fig = _optuna_figure(optuna_plots.plot_slice, study, params=params,
                         target=target, target_name=name)
    fig.set_size_inches(max(4.0, 3.6 * len(params)), 4.0)
    return fig


def contour_figure(study: optuna.Study, params: list[str], target: Target, name: str) -> Figure:
    fig = _optuna_figure(optuna_plots.plot_contour, study, params=params,
                         target=target, target_name=name)
    side = 6.0 if len(params) == 2 else 3.2 * len(params)
    fig.set_size_inches(side + 1.5, side)
    return fig


def parallel_figure(study: optuna.Study, params: list[str], target: Target, name: str) -> Figure:
    """Parallel coordinates, with the full parameter names and every line visible."""
    fig = _optuna_figure(optuna_plots.plot_parallel_coordinate, study, params=params,
                         target=target, target_name=name)
    ax = fig.axes[0]
    for lines in ax.collections:  # optuna's Blues maps the worst trial to white: invisible
        if isinstance(lines, LineCollection):
            lines.set_cmap(_without_white_end(lines.get_cmap()))
    labels = [label.get_text() for label in ax.get_xticklabels()]
    ax.set_xticks(ax.get_xticks(), [_untruncated(text, params) for text in labels],
                  rotation=330, ha="left")
    fig.set_size_inches(max(6.0, 2.2 * (len(params) + 1)), 4.5)
    return fig


def _without_white_end(cmap: Colormap) -> Colormap:
    """The colormap minus its lightest quarter (at whichever end that is)."""
    light_first = sum(cmap(0.0)[:3]) > sum(cmap(1.0)[:3])
    stops = np.linspace(0.3, 1.0, 256) if light_first else np.linspace(0.0, 0.7, 256)
    return ListedColormap(cmap(stops))


def _untruncated(label: str, params: list[str]) -> str:
    """Optuna cuts long axis names to ``optimizer.percent...``: give back the full name."""
    if not label.endswith("..."):
        return label
    matches = [p for p in params if p.startswith(label[:-3])]
    return matches[0] if len(matches) == 1 else label


def pareto_figure(study: optuna.Study, names: list[str]) -> Figure:
    return _optuna_figure(optuna_plots.plot_pareto_front, study, target_names=names)


# ----- validation curves from MLflow -----------------------------------------------------
@dataclass(frozen=True)
class TrialCurve:
    """One trial's per-epoch validation accuracy (the seed mean when it ran several seeds)."""

    number: int
    state: str  # the Optuna trial state: COMPLETE, PRUNED, FAIL
    params: dict[str, object]
    points: list[tuple[int, float]]  # (epoch, val_acc)

    @property
    def label(self) -> str:
        """``#3 rho=0.0312 percentile=0.81 lr=0.12 (pruned)``: short names, 3 digits."""
        shown = [f"{_short(k, self.params)}={_fmt(v)}" for k, v in self.params.items()]
        state = "" if self.state == "COMPLETE" else f" ({self.state.lower()})"
        return " ".join([f"#{self.number}", *shown]) + state


def _short(name: str, params: dict[str, object]) -> str:
    """The last dotted component, unless another parameter shares it."""
    last = name.rsplit(".", 1)[-1]
    clash = sum(k.rsplit(".", 1)[-1] == last for k in params) > 1
    return name if clash else last


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def val_curves_figure(curves: Sequence[TrialCurve], title: str) -> Figure:
    """One line per trial, each its own colour and legend entry; pruned trials dashed."""
    n = len(curves)
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "viridis")
    colours = [cmap(i) if n <= 20 else cmap(i / max(n - 1, 1)) for i in range(n)]
    columns = 1 + (n - 1) // 25
    fig, ax = plt.subplots(figsize=(7 + 3.2 * columns, 4.5))
    for curve, colour in zip(curves, colours):
        epochs, values = zip(*sorted(curve.points))
        style = "-" if curve.state == "COMPLETE" else "--"
        ax.plot(epochs, values, style, color=colour, marker="o", markersize=3, label=curve.label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="validation accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, ncol=columns,
              title="trial", title_fontsize=8, frameon=False)
    return fig


# ----- which sweep plots a study gets ----------------------------------------------------
def _file_name(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_")


def _varied(trials: Sequence[FrozenTrial], params: list[str]) -> list[str]:
    """Parameters that took at least two values (a contour over a constant is empty)."""
    return [p for p in params if len({repr(t.params.get(p)) for t in trials}) > 1]


def _most_important(study: optuna.Study, params: list[str], target: Target) -> list[str]:
    if len(params) <= CONTOUR_MAX_PARAMS:
        return params
    ranked = optuna.importance.get_param_importances(study, params=params, target=target)
    return list(ranked)[:CONTOUR_MAX_PARAMS]


def sweep_figures(study: optuna.Study, names: list[str]) -> tuple[dict[str, Figure], list[str]]:
    """The optuna plots this study supports, by file stem, and why the others are missing.

    Slice and importances cover every swept parameter; contour and parallel coordinates
    need two parameters that vary, and leave out ``seed`` (noise, not a setting). With
    several objectives there is a Pareto front and one set of plots per objective.
    """
    figures: dict[str, Figure] = {}
    notes: list[str] = []
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return figures, ["no complete trial: no plot of the objective"]
    # A seed is a replicate, never a hyperparameter: no importance, slice or contour for it
    # (its "importance" is the noise between runs, and it would rank beside real settings).
    params = list(dict.fromkeys(p for t in complete for p in t.params if p != "seed"))
    multi = len(study.directions) > 1
    if multi and len(names) in (2, 3):
        figures["pareto"] = pareto_figure(study, names)
    elif multi:
        notes.append(f"no Pareto front: it is drawn for 2 or 3 objectives, not {len(names)}")
    shaped = _varied(complete, params)
    for i, name in enumerate(names):
        target: Target = (lambda t, i=i: t.values[i]) if multi else None
        suffix = f"_{_file_name(name)}" if multi else ""
        figures[f"history{suffix}"] = history_figure(study, target, name)
        if not params:
            notes.append("no parameter but seed was swept: no slice, importance or contour "
                         "plot")
            break
        figures[f"slice{suffix}"] = slice_figure(study, params, target, name)
        if len(complete) < 2:
            notes.append("importances need 2+ complete trials; this study has 1")
        else:
            figures[f"importances{suffix}"] = importances_figure(
                study, params, len(complete), target, name)
        if len(shaped) < 2:
            notes.append(
                f"contour and parallel coordinates need 2+ varying parameters besides seed; "
                f"this study has {len(shaped)}{': ' + shaped[0] if shaped else ''}")
            continue
        figures[f"contour{suffix}"] = contour_figure(
            study, _most_important(study, shaped, target), target, name)
        figures[f"parallel_coordinate{suffix}"] = parallel_figure(study, shaped, target, name)
    return figures, list(dict.fromkeys(notes))
