"""Analysis of a verdict benchmark: seed statistics, paired tests, tables and figures.

A leaf (numpy, scipy, statsmodels, pandas, matplotlib; no Optuna, MLflow or Hydra) so the
statistics can be tested and rerun on saved results without the tuning stack.
"""

from zsharp_sweeps.analysis.verdict import (
    ArmBudget,
    SeedResult,
    Verdict,
    summarize,
    to_latex,
    to_markdown,
    to_records,
    write_verdict,
)
from zsharp_sweeps.analysis.verdict_plots import sharpness_figure, val_curves_figure

__all__ = [
    "ArmBudget",
    "SeedResult",
    "Verdict",
    "sharpness_figure",
    "summarize",
    "to_latex",
    "to_markdown",
    "to_records",
    "val_curves_figure",
    "write_verdict",
]
