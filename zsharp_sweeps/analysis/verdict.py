"""The verdict of a benchmark: per-arm statistics over seeds, paired comparisons with a reference.

An *arm* is one optimizer tuned on the validation split with the same trial budget as the
others; its best configuration is then retrained on fresh seeds, the same seeds for every arm.
The seeds are replicates, never hyperparameters: they only estimate run-to-run noise.

Why paired tests: one seed fixes the initialisation and the data order for every arm, so the
arm-minus-reference difference on a seed cancels the noise the arms share; a paired t-test on
those differences is more powerful than comparing two independent means. Why Holm: every arm is
compared with the same reference, and k tests at alpha 0.05 would find a "winner" by chance
far more often than 5% of the time; Holm's step-down keeps the family-wise error at alpha and is
never less powerful than Bonferroni.

A pure leaf: no Optuna, MLflow or Hydra. The orchestrator gathers ``SeedResult`` and
``ArmBudget`` records and calls ``summarize`` then ``write_verdict``. Accuracies are fractions
in [0, 1] everywhere in the data; the rendered tables show percent and percentage points.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from zsharp_sweeps.analysis import verdict_plots

# Significance level of the ``better`` column, applied to the Holm-corrected p.
ALPHA = 0.05
# Paired differences that agree to this (absolute, accuracies being fractions) are equal.
# Subtracting accuracies leaves float noise (0.9512 - 0.9412 != 0.9531 - 0.9431 in binary), and
# a t-test on that noise alone would report p ~ 1e-15 for what is a constant difference.
EQUAL_ATOL = 1e-12
NO_DIFFERENCE = "no significant difference"
NAN = math.nan

Curve = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class SeedResult:
    """One retraining run of an arm's chosen configuration on one seed."""

    arm: str
    seed: int
    test_acc: float  # final test accuracy, fraction in [0, 1]
    best_val_acc: float
    sharpness: dict[str, float]  # e.g. {"sharpness/sam": 0.012}; may be empty
    val_curve: tuple[float, ...]  # val_acc per epoch (epoch 1..E); may be empty
    train_time_s: float = NAN


@dataclass(frozen=True)
class ArmBudget:
    """What tuning an arm cost and what it chose; the table reports it next to the accuracy."""

    arm: str
    config: dict[str, Any]  # the chosen configuration, e.g. {"optimizer.lr": 0.05}
    tune_best_val: float  # best validation objective during tuning
    trials: int  # tuning trials counted
    complete: int
    pruned: int
    failed: int
    tune_gpu_hours: float  # summed over tuning trials
    final_gpu_hours: float  # summed over the retraining runs


@dataclass(frozen=True, eq=False)
class Verdict:
    """Everything the tables and figures show, computed once by ``summarize``.

    ``arms`` has one row per arm in the order of the budgets; ``comparisons`` one row per arm
    other than the reference. ``seeds`` are the reference's seeds, the ones every comparison
    pairs on. ``curves`` maps an arm to (epochs, mean, std) of its validation curves across
    seeds (see ``summarize`` for unequal lengths); ``curve_n`` says how many seeds fed each.
    ``results`` are kept for the per-seed sharpness figure.
    """

    arms: pd.DataFrame
    comparisons: pd.DataFrame
    reference: str
    confidence: float
    seeds: tuple[int, ...]
    curves: Mapping[str, Curve]
    results: tuple[SeedResult, ...] = ()
    alpha: float = ALPHA
    sharpness_keys: tuple[str, ...] = ()
    curve_n: Mapping[str, int] = field(default_factory=dict)


COMPARISON_COLUMNS = [
    "arm", "reference", "n_pairs", "mean_diff", "diff_std", "ci_low", "ci_high",
    "t", "p", "p_holm", "cohens_dz", "better",
]


# ----- statistics --------------------------------------------------------------------------
def t_interval(values: Sequence[float], confidence: float) -> tuple[float, float, float, float]:
    """Mean, std (ddof=1) and the two-sided t interval of the mean (t with n-1 df).

    With one value there is no spread to estimate: std and interval are NaN, not 0.
    """
    x = np.asarray(values, dtype=float)
    mean = float(np.mean(x))
    if len(x) < 2:
        return mean, NAN, NAN, NAN
    std = float(np.std(x, ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, len(x) - 1)) * std / math.sqrt(len(x))
    return mean, std, mean - half, mean + half


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values over the finite entries of ``p``; NaN stays NaN (not a test).

    A family of one is its own correction; skipping statsmodels there matters only for speed
    (its Holm runs ``gc.collect()`` on every call: 0.1 s and more in a process holding torch).
    """
    p = np.asarray(p, dtype=float)
    adjusted = np.full(len(p), NAN)
    finite = np.isfinite(p)
    if finite.sum() == 1:
        adjusted[finite] = p[finite]
    elif finite.any():
        adjusted[finite] = multipletests(p[finite], alpha=ALPHA, method="holm")[1]
    return adjusted


def _paired(diff: np.ndarray, arm: np.ndarray, ref: np.ndarray, confidence: float) -> dict:
    """Mean difference, its t interval, the paired t-test and Cohen's d_z for one comparison."""
    mean, std, low, high = t_interval(diff, confidence)
    t = p = NAN
    if len(diff) >= 2 and np.ptp(diff) <= EQUAL_ATOL:
        std, low, high = 0.0, mean, mean  # a constant difference: no spread, no test
    elif len(diff) >= 2:
        t, p = (float(v) for v in stats.ttest_rel(arm, ref))
    dz = mean / std if np.isfinite(std) and std > 0 else NAN
    return {"mean_diff": mean, "diff_std": std, "ci_low": low, "ci_high": high,
            "t": t, "p": p, "cohens_dz": dz}


def _curve(curves: Sequence[tuple[float, ...]]) -> Curve | None:
    """Mean and std (ddof=1) per epoch of the non-empty curves, truncated to the shortest.

    Truncation keeps every seed in every epoch's mean: padding or a ragged mean would mix seeds
    that stopped early (a crash, a shorter schedule) with the others and bend the curve.
    """
    kept = [c for c in curves if len(c)]
    if not kept:
        return None
    length = min(len(c) for c in kept)
    stack = np.array([c[:length] for c in kept], dtype=float)
    std = stack.std(axis=0, ddof=1) if len(kept) > 1 else np.full(length, NAN)
    return np.arange(1, length + 1), stack.mean(axis=0), std


def format_config(config: Mapping[str, Any]) -> str:
    """Compact "lr=0.05 rho=0.02": the last dotted part of each key, unless two would clash."""
    tails = [k.rsplit(".", 1)[-1] for k in config]
    parts = []
    for key, tail in zip(config, tails):
        name = tail if tails.count(tail) == 1 else key
        value = config[key]
        parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(parts)


def _check(results: Sequence[SeedResult], budgets: Sequence[ArmBudget], reference: str,
           confidence: float) -> dict[str, dict[int, SeedResult]]:
    """Results grouped by arm then seed, or a one-line ValueError saying what does not fit."""
    if not results:
        raise ValueError("no results to summarize")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    arms = [b.arm for b in budgets]
    if len(set(arms)) != len(arms):
        raise ValueError(f"an arm has two budgets: {', '.join(arms)}")
    if reference not in arms:
        raise ValueError(f"reference {reference!r} is not among the arms: {', '.join(arms)}")
    by_arm: dict[str, dict[int, SeedResult]] = {a: {} for a in arms}
    for r in results:
        if r.arm not in by_arm:
            raise ValueError(f"results for arm {r.arm!r}, which has no budget "
                             f"(arms: {', '.join(arms)})")
        if r.seed in by_arm[r.arm]:
            raise ValueError(f"arm {r.arm!r} has seed {r.seed} twice")
        if not math.isfinite(r.test_acc):
            raise ValueError(f"arm {r.arm!r} seed {r.seed} has test_acc {r.test_acc}")
        by_arm[r.arm][r.seed] = r
    for arm, seeds in by_arm.items():
        if not seeds:
            raise ValueError(f"arm {arm!r} has no results")
    ref_seeds = set(by_arm[reference])
    for arm, seeds in by_arm.items():
        missing = sorted(ref_seeds - set(seeds))
        if missing:
            raise ValueError(f"seeds do not pair: arm {arm!r} lacks seeds {missing} that the "
                             f"reference {reference!r} has")
    return by_arm


def summarize(results: Iterable[SeedResult], budgets: Sequence[ArmBudget], reference: str,
              confidence: float = 0.95, alpha: float = ALPHA) -> Verdict:
    """Per-arm statistics and each arm's paired comparison with ``reference``.

    Every arm must have every seed the reference has (an arm may have more: its own row uses
    them, its comparison pairs on the reference's seeds only). ``better`` says which side wins
    at ``alpha`` on the Holm-corrected p, over the comparisons that have a p at all (fewer than
    2 pairs, or a constant difference, give NaN and stay out of the correction).

    Validation curves of unequal length are truncated to the shortest (empty ones are skipped),
    so every epoch's mean is over the same seeds.
    """
    results = tuple(results)
    by_arm = _check(results, budgets, reference, confidence)
    keys = tuple(sorted({k for r in results for k in r.sharpness}))
    rows = []
    for b in budgets:
        runs = [by_arm[b.arm][s] for s in sorted(by_arm[b.arm])]
        mean, std, low, high = t_interval([r.test_acc for r in runs], confidence)
        row: dict[str, Any] = {
            "arm": b.arm, "n": len(runs), "test_mean": mean, "test_std": std,
            "ci_low": low, "ci_high": high,
            "val_mean": float(np.mean([r.best_val_acc for r in runs])),
        }
        for key in keys:
            values = [r.sharpness[key] for r in runs
                      if key in r.sharpness and math.isfinite(r.sharpness[key])]
            row[f"{key}_mean"] = float(np.mean(values)) if values else NAN
            row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else NAN
        rows.append(row | {
            "config": format_config(b.config), "trials": b.trials, "complete": b.complete,
            "pruned": b.pruned, "failed": b.failed, "tune_gpu_hours": b.tune_gpu_hours,
            "final_gpu_hours": b.final_gpu_hours, "tune_best_val": b.tune_best_val,
        })

    seeds = tuple(sorted(by_arm[reference]))
    ref = np.array([by_arm[reference][s].test_acc for s in seeds])
    comparisons = []
    for b in budgets:
        if b.arm == reference:
            continue
        arm = np.array([by_arm[b.arm][s].test_acc for s in seeds])
        comparisons.append({"arm": b.arm, "reference": reference, "n_pairs": len(seeds),
                            **_paired(arm - ref, arm, ref, confidence)})
    comp = pd.DataFrame(comparisons, columns=COMPARISON_COLUMNS[:-1])
    comp["p_holm"] = holm(comp["p"].to_numpy(dtype=float))
    comp["better"] = [
        ("arm" if d > 0 else "reference") if p < alpha else NO_DIFFERENCE
        for d, p in zip(comp["mean_diff"], comp["p_holm"].fillna(1.0))
    ]
    comp = comp[COMPARISON_COLUMNS]

    curves: dict[str, Curve] = {}
    curve_n: dict[str, int] = {}
    for b in budgets:
        curve_list = [r.val_curve for r in by_arm[b.arm].values()]
        summary = _curve(curve_list)
        if summary is not None:
            curves[b.arm] = summary
            curve_n[b.arm] = sum(1 for c in curve_list if len(c))
    return Verdict(arms=pd.DataFrame(rows), comparisons=comp, reference=reference,
                   confidence=confidence, seeds=seeds, curves=curves, results=results,
                   alpha=alpha, sharpness_keys=keys, curve_n=curve_n)


# ----- text formatting ---------------------------------------------------------------------
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(x)


def _pct(x: float, signed: bool = False) -> str:
    """A fraction as percent (or percentage points when ``signed``), two decimals."""
    if not _finite(x):
        return "n/a"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _pm(mean: float, std: float) -> str:
    return _pct(mean) if not _finite(std) else f"{_pct(mean)} ± {_pct(std)}"


def _ci(low: float, high: float, signed: bool = False) -> str:
    if not (_finite(low) and _finite(high)):
        return "n/a"
    return f"[{_pct(low, signed)}, {_pct(high, signed)}]"


def _p(p: float) -> str:
    """Three decimals, or two significant digits in e-notation below 0.001."""
    if not _finite(p):
        return "n/a"
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def _g(x: float, fmt: str = ".3g") -> str:
    return format(x, fmt) if _finite(x) else "n/a"


def _label(arm: str, reference: str) -> str:
    return f"{arm} − {reference}"


def _seed_count(arms: pd.DataFrame) -> str:
    lo, hi = int(arms["n"].min()), int(arms["n"].max())
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def note(verdict: Verdict) -> str:
    """The one line under the tables that says how to read them."""
    k = int(np.isfinite(verdict.comparisons["p"].to_numpy(dtype=float)).sum())
    untested = len(verdict.comparisons) - k
    extra = f" ({untested} without a p-value)" if untested else ""
    seeds = _seed_count(verdict.arms)
    return (f"{seeds} seed{'' if seeds == '1' else 's'} per arm, paired by seed; "
            f"{verdict.confidence * 100:g}% t intervals; "
            f"Holm-corrected over {k} comparison{'' if k == 1 else 's'}{extra}, "
            f"verdict at alpha = {verdict.alpha:g}; "
            "a seed is a replicate, never a hyperparameter")


# ----- markdown ----------------------------------------------------------------------------
def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """A pipe table; columns in ``right`` are right-aligned (numbers)."""
    def cells(values: Sequence[str]) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"
    rule = ["---:" if i in right else "---" for i in range(len(header))]
    return "\n".join([cells(header), "| " + " | ".join(rule) + " |", *map(cells, rows)])


def _trials(row: Mapping[str, Any]) -> str:
    failed = f"; {row['failed']} failed" if row["failed"] else ""
    return f"{row['trials']} ({row['pruned']}{failed})"


def to_markdown(verdict: Verdict) -> str:
    """The arms table, the comparisons table and the reading note, as markdown."""
    conf = f"{verdict.confidence * 100:g}%"
    keys = verdict.sharpness_keys
    header = ["arm", "test acc (%)", f"{conf} CI", "n", *keys, "config", "trials (pruned)",
              "GPU-h (tune + final)"]
    rows = []
    for _, a in verdict.arms.iterrows():
        arm = f"{a['arm']} (reference)" if a["arm"] == verdict.reference else a["arm"]
        sharp = [_g(a[f"{k}_mean"]) if not _finite(a[f"{k}_std"])
                 else f"{_g(a[f'{k}_mean'])} ± {_g(a[f'{k}_std'])}" for k in keys]
        rows.append([arm, _pm(a["test_mean"], a["test_std"]), _ci(a["ci_low"], a["ci_high"]),
                     str(a["n"]), *sharp, a["config"] or "-", _trials(a),
                     f"{a['tune_gpu_hours']:.2f} + {a['final_gpu_hours']:.2f}"])
    last = len(header) - 1  # numbers right-aligned: all but arm and config
    arms_md = _md_table(header, rows, right={*range(1, last + 1)} - {last - 2})

    if verdict.comparisons.empty:
        comp_md = "(no comparisons: the reference is the only arm)"
    else:
        comp_rows = []
        for _, c in verdict.comparisons.iterrows():
            better = {"arm": f"{c['arm']} better",
                      "reference": f"{c['reference']} better"}.get(c["better"], c["better"])
            comp_rows.append([_label(c["arm"], c["reference"]), _pct(c["mean_diff"], True),
                              _ci(c["ci_low"], c["ci_high"], True), str(c["n_pairs"]),
                              _p(c["p"]), _p(c["p_holm"]), _g(c["cohens_dz"], ".2f"), better])
        comp_md = _md_table(["comparison", "Δ (pp)", f"{conf} CI (pp)", "pairs", "p",
                             "p (Holm)", "d_z", "verdict"], comp_rows, right=set(range(1, 7)))
    return "\n\n".join([
        f"## Arms (reference: {verdict.reference})", arms_md,
        f"## Paired comparisons with {verdict.reference}", comp_md,
        f"_{note(verdict)}._",
    ]) + "\n"


# ----- LaTeX -------------------------------------------------------------------------------
_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "−": "$-$", "Δ": r"$\Delta$",
}


def latex_escape(text: str) -> str:
    """Text safe in a LaTeX table cell (``_``, ``%``, ``&`` ..., and ± − Δ as math)."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def _latex_p(p: float) -> str:
    if not _finite(p):
        return "--"
    if p >= 1e-3:
        return f"{p:.3f}"
    mantissa, exponent = f"{p:.1e}".split("e")
    return f"${mantissa}\\times 10^{{{int(exponent)}}}$"


def _latex_signed(x: float) -> str:
    return f"${_pct(x, signed=True)}$" if _finite(x) else "--"


def to_latex(verdict: Verdict) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``), hand-written: no jinja2.

    One row per arm: mean ± std and CI of test accuracy in percent, the difference with the
    reference in percentage points with its CI, and the Holm-corrected paired p.
    """
    conf = latex_escape(f"{verdict.confidence * 100:g}%")
    ref = latex_escape(verdict.reference)
    comps = verdict.comparisons.set_index("arm")
    lines = [
        r"\begin{tabular}{lrrrrrr}",
        r"\toprule",
        " & ".join(["Optimizer", "$n$", r"Test acc.\ (\%)", f"{conf} CI",
                    rf"$\Delta$ vs {ref} (pp)", rf"{conf} CI of $\Delta$", "$p$ (Holm)"])
        + r" \\",
        r"\midrule",
    ]
    for _, a in verdict.arms.iterrows():
        acc = latex_escape(_pm(a["test_mean"], a["test_std"]))
        ci = latex_escape(_ci(a["ci_low"], a["ci_high"])).replace("n/a", "--")
        if a["arm"] in comps.index:
            c = comps.loc[a["arm"]]
            diff, p = _latex_signed(c["mean_diff"]), _latex_p(c["p_holm"])
            dci = (f"$[{_pct(c['ci_low'], True)}, {_pct(c['ci_high'], True)}]$"
                   if _finite(c["ci_low"]) and _finite(c["ci_high"]) else "--")
        else:
            diff, dci, p = "--", "--", "--"
        lines.append(" & ".join([latex_escape(a["arm"]), str(a["n"]), acc, ci, diff, dci, p])
                     + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


# ----- records and files -------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars and arrays to Python, NaN and infinities to None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def to_records(verdict: Verdict) -> dict[str, Any]:
    """The verdict as plain JSON-serialisable data (NaN as None)."""
    return _plain({
        "reference": verdict.reference,
        "confidence": verdict.confidence,
        "alpha": verdict.alpha,
        "seeds": list(verdict.seeds),
        "note": note(verdict),
        "arms": verdict.arms.to_dict(orient="records"),
        "comparisons": verdict.comparisons.to_dict(orient="records"),
        "curves": {arm: {"epochs": e, "mean": m, "std": s, "n": verdict.curve_n.get(arm)}
                   for arm, (e, m, s) in verdict.curves.items()},
    })


def write_verdict(verdict: Verdict, out_dir: Path,
                  sharpness_key: str | None = None) -> list[Path]:
    """Write the tables (md, tex, csv, json) and the figures into ``out_dir``; return the paths.

    The sharpness figure uses ``sharpness_key``, by default ``sharpness/sam`` if measured, else
    the first key; it is skipped when no run measured any sharpness.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {"verdict.md": to_markdown(verdict), "verdict.tex": to_latex(verdict),
             "verdict.json": json.dumps(to_records(verdict), indent=2, allow_nan=False) + "\n"}
    paths = []
    for name, text in texts.items():
        (out_dir / name).write_text(text, encoding="utf-8")
        paths.append(out_dir / name)
    for name, frame in (("arms.csv", verdict.arms), ("comparisons.csv", verdict.comparisons)):
        frame.to_csv(out_dir / name, index=False)
        paths.append(out_dir / name)
    arms = list(verdict.arms["arm"])
    paths.append(verdict_plots.save_figure(verdict_plots.val_curves_figure(verdict),
                                           out_dir / "val_curves.png"))
    keys = verdict.sharpness_keys
    if keys:
        key = sharpness_key or ("sharpness/sam" if "sharpness/sam" in keys else keys[0])
        fig = verdict_plots.sharpness_figure(verdict.results, key=key, arms=arms)
        paths.append(verdict_plots.save_figure(fig, out_dir / "sharpness_vs_test.png"))
    return paths
