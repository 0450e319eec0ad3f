"""The sweep report: what a sweep found (``python -m zsharp_sweeps.report``, ``__main__``).

Writes to ``--out`` (default ``<sweep dir>/report``): ``summary.txt`` and ``report.md``
(best settings, every trial with its state, final test accuracy per configuration over
seeds, the optional paired test ``--compare zsharp,sam``, warnings), ``best_settings.csv``,
``trials.csv``, ``seeds.csv``, ``compare_<a>_<b>.csv``, Optuna's plots (history, importances, slice, contour,
parallel coordinates, Pareto front) and ``val_curves.png`` (validation accuracy per trial,
read from MLflow). With an MLflow parent run the files are logged to it.

Trials that do not count toward the study are left out of everything: a failed trial that
was retried under a new number (user attribute ``interrupted``, or Optuna's heartbeat
retry), a trial asked beyond ``n_trials`` (``zsharp:surplus``), an enqueued retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from zsharp_sweeps.report.plots import (
    IMPORTANCE_MIN_TRIALS,
    TrialCurve,
    importance_warning,
    save,
    sweep_figures,
    val_curves_figure,
)
from zsharp_sweeps.report.tables import (
    OPTIMIZER,
    SEED,
    best_settings,
    compare,
    compare_optimizers,
    failed_frame,
    format_table,
    objective_names,
    paired_test,
    seed_table,
    state_counts,
    trials_frame,
)
from zsharp_sweeps.sweep import progress
from zsharp_sweeps.sweep.quiet import optuna_experimental
from zsharp_sweeps.tracking.uris import sqlite_url

if TYPE_CHECKING:
    from zsharp_sweeps.tracking import Tracker

__all__ = ["compare", "load_study", "paired_test", "write_report"]

PARENT_RUN_ATTR = "mlflow_parent_run_id"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


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
    return sqlite_url(path)


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


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that take a place in the study (the sweep's own rule): no surplus trial,
    no failed trial that was retried, no enqueued retry that has not started."""
    return progress.counted_trials(study.get_trials(deepcopy=False))


def study_view(study: optuna.Study, trials: Sequence[FrozenTrial]) -> optuna.Study:
    """An in-memory copy holding only ``trials`` (finished ones), for Optuna's plots."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line
    try:
        view = optuna.create_study(study_name=study.study_name, directions=study.directions)
    finally:
        optuna.logging.set_verbosity(previous)
    if study.metric_names:
        with optuna_experimental():
            view.set_metric_names(list(study.metric_names))
    view.add_trials([t for t in trials if t.state in FINISHED])
    return view


# ----- MLflow side -----------------------------------------------------------------------
@dataclass
class MlflowResults:
    """What only MLflow knows: per-epoch validation curves and per-seed test accuracy."""

    curves: list[TrialCurve] = field(default_factory=list)
    seed_runs: pd.DataFrame = field(default_factory=pd.DataFrame)
    averaged_seeds: bool = False  # some trial's curve is the mean of its seed runs


def mlflow_results(
    tracker: Tracker, parent_run_id: str, trials: Sequence[FrozenTrial]
) -> MlflowResults:
    """Read the trial runs nested under the sweep's parent run (through ``tracker``).

    A trial run is matched to its trial by the ``trial_number`` tag; only counted trials
    are read. A trial that ran ``study.n_seeds`` seeds is a group run (tag ``n_seeds``)
    whose nested runs are the seeds; otherwise the trial run is the seed run.
    """
    by_number = {t.number: t for t in trials}
    trial_runs: dict[int, Any] = {}
    for run in sorted(tracker.child_runs(parent_run_id),
                      key=lambda r: r.info.start_time or 0):
        number = run.data.tags.get("trial_number", "")
        if number.isdigit() and int(number) in by_number:
            trial_runs[int(number)] = run  # the latest run of a trial number wins
    results = MlflowResults()
    rows = []
    for number, run in sorted(trial_runs.items()):
        trial = by_number[number]
        history = tracker.metric_history(run.info.run_id, "val_acc")
        grouped = "n_seeds" in run.data.tags
        if history:
            results.curves.append(TrialCurve(
                number, trial.state.name, dict(trial.params), [(m.step, m.value) for m in history]))
            results.averaged_seeds |= grouped
        if trial.state != TrialState.COMPLETE:
            continue
        leaves = tracker.child_runs(run.info.run_id) if grouped else [run]
        swept = {k: v for k, v in trial.params.items() if k not in (SEED, OPTIMIZER)}
        for leaf in leaves:
            if "final_test_acc" not in leaf.data.metrics:
                continue
            seed = leaf.data.params.get(SEED, trial.params.get(SEED))
            rows.append({
                "trial": number,
                OPTIMIZER: leaf.data.tags.get(OPTIMIZER, trial.params.get(OPTIMIZER, "?")),
                **swept,
                SEED: int(seed) if seed is not None else None,
                "objective": trial.values[0],
                "final_test_acc": leaf.data.metrics["final_test_acc"],
            })
    results.seed_runs = pd.DataFrame(rows)
    return results


def at_chance(trials: Sequence[FrozenTrial]) -> str | None:
    """A warning when no complete trial learned: the best ``best_val_acc`` of the sweep is
    within the chance band its runs recorded (``chance_acc``: 1/classes + 3 binomial standard
    deviations on the validation images), so its "best settings" are noise."""
    scored = [(t.user_attrs.get("metrics") or {}, t.number) for t in trials
              if t.state == TrialState.COMPLETE]
    scored = [(m["best_val_acc"], m["chance_acc"], n) for m, n in scored
              if "best_val_acc" in m and "chance_acc" in m]
    if not scored:
        return None
    acc, band, number = max(scored)
    if acc > band:
        return None
    return (f"THE SWEEP DID NOT LEARN: its best trial ({number}, best_val_acc {acc:.4f}) is at "
            f"chance (below {band:.4f}, indistinguishable from guessing), so the best settings "
            "below are noise. The model, optimizer or epochs do not suit this data: each "
            "trial's log (and MLflow tag learning_warning) says what to try.")


# ----- the report document ---------------------------------------------------------------
class Document:
    """Sections written twice: plain text (terminal, summary.txt) and markdown (report.md)."""

    def __init__(self, title: str) -> None:
        self.text: list[str] = [title]
        self.markdown: list[str] = [f"# {title}"]

    def para(self, line: str) -> None:
        self.text += ["", line]
        self.markdown += ["", line]

    def warning(self, line: str) -> None:
        self.text += ["", line]
        self.markdown += ["", f"> **{line}**"]

    def table(self, heading: str, body: str) -> None:
        self.text += ["", f"{heading}:", body]
        self.markdown += ["", f"## {heading}", "", "```text", body, "```"]

    def images(self, paths: Sequence[Path]) -> None:
        self.text += ["", "plots: " + ", ".join(p.name for p in paths)]
        self.markdown += ["", "## Plots"]
        self.markdown += [f"\n![{p.stem}]({p.name})" for p in paths]


def _seed_sections(
    doc: Document, out: Path, seed_runs: pd.DataFrame, names: list[str], maximize: bool,
    compare_pair: tuple[str, str] | None,
) -> list[Path]:
    """The seeds table and the paired test; a bad ``--compare`` fails here, before any plot."""
    files = []
    seeds = seed_table(seed_runs, maximize)
    if not seeds.empty:
        seeds.to_csv(out / "seeds.csv", index=False)
        files.append(out / "seeds.csv")
        doc.table(
            f"final test accuracy per configuration over seeds (n seeds, mean, sample std; "
            f"best mean validation {names[0]} first)",
            format_table(seeds.rename(columns={"objective_mean": f"{names[0]}_mean"})))
    if compare_pair is not None:
        if seed_runs.empty:
            raise ValueError("--compare needs final_test_acc of complete trials in MLflow; "
                             "none found under the sweep's parent run")
        result, chosen = compare_optimizers(seed_runs, *compare_pair, maximize)
        a, b = compare_pair
        doc.table(f"configurations compared (each optimizer's best mean validation {names[0]})",
                  format_table(chosen))
        doc.table(f"paired test {a} - {b} on final test accuracy across seeds",
                  format_table([result]))
        path = out / f"compare_{a}_{b}.csv"
        pd.DataFrame([result]).to_csv(path, index=False)
        files.append(path)
    return files


def _read_mlflow(
    tracker: Tracker | None, parent: str | None, trials: Sequence[FrozenTrial], notes: list[str]
) -> MlflowResults | None:
    """The MLflow results, or None with the reason added to ``notes``."""
    if tracker is None or not tracker.enabled or not parent:
        notes.append("MLflow not read (no tracker or no parent run in the study): no "
                     "validation curves, no test accuracy over seeds")
        return None
    from zsharp_sweeps.tracking import TrackingReadError

    try:
        return mlflow_results(tracker, parent, trials)
    except TrackingReadError as exc:
        notes.append(f"MLflow not read ({tracker.uri}, parent run {parent}): "
                     f"{str(exc).splitlines()[0]}")
        return None


def write_report(
    study: optuna.Study,
    out: Path,
    *,
    tracker: Tracker | None = None,
    compare_pair: tuple[str, str] | None = None,
    echo: bool = False,
) -> list[Path]:
    """Write tables, plots and (with an enabled ``Tracker``) the MLflow parts; return the files.

    ``tracker`` is only read for its MLflow store (``tracker.uri``); the parent run comes
    from the study's ``mlflow_parent_run_id`` user attribute. Raises ValueError for a
    ``compare_pair`` the runs cannot answer.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trials = counted_trials(study)
    names = objective_names(study)
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    counts = ", ".join(f"{k} {v}" for k, v in state_counts(trials).items()) or "none"
    excluded = len(study.get_trials(deepcopy=False)) - len(trials)
    doc = Document(f"study {study.study_name}: {len(trials)} trials ({counts})"
                   + (f"; {excluded} not counted (retried, surplus or waiting)" if excluded else ""))
    n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
    chance = at_chance(trials)
    if chance:
        doc.warning(chance)
    if 2 <= n_complete < IMPORTANCE_MIN_TRIALS:
        doc.warning(importance_warning(n_complete))
    notes: list[str] = []

    # Tables first (cheap, and a bad --compare fails before any plot is drawn).
    best = best_settings(study, trials)
    doc.table("best settings (the Pareto front of the objectives)" if len(names) > 1
              else f"best settings ({names[0]}, best first)",
              format_table(best, empty="(no complete trials)"))
    everything = trials_frame(trials, names)
    doc.table("all trials", format_table(everything, empty="(no trials)"))
    failed = failed_frame(trials)
    if not failed.empty:  # one line each: what optuna-dashboard shows as fail_reason
        doc.table("failed trials (why)", "\n".join(
            f"{row.trial:>5}  {row.fail_reason}" for row in failed.itertuples()))
    if not everything.empty:
        reasons = dict(zip(failed["trial"], failed["fail_reason"]))
        everything = everything.assign(fail_reason=[reasons.get(n, "")
                                                    for n in everything["trial"]])
    files: list[Path] = []
    for frame, name in ((best, "best_settings.csv"), (everything, "trials.csv")):
        frame.to_csv(out / name, index=False)
        files.append(out / name)
    results = _read_mlflow(tracker, study.user_attrs.get(PARENT_RUN_ATTR), trials, notes)
    if results is not None:
        files += _seed_sections(doc, out, results.seed_runs, names, maximize, compare_pair)
    elif compare_pair is not None:
        raise ValueError("--compare needs the sweep's MLflow runs (final test accuracy per "
                         "seed): pass --tracking-uri, and not --no-mlflow")

    figures, plot_notes = sweep_figures(study_view(study, trials), names)
    images = [save(fig, out / f"{stem}.png") for stem, fig in figures.items()]
    if results is not None and results.curves:
        title = "validation accuracy per trial" + (
            " (mean over seeds)" if results.averaged_seeds else "")
        images.append(save(val_curves_figure(results.curves, title), out / "val_curves.png"))
    elif results is not None:
        notes.append("no per-epoch val_acc in MLflow: no validation curves")
    doc.images(images)
    for note in [*plot_notes, *notes]:
        doc.para(f"not drawn: {note}")
    (out / "summary.txt").write_text("\n".join(doc.text) + "\n")
    (out / "report.md").write_text("\n".join(doc.markdown) + "\n")
    files += [*images, out / "summary.txt", out / "report.md"]
    if echo:
        print("\n".join(doc.text))
    return files
