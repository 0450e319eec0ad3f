"""Tables of a sweep as pandas DataFrames, and their plain-text form.

Why pandas: grouping runs by configuration and seed (mean, std, n) is a ``groupby``, and
``DataFrame.to_string`` prints aligned columns. ``to_markdown`` would need the optional
``tabulate`` package, so the markdown report shows the same text in code blocks.

Vocabulary: a *trial* is one Optuna trial; a *configuration* is the optimizer plus the
swept parameters other than ``seed``; a *seed run* is one training run (one MLflow run with
``final_test_acc``). Several seeds of one configuration come either from ``seed`` being a
swept parameter (one trial per seed) or from ``study.n_seeds`` (seed runs nested in a trial).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from zsharp_sweeps.sweep.progress import FAIL_REASON_ATTR, REJECTED_ATTR

SEED = "seed"
OPTIMIZER = "optimizer"


def format_table(rows: Sequence[Mapping[str, Any]] | pd.DataFrame, empty: str = "(none)") -> str:
    """Aligned plain text; floats to 4 significant digits, missing values as ``-``."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if frame.empty:
        return empty
    return frame.to_string(index=False, float_format="{:.4g}".format, na_rep="-")


# ----- trials ----------------------------------------------------------------------------
def objective_names(study: optuna.Study) -> list[str]:
    """The study's metric names if it set them, else ``objective`` / ``objective0``, ..."""
    if study.metric_names:
        return list(study.metric_names)
    n = len(study.directions)
    return ["objective"] if n == 1 else [f"objective{i}" for i in range(n)]


def trials_frame(trials: Sequence[FrozenTrial], names: Sequence[str]) -> pd.DataFrame:
    """One row per trial: number, state, objective value(s), epochs reported, params.

    Pruned and failed trials have no value; ``epochs`` (intermediate reports) and
    ``last_reported`` say how far they got.
    """
    rows = []
    for t in trials:
        values = t.values or [math.nan] * len(names)
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else math.nan
        rows.append({
            "trial": t.number, "state": t.state.name, **dict(zip(names, values)),
            "epochs": len(t.intermediate_values), "last_reported": last, **t.params,
        })
    return pd.DataFrame(rows)


def fail_reason(trial: FrozenTrial) -> str:
    """Why a failed trial failed, in one line: its ``fail_reason`` user attribute (set by
    the sweep's workers), else ``rejected_value``; trials from before either say so."""
    attrs = trial.user_attrs
    return str(attrs.get(FAIL_REASON_ATTR) or attrs.get(REJECTED_ATTR)
               or "(no reason recorded)")


def failed_frame(trials: Sequence[FrozenTrial]) -> pd.DataFrame:
    """One row per failed trial: its number and why it failed."""
    return pd.DataFrame([{"trial": t.number, "fail_reason": fail_reason(t)}
                         for t in trials if t.state == TrialState.FAIL],
                        columns=["trial", "fail_reason"])


def best_settings(
    study: optuna.Study, trials: Sequence[FrozenTrial], top: int = 10
) -> pd.DataFrame:
    """The best complete trials, best first; for several objectives, the Pareto front."""
    names = objective_names(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(study.directions) == 1 and any(SEED in t.params for t in complete):
        return _best_configurations(study, complete, names[0], top)
    if len(study.directions) > 1:
        rows = _pareto_front(complete, study.directions)
    else:
        sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        rows = sorted(complete, key=lambda t: sign * t.value)[:top]
    frame = trials_frame(rows, names)
    return frame.drop(columns=["state", "epochs", "last_reported"], errors="ignore")


def _best_configurations(study: optuna.Study, complete: Sequence[FrozenTrial], name: str,
                         top: int) -> pd.DataFrame:
    """With ``seed`` swept, a seed is a replicate, not a setting: one row per configuration
    (the other parameters) with the objective's mean, sample std and n over its seeds,
    best mean first. One seed's lucky run is never called the best."""
    frame = pd.DataFrame([{**{k: v for k, v in t.params.items() if k != SEED},
                           "value": t.value} for t in complete])
    keys = [c for c in frame.columns if c != "value"]
    if not keys:  # only seeds were swept: one configuration
        frame["configuration"] = "(fixed)"
        keys = ["configuration"]
    table = frame.groupby(keys, dropna=False)["value"].agg(["mean", "std", "count"])
    table = table.rename(columns={"mean": f"{name}_mean", "std": f"{name}_std",
                                  "count": "n_seeds"}).reset_index()
    ascending = study.direction != optuna.study.StudyDirection.MAXIMIZE
    return table.sort_values(f"{name}_mean", ascending=ascending, kind="stable",
                             ignore_index=True).head(top)


def _pareto_front(
    trials: Sequence[FrozenTrial], directions: Sequence[optuna.study.StudyDirection]
) -> list[FrozenTrial]:
    """Trials no other trial dominates (over the trials given, not the whole storage)."""
    signs = np.array([-1.0 if d == optuna.study.StudyDirection.MAXIMIZE else 1.0
                      for d in directions])
    costs = np.array([t.values for t in trials], dtype=float).reshape(len(trials), -1) * signs
    # dominated[j, i]: trial j is no worse than trial i everywhere and better somewhere.
    dominated = (np.all(costs[:, None] <= costs[None], axis=2)
                 & np.any(costs[:, None] < costs[None], axis=2))
    front = [t for t, beaten in zip(trials, dominated.any(axis=0)) if not beaten]
    return sorted(front, key=lambda t: t.values[0] * signs[0])


def state_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    return {s.name: n for s in TrialState if (n := sum(t.state == s for t in trials))}


# ----- seeds -----------------------------------------------------------------------------
def config_columns(seed_runs: pd.DataFrame) -> list[str]:
    """What makes a configuration: the optimizer and every swept parameter but the seed."""
    fixed = {"trial", SEED, "objective", "final_test_acc"}
    return [OPTIMIZER, *[c for c in seed_runs.columns if c not in fixed and c != OPTIMIZER]]


def seed_table(seed_runs: pd.DataFrame, maximize: bool = True) -> pd.DataFrame:
    """Final test accuracy per configuration over seeds: mean, sample std and n (seeds).

    ``seed_runs`` has one row per seed run: ``trial``, ``optimizer``, the swept params,
    ``seed``, ``objective`` (the trial's first objective, a validation metric) and
    ``final_test_acc``. Two runs of one configuration and seed are averaged first, so n
    counts seeds. Best validation objective first; the test accuracy is only reported.
    """
    if seed_runs.empty:
        return pd.DataFrame()
    keys = config_columns(seed_runs)
    per_seed = (seed_runs.groupby([*keys, SEED], dropna=False, sort=False)
                [["objective", "final_test_acc"]].mean().reset_index())
    table = per_seed.groupby(keys, dropna=False, sort=False).agg(
        n=("final_test_acc", "size"),
        test_acc_mean=("final_test_acc", "mean"),
        test_acc_std=("final_test_acc", "std"),
        objective_mean=("objective", "mean"),
    ).reset_index()
    return table.sort_values("objective_mean", ascending=not maximize, kind="stable",
                             ignore_index=True)


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired t-test of a - b across seeds (t and p are NaN when the differences are constant)."""
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


def compare(by_seed: Mapping[str, Mapping[int, Sequence[float]]], a: str, b: str) -> dict[str, float]:
    """Paired test of ``a`` against ``b`` over the seeds both ran ({name: {seed: [acc]}})."""
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


def compare_optimizers(
    seed_runs: pd.DataFrame, a: str, b: str, maximize: bool = True
) -> tuple[dict[str, float], pd.DataFrame]:
    """Paired test of optimizer ``a`` against ``b`` across seeds, on final test accuracy.

    An optimizer with several configurations is represented by the one with the best mean
    validation objective (choosing by test accuracy would tune on the test set). Returns the
    test's numbers and the two configurations compared.
    """
    if a == b:
        raise ValueError(f"--compare needs two different optimizers, got {a},{b}")
    table = seed_table(seed_runs, maximize)
    known = sorted(set(table[OPTIMIZER])) if not table.empty else []
    chosen, by_seed = [], {}
    for name in (a, b):
        rows = table[table[OPTIMIZER] == name] if not table.empty else table
        if rows.empty:
            raise ValueError(f"--compare: no runs for {name!r}; optimizers here: {known}")
        best = rows.iloc[[0]]
        chosen.append(best)
        runs = seed_runs.merge(best[config_columns(seed_runs)])  # NaN keys match NaN
        by_seed[name] = runs.groupby(SEED)["final_test_acc"].apply(list).to_dict()
    return compare(by_seed, a, b), pd.concat(chosen, ignore_index=True)
