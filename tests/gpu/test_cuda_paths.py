"""GPU-only checks, collected only where CUDA exists (tests/conftest.py), e.g. on the device:
``python -m pytest tests/gpu``. On a CPU machine they are not collected, rather than skipped."""

from __future__ import annotations

import torch

from ..test_optim_threshold import radix_steps_match_cpu


def test_radix_on_cuda_is_sync_free_and_equals_cpu() -> None:
    radix_steps_match_cpu(torch.device("cuda"))
