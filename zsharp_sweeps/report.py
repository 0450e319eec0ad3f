"""``python -m zsharp_sweeps.report <sweep dir | study storage>``: what a sweep found.

Prints a best-settings table and writes plots (objective vs Q_p, rho x Q_p heatmap,
optimisation history, parameter importances, validation-accuracy curves per optimizer,
the Pareto front of a multi-objective study) and a seed table with mean +- std, plus a
paired test between two optimizers across seeds (``--compare zsharp,sam``). Everything is
written to ``--out`` and, when the study has an MLflow parent run, logged to it.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from zsharp_sweeps.tables import format_table  # noqa: E402

RHO, QP, LR = "optimizer.rho", "optimizer.percentile", "optimizer.lr"


# ----- loading ---------------------------------------------------------------------------
def storage_url(target: str) -> str:
    """A sweep directory, an ``optuna.db`` file or a storage URL -> a storage URL."""
    if "://" in target:
        return target
    path = Path(target)
    if path.is_dir():
        path = path / "optuna.db"
    if not path.exists():
        raise FileNotFoundError(
            f"no Optuna storage at {path}: pass a sweep directory (multirun/<study>), "
            "its optuna.db, or a storage URL such as sqlite:///path/optuna.db"
        )
    return f"sqlite:///{path.resolve()}"


def load_study(target: str, study_name: str | None = None) -> optuna.Study:
    url = storage_url(target)
    names = optuna.study.get_all_study_names(storage=url)
    if study_name is None:
        if len(names) != 1:
            raise ValueError(f"{url} holds studies {names}: choose one with --study")
        study_name = names[0]
    elif study_name not in names:
        raise ValueError(f"no study {study_name!r} in {url}; it holds {names}")
    return optuna.load_study(study_name=study_name, storage=url)


# ----- tables ----------------------------------------------------------------------------
def best_settings(study: optuna.Study, top: int = 10) -> list[dict[str, Any]]:
    """The best complete trials, best first (single objective) or the Pareto front."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(study.directions) > 1:
        rows = study.best_trials
    else:
        reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
        rows = sorted(complete, key=lambda t: t.value, reverse=reverse)[:top]
    return [
        {"trial": t.number, **{f"value{i}" if len(t.values) > 1 else "value": v
                              for i, v in enumerate(t.values)}, **t.params}
        for t in rows
    ]


def state_counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {s.name: n for s in TrialState if (n := sum(t.state == s for t in trials))}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired t-test of a - b across seeds (and Wilcoxon's signed-rank where it is defined)."""
    from scipy import stats

    a_arr, b_arr = np.asarray(a, float), np.asarray(b, float)
    diff = a_arr - b_arr
    out = {"n": float(diff.size), "mean_diff": float(diff.mean()),
           "std_diff": float(diff.std(ddof=1)) if diff.size > 1 else 0.0}
    if diff.size >= 2 and np.any(diff != diff[0]):
        t = stats.ttest_rel(a_arr, b_arr)
        out.update(t_stat=float(t.statistic), p_value=float(t.pvalue))
    else:
        out.update(t_stat=math.nan, p_value=math.nan)
    return out


# ----- plots -----------------------------------------------------------------------------
def _complete_single(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    if len(study.directions) != 1:
        return []
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def plot_history(study: optuna.Study, path: Path) -> Path | None:
    trials = _complete_single(study)
    if not trials:
        return None
    xs = [t.number for t in trials]
    ys = [t.value for t in trials]
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    best = [pick(ys[: i + 1]) for i in range(len(ys))]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(xs, ys, label="trial", alpha=0.7)
    ax.step(xs, best, where="post", color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel="objective", title=f"optimisation history: {study.study_name}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_objective_vs(study: optuna.Study, param: str, path: Path) -> Path | None:
    trials = [t for t in _complete_single(study) if param in t.params]
    if not trials:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = np.array([t.params[param] for t in trials], dtype=float)
    ys = np.array([t.value for t in trials], dtype=float)
    ax.scatter(xs, ys, alpha=0.7)
    uniq = np.unique(xs)
    if len(uniq) < len(xs):  # a grid: show the mean per value too
        ax.plot(uniq, [ys[xs == u].mean() for u in uniq], color="C3", marker="o", label="mean")
        ax.legend()
    ax.set(xlabel=param, ylabel="objective", title=f"objective vs {param}")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_rho_qp_heatmap(study: optuna.Study, path: Path, bins: int = 6) -> Path | None:
    trials = [t for t in _complete_single(study) if RHO in t.params and QP in t.params]
    if len(trials) < 2:
        return None
    rho = np.log10([t.params[RHO] for t in trials])
    qp = np.array([t.params[QP] for t in trials], dtype=float)
    val = np.array([t.value for t in trials], dtype=float)
    r_edges = np.linspace(rho.min(), rho.max() + 1e-9, bins + 1)
    q_edges = np.linspace(qp.min(), qp.max() + 1e-9, bins + 1)
    grid = np.full((bins, bins), np.nan)
    ri = np.clip(np.digitize(rho, r_edges) - 1, 0, bins - 1)
    qi = np.clip(np.digitize(qp, q_edges) - 1, 0, bins - 1)
    for i in range(bins):
        for j in range(bins):
            sel = (qi == i) & (ri == j)
            if sel.any():
                grid[i, j] = val[sel].mean()
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(
        grid, origin="lower", aspect="auto", cmap="viridis",
        extent=(r_edges[0], r_edges[-1], q_edges[0], q_edges[-1]),
    )
    ax.scatter(rho, qp, c="white", s=10, edgecolors="black", linewidths=0.5)
    fig.colorbar(image, ax=ax, label="mean objective")
    ax.set(xlabel="log10 rho", ylabel="Q_p (percentile)", title="objective over rho x Q_p")
    return _save(fig, path)


def plot_importances(study: optuna.Study, path: Path) -> Path | None:
    trials = _complete_single(study)
    if len(trials) < 3:
        return None
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):
        return None
    if not importances:
        return None
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(importances)))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance (fANOVA)", title="parameter importances")
    return _save(fig, path)


def plot_pareto(study: optuna.Study, path: Path) -> Path | None:
    if len(study.directions) != 2:
        return None
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not trials:
        return None
    front = {t.number for t in study.best_trials}
    fig, ax = plt.subplots(figsize=(6, 4))
    for on_front, colour, label in ((False, "C0", "trial"), (True, "C3", "Pareto front")):
        pts = [t.values for t in trials if (t.number in front) == on_front]
        if pts:
            ax.scatter(*zip(*pts), c=colour, label=label)
    ax.set(xlabel="objective 0", ylabel="objective 1", title="Pareto front")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_val_curves(curves: dict[str, list[list[tuple[int, float]]]], path: Path) -> Path | None:
    """Validation accuracy per epoch, one colour per optimizer, one line per run."""
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (optimizer, runs) in enumerate(sorted(curves.items())):
        for k, run in enumerate(runs):
            steps, values = zip(*sorted(run)) if run else ((), ())
            ax.plot(steps, values, color=f"C{i}", alpha=0.6, label=optimizer if k == 0 else None)
    ax.set(xlabel="epoch", ylabel="val_acc", title="validation accuracy per optimizer")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----- MLflow side -----------------------------------------------------------------------
def _descendant_runs(client, experiment_ids: list[str], parent_run_id: str) -> list:
    runs, frontier = [], [parent_run_id]
    while frontier:
        children = [  # MLflow's search takes no IN on tags: one query per parent
            run
            for parent in frontier
            for run in client.search_runs(
                experiment_ids, filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                max_results=5000,
            )
        ]
        runs += children
        frontier = [r.info.run_id for r in children]
    return runs


def mlflow_results(tracker, parent_run_id: str) -> tuple[dict, dict]:
    """Per-optimizer val curves of trial runs, and {optimizer: {seed: [final_test_acc]}}."""
    client = tracker._client
    exp = [client.get_run(parent_run_id).info.experiment_id]
    runs = _descendant_runs(client, exp, parent_run_id)
    curves: dict[str, list[list[tuple[int, float]]]] = defaultdict(list)
    by_seed: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        opt = run.data.tags.get("optimizer", "?")
        is_trial = run.data.tags.get("mlflow.parentRunId") == parent_run_id
        if is_trial:
            history = client.get_metric_history(run.info.run_id, "val_acc")
            curves[opt].append([(m.step, m.value) for m in history])
        is_group = "n_seeds" in run.data.tags
        if not is_group and "final_test_acc" in run.data.metrics and "seed" in run.data.params:
            by_seed[opt][int(run.data.params["seed"])].append(run.data.metrics["final_test_acc"])
    return dict(curves), {k: dict(v) for k, v in by_seed.items()}


def seed_table(by_seed: dict[str, dict[int, list[float]]]) -> list[dict[str, Any]]:
    rows = []
    for opt, seeds in sorted(by_seed.items()):
        per_seed = [float(np.mean(v)) for _, v in sorted(seeds.items())]
        mean, std = mean_std(per_seed)
        rows.append({"optimizer": opt, "seeds": len(per_seed),
                     "final_test_acc_mean": mean, "final_test_acc_std": std})
    return rows


def compare(by_seed: dict[str, dict[int, list[float]]], a: str, b: str) -> dict[str, float]:
    """Paired test of optimizer ``a`` against ``b`` over the seeds both ran."""
    missing = [o for o in (a, b) if o not in by_seed]
    if missing:
        raise ValueError(f"--compare: no runs for {missing}; optimizers here: {sorted(by_seed)}")
    seeds = sorted(set(by_seed[a]) & set(by_seed[b]))
    if not seeds:
        raise ValueError(f"--compare: {a} and {b} share no seed")
    return paired_test(
        [float(np.mean(by_seed[a][s])) for s in seeds],
        [float(np.mean(by_seed[b][s])) for s in seeds],
    )


# ----- the whole report ------------------------------------------------------------------
def write_report(
    study: optuna.Study,
    out: Path,
    *,
    tracker=None,
    compare_pair: tuple[str, str] | None = None,
    echo: bool = False,
) -> list[Path]:
    """Write the table, the plots and (with MLflow) the seed statistics; return the files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = best_settings(study)
    text = [f"study {study.study_name}: {state_counts(study)}", "", format_table(rows)]
    files: list[Path] = []
    table = out / "best_settings.csv"
    with table.open("w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            writer.writerows(rows)
    files.append(table)
    for made in (
        plot_history(study, out / "history.png"),
        plot_objective_vs(study, QP, out / "objective_vs_percentile.png"),
        plot_objective_vs(study, RHO, out / "objective_vs_rho.png"),
        plot_rho_qp_heatmap(study, out / "rho_qp_heatmap.png"),
        plot_importances(study, out / "importances.png"),
        plot_pareto(study, out / "pareto.png"),
    ):
        if made is not None:
            files.append(made)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if tracker is not None and tracker.enabled and parent:
        curves, by_seed = mlflow_results(tracker, parent)
        made = plot_val_curves(curves, out / "val_curves.png")
        if made is not None:
            files.append(made)
        seeds = seed_table(by_seed)
        if seeds:
            text += ["", "final test accuracy over seeds (mean +- std):", format_table(seeds)]
        if compare_pair is not None:
            result = compare(by_seed, *compare_pair)
            text += ["", f"paired test {compare_pair[0]} - {compare_pair[1]} across seeds:",
                     format_table([result])]
    summary = out / "summary.txt"
    summary.write_text("\n".join(text) + "\n")
    files.append(summary)
    if echo:
        print("\n".join(text))
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zsharp_sweeps.report", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", help="sweep directory, its optuna.db, or an Optuna storage URL")
    parser.add_argument("--study", help="study name (needed when the storage holds several)")
    parser.add_argument("--out", help="output directory (default: <sweep dir>/report or ./report)")
    parser.add_argument("--compare", help="two optimizers for a paired test, e.g. zsharp,sam")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    parser.add_argument("--experiment", default="zsharp-sweeps", help="MLflow experiment")
    parser.add_argument("--no-mlflow", action="store_true", help="do not read or log to MLflow")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.target, args.study)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pair = None
    if args.compare:
        pair = tuple(args.compare.split(","))
        if len(pair) != 2:
            print("error: --compare takes two optimizers, e.g. zsharp,sam", file=sys.stderr)
            return 2
    default_out = Path(args.target) / "report" if Path(args.target).is_dir() else Path("report")
    out = Path(args.out) if args.out else default_out
    tracker = None
    if not args.no_mlflow:
        from zsharp_sweeps.config import TrackingConfig
        from zsharp_sweeps.tracking import Tracker

        tracker = Tracker(TrackingConfig(uri=args.tracking_uri, experiment=args.experiment))
        tracker.run_id = study.user_attrs.get("mlflow_parent_run_id")
    try:
        files = write_report(study, out, tracker=tracker, compare_pair=pair, echo=True)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if tracker is not None and tracker.enabled and tracker.run_id:
        for path in files:
            tracker.log_artifact(path, "report")
    print(f"\nwrote {len(files)} files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
