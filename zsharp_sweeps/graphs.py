"""One whole training step (both SAM passes and the optimizer) replayed as a CUDA graph.

Why: CIFAR-sized models at batch 128 are launch-bound on an H100: a SAM step is ~1,000
small kernels, and Python plus the launch overhead cost more than the GPU work. Captured
once and replayed, the step costs one launch (airbench's and the issue's reference point:
SAM 13 ms eager-equivalent work in one graph on ResNet-56).

A graph records kernels and the addresses they read and write; no Python runs on replay.
Rules that make it exact:
- the batch shape is static (the train loader drops the last partial batch); each call
  copies the batch into the graph's static input buffers;
- the first ``warmup`` calls run eagerly on a side stream (they are real steps): cuDNN picks
  its algorithms, optimizer state (momentum buffers, ZSharp's layouts) is allocated;
- optimizer state is updated in place from then on (``zsharp_sweeps.optim`` guarantees it,
  ``tests/test_capture_safety.py`` pins it): a step that stored a *new* tensor in its state
  would leave the replays reading the tensor captured. Every capture compares the addresses
  of all tensors reachable from the optimizer before and after the captured step, and stops
  the run (:class:`CaptureUnsafeError`) if any moved or appeared;
- a Python number captured into the graph is frozen, so the graph is re-captured whenever
  one changes: any param-group setting (the learning rate each epoch, momentum, rho, ...) or
  a public scalar attribute of the optimizer (FSAM's ``sigma``, ...); also after
  ``load_state_dict`` (it replaces the state tensors). Capture takes milliseconds;
- the generators an optimizer draws from (``graph_generators()``: ZSharp's random filter)
  are registered with each graph, so every replay draws new numbers like an eager step;
- a step with host synchronisation cannot be captured: fp16's GradScaler is refused by the
  trainer, torch optimizers built without ``capturable=True`` are refused here, and any other
  capture error falls back to eager steps for the rest of the run, with a warning (unless the
  failed capture already rebound optimizer state: then the run stops).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

StepFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class CaptureUnsafeError(RuntimeError):
    """The captured step would replay wrongly (it rebinds optimizer state); the run stops."""


# --- what a captured step depends on -----------------------------------------------------
def _optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizer and, for the SAM family, the base optimizer it wraps."""
    base = getattr(optimizer, "base_optimizer", None)
    return [optimizer] + ([base] if isinstance(base, torch.optim.Optimizer) else [])


def _walkable(obj: Any) -> bool:
    """Objects whose attributes may hold step state: optimizers and this package's classes."""
    return isinstance(obj, torch.optim.Optimizer) or (
        type(obj).__module__.startswith("zsharp_sweeps.") and hasattr(obj, "__dict__")
    )


def state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Every tensor reachable from ``optimizer``, by a path that stays the same across steps.

    Walks attributes, dicts, lists and tuples of the optimizer (the base optimizer, its
    ``state``, backups, stored gradients, ZSharp's layouts and constants, ...). Parameters are
    named ``param i`` (their position in ``param_groups``), so paths do not depend on
    addresses. Generic on purpose: a buffer added to an optimizer later is covered unchanged.
    """
    names = {
        id(p): f"param {i}"
        for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])
    }
    out: dict[str, Tensor] = {}
    seen: set[int] = set()

    def label(key: Any) -> str:
        return names.get(id(key), f"tensor {tuple(key.shape)}") if isinstance(key, Tensor) else repr(key)

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, Tensor):
            out.setdefault(path, obj)
            return
        if id(obj) in seen:
            return
        if isinstance(obj, dict):
            seen.add(id(obj))
            for key, value in obj.items():
                walk(value, f"{path}[{label(key)}]")
        elif isinstance(obj, (list, tuple)):
            seen.add(id(obj))
            for i, value in enumerate(obj):
                walk(value, f"{path}[{i}]")
        elif _walkable(obj):
            seen.add(id(obj))
            for key, value in vars(obj).items():
                walk(value, f"{path}.{key}")

    walk(optimizer, type(optimizer).__name__)
    return out


def state_addresses(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """``state_tensors`` as device addresses: what a captured graph actually reads."""
    return {path: t.data_ptr() for path, t in state_tensors(optimizer).items()}


def _frozen(value: Any) -> Hashable:
    if isinstance(value, Tensor):  # read on the device at replay: only its identity matters
        return ("tensor", value.data_ptr())
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def graph_constants(optimizer: torch.optim.Optimizer) -> tuple[Hashable, ...]:
    """The Python numbers a captured step bakes in: every param-group setting (lr, momentum,
    rho, ...) and the optimizer's public scalar attributes (FSAM's sigma, ZSharp's filter)."""
    groups = tuple(
        tuple((k, _frozen(v)) for k, v in sorted(g.items()) if k != "params")
        for g in optimizer.param_groups
    )
    attrs = tuple(
        (k, v)
        for k, v in sorted(vars(optimizer).items())
        if not k.startswith("_") and isinstance(v, (bool, int, float, str))
    )
    return groups, attrs


def check_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizers whose step cannot be replayed from a CUDA graph, with the fix."""
    for opt in reversed(_optimizers(optimizer)):  # the base optimizer owns "capturable"
        if any(group.get("capturable") is False for group in opt.param_groups):
            raise ValueError(
                f"{type(opt).__name__} was built with capturable=False: its step count lives "
                "on the host, so a CUDA graph would replay a frozen step. Build it with "
                "capturable=True (build_optimizer(..., capturable=True), which the trainer "
                "does when hardware.cuda_graph=true), or set hardware.cuda_graph=false"
            )


# --- the replayed step ------------------------------------------------------------------
class CudaGraphStep:
    """Wrap ``step(inputs, targets) -> (loss, logits)`` so that it replays a CUDA graph.

    ``captures`` counts graphs captured, ``disabled`` is True once a capture failed and the
    run went on eagerly. The CUDA-specific operations are the methods ``_require_cuda``,
    ``_eager``, ``_record``, ``_replay`` and ``_synchronize``; the rest decides when to run
    eagerly, capture, re-capture, replay or refuse.
    """

    def __init__(self, step: StepFn, optimizer: torch.optim.Optimizer, warmup: int = 3) -> None:
        if warmup < 1:
            raise ValueError(
                f"warmup={warmup!r} is invalid: allowed >= 1 (the first step creates the "
                "optimizer state that the graph must then read in place)"
            )
        self._require_cuda()
        check_capturable(optimizer)
        self.step = step
        self.optimizer = optimizer
        self.warmup = warmup
        self.calls = 0
        self.graph: Any = None
        self.graph_key: tuple | None = None
        self.static_inputs: Tensor | None = None
        self.static_targets: Tensor | None = None
        self.outputs: tuple[Tensor, Tensor] | None = None
        self.disabled = False
        self.captures = 0
        self._captured_states: list[Any] = []
        self._side_stream: torch.cuda.Stream | None = None

    # --- CUDA operations (overridden by the CPU tests of the decisions) --------------------
    def _require_cuda(self) -> None:
        if not torch.cuda.is_available():
            raise ValueError(
                "hardware.cuda_graph=true needs a CUDA device, and none is available here: "
                "allowed hardware.cuda_graph=false"
            )

    def _eager(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """A warm-up step on a side stream (what graph capture requires of prior work)."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        self._side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side_stream):
            out = self.step(inputs, targets)
        torch.cuda.current_stream().wait_stream(self._side_stream)
        return out

    def _record(self, inputs: Tensor, targets: Tensor) -> tuple[Any, tuple[Tensor, Tensor]]:
        """Capture one step on the static buffers; return the graph and its outputs."""
        pool = self.graph.pool() if self.graph is not None else None
        graph = torch.cuda.CUDAGraph()
        generators = getattr(self.optimizer, "graph_generators", list)()
        if generators and not hasattr(graph, "register_generator_state"):
            raise CaptureUnsafeError(
                f"{type(self.optimizer).__name__} draws from its own generator, which this "
                f"PyTorch {torch.__version__} cannot register with a CUDA graph (the replays "
                "would repeat one draw): use PyTorch >= 2.5 or hardware.cuda_graph=false"
            )
        for generator in generators:
            graph.register_generator_state(generator)
        self._synchronize()
        # thread_local: a capture does not forbid CUDA calls of other threads (a user's data
        # pipeline, a logging thread) while it records this one's.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = self.step(inputs, targets)
        return graph, outputs

    def _replay(self) -> None:
        self.graph.replay()

    def _synchronize(self) -> None:
        torch.cuda.current_stream().synchronize()

    # --- decisions --------------------------------------------------------------------------
    def _key(self, inputs: Tensor) -> tuple:
        return (tuple(inputs.shape), inputs.dtype, graph_constants(self.optimizer))

    def _state_replaced(self) -> bool:
        """True after ``load_state_dict``: it puts new tensors in a new ``state`` dict."""
        states = [opt.state for opt in _optimizers(self.optimizer)]
        return len(states) != len(self._captured_states) or any(
            a is not b for a, b in zip(states, self._captured_states, strict=False)
        )

    def _rebound(self, before: dict[str, int]) -> list[str]:
        """Paths of state tensors that moved or appeared since ``before``."""
        after = state_addresses(self.optimizer)
        return [path for path, ptr in after.items() if path not in before or before[path] != ptr]

    def _capture(self, inputs: Tensor, targets: Tensor, key: tuple) -> None:
        if self.static_inputs is None or self.static_inputs.shape != inputs.shape:
            self.static_inputs = torch.empty_like(inputs)
            self.static_targets = torch.empty_like(targets)
        self.static_inputs.copy_(inputs)
        self.static_targets.copy_(targets)
        before = state_addresses(self.optimizer)
        try:
            graph, outputs = self._record(self.static_inputs, self.static_targets)
        finally:
            rebound = self._rebound(before)
            if rebound:
                raise CaptureUnsafeError(
                    f"{type(self.optimizer).__name__} stores new tensors in its state during "
                    f"a step ({', '.join(rebound[:4])}{', ...' if len(rebound) > 4 else ''}): a "
                    "CUDA graph would keep reading the tensors it captured. Update that state "
                    "in place (copy_, mul_, add_), or set hardware.cuda_graph=false"
                )
        self.graph, self.graph_key, self.outputs = graph, key, outputs
        self._captured_states = [opt.state for opt in _optimizers(self.optimizer)]
        self.captures += 1

    def __call__(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        self.calls += 1
        if self.disabled:
            return self.step(inputs, targets)
        if self.calls <= self.warmup:
            return self._eager(inputs, targets)
        key = self._key(inputs)
        if key != self.graph_key or self._state_replaced():
            try:
                self._capture(inputs, targets, key)
            except CaptureUnsafeError:
                raise
            except Exception as exc:  # e.g. a host sync inside the step
                log.warning("CUDA graph capture failed, training eagerly from here: %s", exc)
                self.disabled = True
                self.graph = None
                self._synchronize()
                return self.step(inputs, targets)
        else:
            self.static_inputs.copy_(inputs)
            self.static_targets.copy_(targets)
        self._replay()
        return self.outputs
