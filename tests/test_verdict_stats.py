"""The verdict's numbers, pinned against formulas computed here, not by the code under test.

Why independent: ``summarize`` uses scipy's ttest_rel and statsmodels' Holm; the expected
values here come from hand formulas (numpy means, scipy.stats.t.ppf quantiles, a step-down
Holm written below) and from literals worked out by hand for the fixed data set, so a wrong
ddof, a one-sided quantile or a Holm without its running maximum fails a test.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from zsharp_sweeps.analysis import (
    ArmBudget,
    SeedResult,
    summarize,
    to_latex,
    to_markdown,
    to_records,
    write_verdict,
)
from zsharp_sweeps.analysis.verdict import holm

SEEDS = [0, 1, 2, 3, 4]
# Hand-picked: sam beats sgd on every seed by 0.22-0.33 pp (significant after Holm); zsharp
# wins on three seeds and loses on two (not significant). sgd's mean is exactly 0.9431.
ACC = {
    "sgd": [0.9412, 0.9425, 0.9431, 0.9440, 0.9447],
    "sam": [0.9443, 0.9450, 0.9460, 0.9462, 0.9480],
    "zsharp": [0.9422, 0.9410, 0.9451, 0.9435, 0.9450],
}
SHARP = {"sgd": 0.05, "sam": 0.012, "zsharp": 0.010}


def _budget(arm: str, **config: float) -> ArmBudget:
    return ArmBudget(arm=arm, config=config or {"optimizer.lr": 0.05, "optimizer.rho": 0.02},
                     tune_best_val=0.95, trials=40, complete=30, pruned=9, failed=1,
                     tune_gpu_hours=3.25, final_gpu_hours=0.5)


def _results(acc: dict[str, list[float]] = ACC, seeds: list[int] = SEEDS) -> list[SeedResult]:
    out = []
    for arm, values in acc.items():
        for i, (seed, a) in enumerate(zip(seeds, values)):
            curve = (0.5, 0.8, a + 0.001) if i else (0.5, 0.8)  # seed 0 stopped an epoch early
            out.append(SeedResult(arm=arm, seed=seed, test_acc=a, best_val_acc=a + 0.001,
                                  sharpness={"sharpness/sam": SHARP.get(arm, 0.02) * (1 + i / 10)},
                                  val_curve=curve))
    return out


def _holm_by_hand(p: list[float]) -> np.ndarray:
    """Step-down Holm: sort the finite p, multiply the i-th smallest by (m - i), running max."""
    p = np.asarray(p, dtype=float)
    out = np.full(len(p), np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    running = 0.0
    for i, j in enumerate(finite[np.argsort(p[finite])]):
        running = max(running, min(1.0, (len(finite) - i) * p[j]))
        out[j] = running
    return out


@pytest.fixture(scope="module")
def verdict():
    # Budgets in another order than the results: rows follow the budgets.
    budgets = [_budget("sgd"), _budget("zsharp"), _budget("sam")]
    return summarize(reversed(_results()), budgets, reference="sgd")


# ----- arms ----------------------------------------------------------------------------------
def test_arm_rows_match_hand_formulas(verdict):
    arms = verdict.arms.set_index("arm")
    assert list(verdict.arms["arm"]) == ["sgd", "zsharp", "sam"]
    t = stats.t.ppf(0.975, 4)
    for arm, values in ACC.items():
        x = np.array(values)
        mean, std = x.sum() / 5, math.sqrt(((x - x.sum() / 5) ** 2).sum() / 4)
        row = arms.loc[arm]
        assert row["n"] == 5
        assert row["test_mean"] == pytest.approx(mean, abs=1e-12)
        assert row["test_std"] == pytest.approx(std, abs=1e-12)
        assert row["ci_low"] == pytest.approx(mean - t * std / math.sqrt(5), abs=1e-12)
        assert row["ci_high"] == pytest.approx(mean + t * std / math.sqrt(5), abs=1e-12)
        assert row["val_mean"] == pytest.approx(mean + 0.001, abs=1e-12)
        sharp = SHARP[arm] * (1 + np.arange(5) / 10)
        assert row["sharpness/sam_mean"] == pytest.approx(sharp.mean())
        assert row["sharpness/sam_std"] == pytest.approx(sharp.std(ddof=1))


def test_arm_literal_pins(verdict):
    """Worked by hand: deviations of sgd from 0.9431 square-sum to 7.34e-6; t(0.975, 4)."""
    sgd = verdict.arms.set_index("arm").loc["sgd"]
    assert sgd["test_mean"] == pytest.approx(0.9431, abs=1e-12)
    assert sgd["test_std"] == pytest.approx(math.sqrt(7.34e-6 / 4), abs=1e-12)
    assert sgd["ci_low"] == pytest.approx(0.941418015, abs=1e-6)
    assert sgd["ci_high"] == pytest.approx(0.944781985, abs=1e-6)


def test_arm_columns_and_budget(verdict):
    assert list(verdict.arms.columns) == [
        "arm", "n", "test_mean", "test_std", "ci_low", "ci_high", "val_mean",
        "sharpness/sam_mean", "sharpness/sam_std", "config", "trials", "complete", "pruned",
        "failed", "tune_gpu_hours", "final_gpu_hours", "tune_best_val",
    ]
    row = verdict.arms.iloc[0]
    assert row["config"] == "lr=0.05 rho=0.02"
    assert (row["trials"], row["pruned"], row["tune_gpu_hours"]) == (40, 9, 3.25)
    assert verdict.seeds == (0, 1, 2, 3, 4)
    assert verdict.sharpness_keys == ("sharpness/sam",)


# ----- comparisons ---------------------------------------------------------------------------
def test_comparisons_match_hand_formulas(verdict):
    comp = verdict.comparisons.set_index("arm")
    assert list(verdict.comparisons["arm"]) == ["zsharp", "sam"]
    t_q = stats.t.ppf(0.975, 4)
    p_by_hand = {}
    for arm in ("zsharp", "sam"):
        d = np.array(ACC[arm]) - np.array(ACC["sgd"])
        mean = d.sum() / 5
        sd = math.sqrt(((d - mean) ** 2).sum() / 4)
        t = mean / (sd / math.sqrt(5))
        p_by_hand[arm] = 2 * stats.t.sf(abs(t), 4)
        row = comp.loc[arm]
        assert row["reference"] == "sgd" and row["n_pairs"] == 5
        assert row["mean_diff"] == pytest.approx(mean, abs=1e-12)
        assert row["diff_std"] == pytest.approx(sd, abs=1e-12)
        assert row["ci_low"] == pytest.approx(mean - t_q * sd / math.sqrt(5), abs=1e-12)
        assert row["ci_high"] == pytest.approx(mean + t_q * sd / math.sqrt(5), abs=1e-12)
        assert row["t"] == pytest.approx(t, rel=1e-9)
        assert row["p"] == pytest.approx(p_by_hand[arm], rel=1e-9)
        assert row["cohens_dz"] == pytest.approx(mean / sd, rel=1e-9)
    holm_by_hand = _holm_by_hand([p_by_hand["zsharp"], p_by_hand["sam"]])
    assert comp["p_holm"].to_numpy() == pytest.approx(holm_by_hand, rel=1e-9)
    assert comp.loc["sam", "p_holm"] < 0.05 < comp.loc["zsharp", "p_holm"]
    assert comp.loc["sam", "better"] == "arm"
    assert comp.loc["zsharp", "better"] == "no significant difference"


def test_comparison_literal_pins(verdict):
    """sam - sgd = 0.0031, 0.0025, 0.0029, 0.0022, 0.0033: mean 0.0028, variance 2e-7, t = 14."""
    sam = verdict.comparisons.set_index("arm").loc["sam"]
    assert sam["mean_diff"] == pytest.approx(0.0028, abs=1e-12)
    assert sam["diff_std"] == pytest.approx(math.sqrt(2e-7), abs=1e-12)
    assert sam["t"] == pytest.approx(14.0, abs=1e-9)
    assert sam["cohens_dz"] == pytest.approx(14 / math.sqrt(5), abs=1e-9)
    assert sam["ci_low"] == pytest.approx(0.002244711, abs=1e-6)
    assert sam["ci_high"] == pytest.approx(0.003355289, abs=1e-6)
    # Holm over two: the smaller p doubled.
    assert sam["p_holm"] == pytest.approx(2 * sam["p"], rel=1e-12)


def test_holm_against_step_down_by_hand():
    # NaN is no test; 3 * 0.021 < 4 * 0.02 needs the running maximum; 2 * 0.6 clips to 1.
    p = [0.02, 0.021, float("nan"), 0.9, 0.005, 0.6]
    adjusted = holm(p)
    assert adjusted == pytest.approx(_holm_by_hand(p), rel=1e-12, nan_ok=True)
    assert adjusted[1] == pytest.approx(0.08)  # max(4 * 0.02, 3 * 0.021)
    assert adjusted[3] == adjusted[5] == 1.0
    assert holm([0.04]) == pytest.approx([0.04]) and np.isnan(holm([float("nan")])).all()


def test_holm_with_four_arms_through_summarize():
    acc = dict(ACC, asam=[0.9420, 0.9436, 0.9433, 0.9452, 0.9450])
    budgets = [_budget(a) for a in acc]
    v = summarize(_results(acc), budgets, reference="sgd")
    comp = v.comparisons
    assert comp["p_holm"].to_numpy() == pytest.approx(_holm_by_hand(list(comp["p"])), rel=1e-9)


# ----- NaN handling --------------------------------------------------------------------------
def test_one_seed_gives_nan_spread_and_no_test():
    acc = {"sgd": [0.94], "sam": [0.95]}
    v = summarize(_results(acc, [7]), [_budget("sgd"), _budget("sam")], reference="sgd")
    for col in ("test_std", "ci_low", "ci_high"):
        assert v.arms[col].isna().all()
    assert v.arms["test_mean"].tolist() == [0.94, 0.95]
    c = v.comparisons.iloc[0]
    assert c["n_pairs"] == 1 and c["mean_diff"] == pytest.approx(0.01)
    for col in ("diff_std", "ci_low", "ci_high", "t", "p", "p_holm", "cohens_dz"):
        assert math.isnan(c[col]), col
    assert c["better"] == "no significant difference"
    md = to_markdown(v)
    assert "| 95.00 | n/a | 1 |" in md
    assert "Holm-corrected over 0 comparisons (1 without a p-value)" in md


def test_equal_differences_are_not_tested():
    # +1 pp on every seed, as read from the runs: in binary the differences differ in the last
    # bit, and scipy's paired t-test on them alone reports t ~ 4.5e14, p ~ 1e-58.
    acc = dict(ACC, sam=[0.9512, 0.9525, 0.9531, 0.9540, 0.9547])
    d = np.array(acc["sam"]) - np.array(acc["sgd"])
    assert np.ptp(d) > 0  # the float noise the code must see through
    v = summarize(_results(acc), [_budget(a) for a in acc], reference="sgd")
    comp = v.comparisons.set_index("arm")
    sam = comp.loc["sam"]
    assert sam["diff_std"] == 0.0
    assert sam["ci_low"] == sam["ci_high"] == sam["mean_diff"] == pytest.approx(0.01)
    for col in ("t", "p", "p_holm", "cohens_dz"):
        assert math.isnan(sam[col]), col
    assert sam["better"] == "no significant difference"
    # The other comparison is a family of one: Holm leaves its p alone.
    assert comp.loc["zsharp", "p_holm"] == pytest.approx(comp.loc["zsharp", "p"], rel=1e-12)


# ----- curves --------------------------------------------------------------------------------
def test_curves_truncate_to_the_shortest(verdict):
    epochs, mean, std = verdict.curves["sam"]
    assert epochs.tolist() == [1, 2]  # seed 0 has two epochs, the others three
    assert mean == pytest.approx([0.5, 0.8])
    assert std == pytest.approx([0.0, 0.0], abs=1e-12)
    assert verdict.curve_n == {"sgd": 5, "zsharp": 5, "sam": 5}


def test_empty_curves_are_skipped():
    res = [SeedResult("sgd", s, 0.9 + s / 100, 0.9, {}, ()) for s in (1, 2)]
    res += [SeedResult("sam", s, 0.91 + s / 100, 0.9, {}, (0.5, 0.9) if s == 1 else ())
            for s in (1, 2)]
    v = summarize(res, [_budget("sgd"), _budget("sam")], reference="sgd")
    assert "sgd" not in v.curves and v.curve_n == {"sam": 1}
    assert np.isnan(v.curves["sam"][2]).all()  # one curve: no std
    assert v.sharpness_keys == ()


# ----- errors --------------------------------------------------------------------------------
def test_reference_missing_names_the_arms():
    with pytest.raises(ValueError, match=r"reference 'adam' is not among the arms: sgd, sam"):
        summarize(_results(), [_budget("sgd"), _budget("sam")], reference="adam")


def test_unpaired_seeds_name_the_missing_seed():
    results = [r for r in _results() if not (r.arm == "zsharp" and r.seed == 3)]
    with pytest.raises(ValueError, match=r"arm 'zsharp' lacks seeds \[3\] that the reference"):
        summarize(results, [_budget(a) for a in ACC], reference="sgd")


def test_arm_without_results_and_no_results():
    with pytest.raises(ValueError, match="arm 'asam' has no results"):
        summarize(_results(), [*(_budget(a) for a in ACC), _budget("asam")], reference="sgd")
    with pytest.raises(ValueError, match="no results"):
        summarize([], [_budget("sgd")], reference="sgd")


def test_results_of_an_arm_without_budget_and_duplicate_seeds():
    with pytest.raises(ValueError, match="arm 'zsharp', which has no budget"):
        summarize(_results(), [_budget("sgd"), _budget("sam")], reference="sgd")
    with pytest.raises(ValueError, match="seed 0 twice"):
        summarize(_results() + _results()[:1], [_budget(a) for a in ACC], reference="sgd")


# ----- rendering -----------------------------------------------------------------------------
def test_markdown_cells(verdict):
    md = to_markdown(verdict)
    assert "| sgd (reference) | 94.31 ± 0.14 | [94.14, 94.48] | 5 |" in md
    assert "| sam | 94.59 ± 0.14 | [94.42, 94.76] | 5 |" in md
    assert "lr=0.05 rho=0.02 | 40 (9; 1 failed) | 3.25 + 0.50 |" in md
    assert ("| sam − sgd | +0.28 | [+0.22, +0.34] | 5 | 1.5e-04 | 3.0e-04 | 6.26 | sam better |"
            in md)
    assert "| zsharp − sgd | +0.03 |" in md and "| no significant difference |" in md
    assert ("5 seeds per arm, paired by seed; 95% t intervals; Holm-corrected over 2 "
            "comparisons") in md
    assert "a seed is a replicate, never a hyperparameter" in md


def test_latex_looks_compilable(verdict):
    acc = dict(ACC, zsharp_random=ACC["zsharp"])
    tex = to_latex(summarize(_results(acc), [_budget(a) for a in acc], reference="sgd"))
    assert tex.startswith(r"\begin{tabular}")
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert tex.rstrip().endswith(r"\end{tabular}")
    assert re.search(r"(?<!\\)_", tex) is None, "raw underscore"
    assert re.search(r"(?<!\\)%", tex) is None, "raw percent"
    assert "±" not in tex and "zsharp\\_random" in tex
    assert r"sam & 5 & 94.59 $\pm$ 0.14 & [94.42, 94.76] & $+0.28$" in tex
    assert r"$4.5\times 10^{-4}$" in tex  # Holm over three: 3 * 1.5e-4
    # Every row has as many cells as the column spec.
    ncols = len(re.match(r"\\begin\{tabular\}\{(\w+)\}", tex).group(1))
    rows = [line for line in tex.splitlines() if line.endswith(r"\\")]
    assert rows and all(line.count(" & ") == ncols - 1 for line in rows)


def test_records_are_strict_json():
    v = summarize(_results({"sgd": [0.94], "sam": [0.95]}, [7]),
                  [_budget("sgd"), _budget("sam")], reference="sgd")
    rec = to_records(v)
    json.dumps(rec, allow_nan=False)
    assert rec["arms"][0]["test_std"] is None and rec["comparisons"][0]["p"] is None
    assert rec["seeds"] == [7] and rec["reference"] == "sgd"


def test_write_verdict_files_and_json_round_trip(verdict, tmp_path):
    paths = write_verdict(verdict, tmp_path / "out")
    names = {p.name for p in paths}
    assert names == {"verdict.md", "verdict.tex", "arms.csv", "comparisons.csv",
                     "verdict.json", "val_curves.png", "sharpness_vs_test.png"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    for png in ("val_curves.png", "sharpness_vs_test.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "verdict.json").read_text()) == to_records(verdict)
    arms = pd.read_csv(tmp_path / "out" / "arms.csv")
    assert list(arms["arm"]) == ["sgd", "zsharp", "sam"]
    assert arms["test_mean"].iloc[0] == pytest.approx(0.9431, abs=1e-12)
    comp = pd.read_csv(tmp_path / "out" / "comparisons.csv")
    assert comp["better"].tolist() == ["no significant difference", "arm"]


def test_write_verdict_without_sharpness_skips_its_figure(tmp_path):
    res = [SeedResult(a, s, 0.9 + s / 100 + (a == "sam") / 50, 0.9, {}, (0.5, 0.9))
           for a in ("sgd", "sam") for s in (1, 2, 3)]
    v = summarize(res, [_budget("sgd"), _budget("sam")], reference="sgd")
    names = {p.name for p in write_verdict(v, tmp_path)}
    assert "sharpness_vs_test.png" not in names and "val_curves.png" in names
