"""Optimizer state that a CUDA graph can capture: every optimizer in conf/optimizer/ (found on
disk, so a new yaml is covered without editing this file), built from a composed config the
way the trainer builds it, keeps every state tensor at the same address from one step to the
next, and lists every generator it draws from.

Why: a captured step reads and writes fixed addresses. Friendly-SAM used to store a new
momentum tensor every step (``state[p]["momentum"] = new_m``); eagerly that is fine, but a
replayed graph kept reading the momentum it saw at capture, and ``hardware=gpu_fast
optimizer=fsam`` trained another optimizer (6.3e-3 off eager after 30 steps on an H100).
These checks run on the CPU; tests/gpu/test_graph_matrix.py replays real graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from zsharp_sweeps.config import BASE_OPTIMIZERS as PLAIN
from zsharp_sweeps.config import validate
from zsharp_sweeps.graphs import _optimizers, state_addresses, state_tensors
from zsharp_sweeps.optim import FriendlySAM, is_sam_family, train_step
from zsharp_sweeps.optim.checks import FILTERS
from zsharp_sweeps.training.build import build_parts

from .conftest import CONF_DIR

CPU = torch.device("cpu")
YAMLS = sorted(p for p in (CONF_DIR / "optimizer").glob("*.yaml") if not p.stem.startswith("_"))
#: Steps after which every state tensor must exist (CudaGraphStep's smallest warm-up is 1).
WARMUP = 1


def _cases() -> list[pytest.param]:
    """Each optimizer yaml; ZSharp with each filter; each SAM-family one over an Adam base."""
    cases = []
    for path in YAMLS:
        name = str(OmegaConf.load(path).name)
        cases.append(pytest.param(path.stem, [], id=path.stem))
        if name == "zsharp":
            cases += [
                pytest.param(path.stem, [f"optimizer.filter={f}"], id=f"{path.stem}-{f}")
                for f in FILTERS if f != "zscore"
            ]
        if name not in PLAIN:
            cases.append(pytest.param(path.stem, ["optimizer.base=adamw"], id=f"{path.stem}-adamw"))
    return cases


def _build(make_cfg: Callable, option: str, overrides: list[str]):
    cfg = validate(make_cfg([
        f"optimizer={option}", "optimizer.lr=0.01", "model=mlp", "model.params.hidden=16",
        "data.batch_size=16", *overrides,
    ]))
    torch.manual_seed(cfg.seed)
    data, model, optimizer = build_parts(cfg, CPU)
    batches = []
    for inputs, targets in data.train:
        batches.append((inputs, targets))
        if len(batches) == WARMUP + 2:
            break
    return cfg, model.train(), optimizer, batches


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch) -> None:
    train_step(model, optimizer, lambda o, t: F.cross_entropy(o.float(), t), *batch)


def _generators(obj: object, seen: set[int] | None = None) -> list[torch.Generator]:
    """Every torch.Generator held in the optimizer's attributes (and dicts/lists in them)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Generator):
        return [obj]
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif isinstance(obj, torch.optim.Optimizer) or type(obj).__module__.startswith("zsharp_sweeps"):
        children = list(vars(obj).values())
    else:
        return []
    return [g for child in children for g in _generators(child, seen)]


@pytest.mark.parametrize(("option", "overrides"), _cases())
def test_state_tensors_keep_their_addresses_across_steps(
    make_cfg: Callable, option: str, overrides: list[str]
) -> None:
    cfg, model, optimizer, batches = _build(make_cfg, option, overrides)
    for batch in batches[:WARMUP]:
        _step(model, optimizer, batch)
    before = state_addresses(optimizer)
    walked = {id(t) for t in state_tensors(optimizer).values()}

    # The walk is not vacuous: it holds every tensor of every state dict (the wrapper's and
    # the base optimizer's), and the buffers each kind of optimizer must have.
    for opt in _optimizers(optimizer):
        for per_param in opt.state.values():
            for value in per_param.values():
                if isinstance(value, torch.Tensor):
                    assert id(value) in walked
    params = list(model.parameters())
    base = optimizer.base_optimizer if is_sam_family(optimizer) else optimizer
    assert len(base.state) == len(params)  # momentum / moments for every parameter
    if is_sam_family(optimizer):
        assert sum("._backup[" in path for path in before) == len(params)
    if isinstance(optimizer, FriendlySAM):
        assert sum(path.endswith("['momentum']") for path in before) == len(params)
    if cfg.optimizer.name in ("sam_magnitude", "sam_direction"):
        assert any(path.endswith("._first_norm") for path in before)

    for batch in batches[WARMUP:]:
        _step(model, optimizer, batch)
        after = state_addresses(optimizer)
        moved = sorted(p for p in before.keys() & after.keys() if before[p] != after[p])
        assert not moved, f"state tensors rebound (a CUDA graph would read stale ones): {moved}"
        assert after.keys() == before.keys(), sorted(after.keys() ^ before.keys())

    # Random draws come from generators that a graph registers (else replays repeat them).
    declared = optimizer.graph_generators() if is_sam_family(optimizer) else []
    held = _generators(optimizer)
    assert all(any(g is d for d in declared) for g in held), "undeclared generator"
    assert bool(held) == (cfg.optimizer.name == "zsharp" and cfg.optimizer.filter == "random")


class _RebindingFSAM(FriendlySAM):
    """Friendly-SAM as it was before the fix: a new momentum tensor stored every step."""

    def _commit(self) -> None:
        for p, m in [*self._pending_new, *zip(*self._pending_update, strict=True)]:
            self.state[p]["momentum"] = m
        self._pending_new, self._pending_update = [], ([], [])


def test_the_check_catches_the_old_fsam_bug(make_cfg: Callable) -> None:
    _, model, optimizer, batches = _build(make_cfg, "fsam", [])
    old = _RebindingFSAM(model.named_parameters(), torch.optim.SGD, lr=0.01, momentum=0.9)
    for batch in batches[:WARMUP]:
        _step(model, old, batch)
    before = state_addresses(old)
    _step(model, old, batches[WARMUP])
    after = state_addresses(old)
    moved = [p for p in before if before[p] != after[p]]
    assert moved and all(p.endswith("['momentum']") for p in moved)


def test_optimizer_yamls_are_found() -> None:
    assert {p.stem for p in YAMLS} >= {"sgd", "adam", "adamw", "sam", "fsam", "zsharp"}
