"""train_step: every optimizer, fp32/bf16/fp16, BatchNorm freezing and skipped fp16 steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from zsharp_sweeps.config import OPTIMIZER_SCHEMAS, optimizer_config
from zsharp_sweeps.optim import build_optimizer, is_sam_family, train_step

OPTIMIZERS = tuple(OPTIMIZER_SCHEMAS)

CE = nn.functional.cross_entropy
SAM_FAMILY = [n for n in OPTIMIZERS if n not in ("sgd", "adam", "adamw")]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 4),
    ).train()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 4, (8,), generator=gen)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_train_step_runs_for_every_optimizer(name: str, amp: torch.dtype | None) -> None:
    model, (x, y) = _net(), _batch()
    opt = build_optimizer(optimizer_config(name=name, lr=0.01), model)
    assert is_sam_family(opt) == (name in SAM_FAMILY)
    before = _weights(model)
    loss, logits = train_step(model, opt, CE, x, y, amp_dtype=amp)
    assert logits.shape == (8, 4) and not logits.requires_grad
    assert torch.isfinite(loss) and loss.item() == pytest.approx(CE(logits.float(), y).item(), rel=2e-2)
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    assert all(changed)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("freeze", [True, False])
def test_second_pass_bn_statistics(freeze: bool) -> None:
    model, (x, y) = _net(), _batch()
    one_pass = copy.deepcopy(model)
    one_pass(x)  # what the first pass alone does to the statistics
    opt = build_optimizer(optimizer_config(name="zsharp", lr=0.01), model)
    train_step(model, opt, CE, x, y, freeze_bn_second_pass=freeze)
    bn, ref = model[1], one_pass[1]
    assert bn.track_running_stats  # restored after the second pass
    if freeze:
        assert torch.equal(bn.running_mean, ref.running_mean)
        assert torch.equal(bn.running_var, ref.running_var)
        assert int(bn.num_batches_tracked) == 1
    else:  # the official ZSharp code: both passes update the statistics
        assert not torch.equal(bn.running_mean, ref.running_mean)
        assert int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize(
    ("name", "bad_pass"),
    [("sgd", 1)] + [(n, k) for n in ("sam", "fsam", "zsharp", "sam_magnitude") for k in (1, 2)],
)
def test_fp16_overflow_skips_the_step_and_keeps_weights_exact(name: str, bad_pass: int) -> None:
    """An inf/NaN in either pass: no step, weights and optimizer state exactly as before."""
    model, (x, y) = _net(), _batch()
    opt = build_optimizer(optimizer_config(name=name, lr=0.05), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    train_step(model, opt, CE, x, y, amp_dtype=torch.float16, scaler=scaler)  # a normal step
    weights, opt_state = _weights(model), copy.deepcopy(opt.state_dict())
    calls = []

    def overflowing(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        loss = CE(logits, targets)
        return loss * float("inf") if len(calls) == bad_pass else loss

    train_step(model, opt, overflowing, x, y, amp_dtype=torch.float16, scaler=scaler)
    assert len(calls) == (1 if name == "sgd" else 2)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    after = opt.state_dict()
    base_before = opt_state.get("base_optimizer", opt_state)["state"]
    base_after = after.get("base_optimizer", after)["state"]
    for k, v in base_before.items():  # SGD momentum buffers untouched
        assert torch.equal(v["momentum_buffer"], base_after[k]["momentum_buffer"])
    if name == "fsam":
        for k, v in opt_state["state"].items():
            assert torch.equal(v["momentum"], after["state"][k]["momentum"])
    assert scaler.get_scale() == 512.0  # backed off
    # And training goes on normally afterwards.
    train_step(model, opt, CE, x, y, amp_dtype=torch.float16, scaler=scaler)
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


@pytest.mark.parametrize("name", SAM_FAMILY)
def test_steady_state_step_never_reads_tensors_on_the_host(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy for "no host synchronisation": after the first step (which builds cached
    layouts), a full SAM-family step must not read a tensor's value on the host (item, tolist,
    bool, float, int, nonzero, or a copy to the CPU)."""
    model, (x, y) = _net(), _batch()
    opt = build_optimizer(optimizer_config(name=name, lr=0.01), model)
    if hasattr(opt, "threshold_method"):
        opt.threshold_method = "radix"  # what accelerators use (auto picks it off the CPU)
    train_step(model, opt, CE, x, y)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("host read of a tensor value inside the step")

    for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "cpu"):
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    train_step(model, opt, CE, x, y)


def test_grad_clip_bounds_the_descent_gradient() -> None:
    model, (x, y) = _net(), _batch()
    opt = build_optimizer(optimizer_config(name="sam", lr=1.0, momentum=0.0, weight_decay=0.0), model)
    before = _weights(model)
    train_step(model, opt, CE, x, y, grad_clip=1e-3)
    moved = torch.cat([(p - b).reshape(-1) for p, b in zip(model.parameters(), before, strict=True)])
    assert moved.norm().item() <= 1e-3 * (1 + 1e-4)


# optim/step.py reads GradScaler internals (``_per_optimizer_states[id(opt)]
# ["found_inf_per_device"]``, ``_scale``) and calls ``torch._amp_foreach_non_finite_check_and_
# unscale_`` to unscale SAM's second pass into the first pass's found-inf record. That was
# checked against torch/amp/grad_scaler.py of 2.14 and run (the fp16 tests above) on 2.14.1
# (CPU) and 2.11.0 (the GPU image, run on an H200); the names are those of torch.amp.GradScaler
# since 2.3.
# The range is pyproject's pin: widen both only after re-checking.
GRADSCALER_CHECKED = ((2, 4), (2, 15))  # lower bound included, upper excluded


def test_torch_is_inside_the_range_where_the_gradscaler_internals_were_checked() -> None:
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    low, high = GRADSCALER_CHECKED
    assert low <= version < high, (
        f"torch {torch.__version__} is outside {low[0]}.{low[1]} <= torch < {high[0]}.{high[1]}, "
        "where zsharp_sweeps/optim/step.py's use of GradScaler internals was checked. Re-check "
        "in torch/amp/grad_scaler.py that unscale_() still records found-inf in "
        "_per_optimizer_states[id(optimizer)]['found_inf_per_device'] (one tensor per device), "
        "that step() skips on that record, that _scale holds the scale, and that "
        "torch._amp_foreach_non_finite_check_and_unscale_ has the same signature; run "
        "`pytest tests/test_optim_step.py -k fp16`; then widen GRADSCALER_CHECKED and "
        "pyproject's torch pin together."
    )


def test_the_gradscaler_internals_step_py_reads_exist() -> None:
    model, (x, y) = _net(), _batch()
    opt = build_optimizer(optimizer_config(name="sgd", lr=0.01), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(CE(model(x), y)).backward()
    scaler.unscale_(opt)
    record = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
    assert set(record) == {torch.device("cpu")} and record[torch.device("cpu")].item() == 0.0
    assert torch.equal(scaler._scale, torch.tensor(8.0))
