"""The verdict: every optimizer tuned with the same budget, retrained on fresh seeds,
compared with corrected statistics (``python -m zsharp_sweeps.verdict``)."""
