"""The Triton kernels of ZSharp's fast path, run on the CPU through Triton's interpreter.

On a GPU the same kernels are compiled (tests/gpu checks them there); here they must give the
kept set bit for bit and ``e`` up to rounding, against the plain PyTorch path. Each check runs
in a fresh Python with ``TRITON_INTERPRET=1`` (tests/fused_checks.py): the interpreter is
chosen when Triton is first imported, and other tests import it for torch.compile.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from zsharp_sweeps.optim import ZSharp, fused

from .conftest import REPO


def _run(call: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", f"import tests.fused_checks as c; c.{call}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow  # a fresh interpreter running Triton's interpreter
@pytest.mark.parametrize("chunk", [16, 64, 2048])
def test_fused_abs_z_is_bit_identical(chunk: int) -> None:
    _run(f"abs_z_is_bit_identical({chunk})")


@pytest.mark.slow  # a fresh interpreter running Triton's interpreter
@pytest.mark.parametrize("rhos", [(0.05, 0.05), (0.05, 0.2)])
def test_fused_perturbation_keeps_the_same_entries(rhos: tuple[float, float]) -> None:
    _run(f"perturbation_keeps_the_same_entries({rhos})")


@pytest.mark.slow  # a fresh interpreter running Triton's interpreter
def test_fused_perturbation_with_a_nan_gradient_matches() -> None:
    _run("perturbation_with_a_nan_gradient_matches()")


def test_kernel_and_stream_options_are_checked() -> None:
    w = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="kernels='cuda'.*auto, torch, triton, fused"):
        ZSharp([w], torch.optim.SGD, lr=0.1, kernels="cuda")
    with pytest.raises(ValueError, match="stats_streams=-1.*>= 0"):
        ZSharp([w], torch.optim.SGD, lr=0.1, stats_streams=-1)
    assert fused.available(torch.device("cpu")) is False
