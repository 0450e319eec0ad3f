"""One whole training step (both SAM passes and the optimizer) replayed as a CUDA graph.

Why: CIFAR-sized models at batch 128 are launch-bound on an H100: a SAM step is ~1,000
small kernels, and Python plus the launch overhead cost more than the GPU work. Captured
once and replayed, the step costs one launch (airbench's and the issue's reference point:
SAM 13 ms eager-equivalent work in one graph on ResNet-56).

Rules that make it exact:
- the batch shape is static (the train loader drops the last partial batch); each call
  copies the batch into the graph's static input buffers;
- the first ``warmup`` calls run eagerly on a side stream (they are real steps): cuDNN picks
  its algorithms, optimizer state (momentum buffers, ZSharp's layouts) is allocated;
- a Python float captured into the graph is frozen, so the graph is re-captured whenever a
  learning rate changes (the schedule steps once per epoch; capture takes milliseconds);
- a step with host synchronisation cannot be captured: fp16's GradScaler is refused here,
  and any capture error falls back to eager steps for the rest of the run, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from zsharp_sweeps.concurrency import CUDA_EXCLUSIVE

log = logging.getLogger(__name__)

StepFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class CudaGraphStep:
    """Wrap ``step(inputs, targets) -> (loss, logits)`` so that it replays a CUDA graph."""

    def __init__(self, step: StepFn, optimizer: torch.optim.Optimizer, warmup: int = 3) -> None:
        self.step = step
        self.optimizer = optimizer
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_key: tuple | None = None
        self.static_inputs: Tensor | None = None
        self.static_targets: Tensor | None = None
        self.outputs: tuple[Tensor, Tensor] | None = None
        self.disabled = False
        self.captures = 0
        self._side_stream: torch.cuda.Stream | None = None

    def _key(self, inputs: Tensor) -> tuple:
        lrs = tuple(float(g["lr"]) for g in self.optimizer.param_groups)
        return (tuple(inputs.shape), inputs.dtype, lrs)

    def _eager(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        self._side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side_stream):
            out = self.step(inputs, targets)
        torch.cuda.current_stream().wait_stream(self._side_stream)
        return out

    def _capture(self, inputs: Tensor, targets: Tensor, key: tuple) -> None:
        if self.static_inputs is None or self.static_inputs.shape != inputs.shape:
            self.static_inputs = torch.empty_like(inputs)
            self.static_targets = torch.empty_like(targets)
        self.static_inputs.copy_(inputs)
        self.static_targets.copy_(targets)
        pool = self.graph.pool() if self.graph is not None else None
        graph = torch.cuda.CUDAGraph()
        torch.cuda.current_stream().synchronize()
        # thread_local: other threads (concurrent trials of the streams launcher) may keep
        # launching work while this one captures.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = self.step(self.static_inputs, self.static_targets)
        self.graph, self.graph_key, self.outputs = graph, key, outputs
        self.captures += 1

    def __call__(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        self.calls += 1
        if self.disabled or self.calls <= self.warmup:
            with CUDA_EXCLUSIVE:  # first steps create handles and load kernels (see concurrency)
                if self.disabled:
                    return self.step(inputs, targets)
                return self._eager(inputs, targets)
        key = self._key(inputs)
        if key != self.graph_key:
            try:
                with CUDA_EXCLUSIVE:
                    self._capture(inputs, targets, key)
            except Exception as exc:  # e.g. a host sync or an uncapturable generator
                log.warning("CUDA graph capture failed, training eagerly from here: %s", exc)
                self.disabled = True
                self.graph = None
                torch.cuda.current_stream().synchronize()
                return self.step(inputs, targets)
        else:
            self.static_inputs.copy_(inputs)
            self.static_targets.copy_(targets)
        # Replays share the CUDA generator's graph-safe state with captures elsewhere in the
        # process ("Cannot prepare for replay during capturing stage"): launch under the lock
        # (the host call only; the GPU still runs the graphs of several trials at once).
        with CUDA_EXCLUSIVE:
            self.graph.replay()
        return self.outputs
