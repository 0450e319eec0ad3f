"""Metrics computed during training: sharpness of the loss surface (docs/algorithms.md, "Sharpness metrics")."""

from zsharp_sweeps.metrics.sharpness import (
    compute_sharpness,
    hessian_top_eigenvalue,
    hessian_trace,
    sam_sharpness,
)

__all__ = [
    "compute_sharpness",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "sam_sharpness",
]
