"""Multi-GPU tests: collected only where two or more CUDA devices exist."""

import torch

collect_ignore = [] if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else [
    "test_sweep_gpus.py"
]
