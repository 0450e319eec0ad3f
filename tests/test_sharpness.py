"""Tests for zsharp_sweeps.metrics.sharpness.

Exact quadratics (known Hessian) pin the numbers; a tiny CNN with BatchNorm and dropout pins the
promise that measuring leaves the model exactly as it was found.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from zsharp_sweeps.metrics import (
    compute_sharpness,
    hessian_top_eigenvalue,
    hessian_trace,
    sam_sharpness,
)

DTYPE = torch.float64


# --------------------------------------------------------------------------- exact quadratics


class Quadratic(nn.Module):
    """A model whose output is its parameter vector w, so loss 0.5 w^T A w has Hessian A."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, inputs: Tensor) -> Tensor:
        return self.w


def quadratic_loss(a: Tensor):
    """loss(w, _) = 0.5 w^T A w, whatever the targets."""

    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * outputs @ a @ outputs

    return loss_fn


def spd_matrix(eigenvalues: list[float], seed: int = 0) -> Tensor:
    """Q diag(eigenvalues) Q^T with a random orthogonal Q: a dense SPD matrix of known spectrum."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=DTYPE))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=DTYPE)) @ q.T
    return 0.5 * (a + a.T)


EIGS = [5.0, 2.5, 1.5, 1.0, 0.5, 0.2]
DUMMY_BATCHES = [(torch.zeros(1, dtype=DTYPE), torch.zeros(1, dtype=DTYPE))] * 2


@pytest.fixture
def quadratic() -> tuple[Quadratic, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return Quadratic(torch.randn(len(EIGS), generator=gen, dtype=DTYPE)), spd_matrix(EIGS)


def test_top_eigenvalue_matches_eigvalsh_on_quadratic(quadratic: tuple[Quadratic, Tensor]) -> None:
    model, a = quadratic
    expected = torch.linalg.eigvalsh(a).max().item()
    got = hessian_top_eigenvalue(model, quadratic_loss(a), DUMMY_BATCHES, iters=200, tol=1e-6)
    assert got == pytest.approx(expected, rel=1e-3)


def test_top_eigenvalue_stops_at_iters_and_obeys_tol(quadratic: tuple[Quadratic, Tensor]) -> None:
    model, a = quadratic
    loss = quadratic_loss(a)
    one = hessian_top_eigenvalue(model, loss, DUMMY_BATCHES, iters=1)
    # One iteration is the Rayleigh quotient of the (normalised) random start: below lambda_max.
    assert 0 < one < max(EIGS) * (1 - 1e-3)
    loose = hessian_top_eigenvalue(model, loss, DUMMY_BATCHES, iters=500, tol=1e-2)
    tight = hessian_top_eigenvalue(model, loss, DUMMY_BATCHES, iters=500, tol=1e-9)
    assert abs(tight - max(EIGS)) < abs(loose - max(EIGS))
    assert tight == pytest.approx(max(EIGS), rel=1e-6)


def test_trace_matches_on_dense_quadratic(quadratic: tuple[Quadratic, Tensor]) -> None:
    model, a = quadratic
    got = hessian_trace(model, quadratic_loss(a), DUMMY_BATCHES, samples=2000, seed=3)
    # Standard error sqrt(2 sum_{i!=j} A_ij^2 / S) is about 1 % of tr(A) here.
    assert got == pytest.approx(torch.trace(a).item(), rel=0.04)


def test_trace_is_exact_for_diagonal_hessian() -> None:
    # Rademacher v gives v^T D v = tr(D) for every draw: zero variance.
    d = torch.tensor(EIGS, dtype=DTYPE)
    model = Quadratic(torch.ones(len(EIGS), dtype=DTYPE))
    got = hessian_trace(model, quadratic_loss(torch.diag(d)), DUMMY_BATCHES[:1], samples=3)
    assert got == pytest.approx(d.sum().item(), rel=1e-12)


def test_trace_is_reproducible_by_seed(quadratic: tuple[Quadratic, Tensor]) -> None:
    model, a = quadratic
    loss = quadratic_loss(a)
    first = hessian_trace(model, loss, DUMMY_BATCHES, samples=5, seed=7)
    assert hessian_trace(model, loss, DUMMY_BATCHES, samples=5, seed=7) == first
    assert hessian_trace(model, loss, DUMMY_BATCHES, samples=5, seed=8) != first


def test_sam_sharpness_closed_form_on_quadratic(quadratic: tuple[Quadratic, Tensor]) -> None:
    model, a = quadratic
    rho = 0.3
    w = model.w.detach()
    g = a @ w
    e = rho * g / (g.norm() + 1e-12)
    # 0.5 (w+e)^T A (w+e) - 0.5 w^T A w = e^T A w + 0.5 e^T A e, exactly.
    expected = (e @ a @ w + 0.5 * e @ a @ e).item()
    got = sam_sharpness(model, quadratic_loss(a), DUMMY_BATCHES, rho)
    assert got == pytest.approx(expected, rel=1e-10)
    assert got == pytest.approx(rho * g.norm().item() + 0.5 * rho**2 * (g @ a @ g / g.norm() ** 2).item())


def test_sam_sharpness_zero_rho_and_zero_gradient() -> None:
    a = spd_matrix(EIGS)
    moved = Quadratic(torch.ones(len(EIGS), dtype=DTYPE))
    assert sam_sharpness(moved, quadratic_loss(a), DUMMY_BATCHES, 0.0) == 0.0
    at_minimum = Quadratic(torch.zeros(len(EIGS), dtype=DTYPE))  # g = 0: e = 0, no NaN
    assert sam_sharpness(at_minimum, quadratic_loss(a), DUMMY_BATCHES, 0.1) == 0.0


def regression_batches(n_batches: int, size: int = 16, dim: int = 5) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(size, dim, generator=gen, dtype=DTYPE) + torch.arange(dim, dtype=DTYPE),
            torch.randn(size, generator=gen, dtype=DTYPE),
        )
        for _ in range(n_batches)
    ]


def regression_model(dim: int = 5) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(dim, 1).to(DTYPE)


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    return ((outputs.squeeze(-1) - targets) ** 2).mean()


def regression_hessian(batches: list[tuple[Tensor, Tensor]], bias: bool = True) -> Tensor:
    """Average over batches of 2 X^T X / n, with a column of ones for the bias."""
    blocks = []
    for x, _ in batches:
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=DTYPE)], dim=1) if bias else x
        blocks.append(2 * xa.T @ xa / len(x))
    return torch.stack(blocks).mean(0)


@pytest.mark.parametrize("n_batches", [1, 3])  # 1: reused graph; 3: rebuilt per batch
def test_hessian_metrics_on_linear_regression(n_batches: int) -> None:
    batches = regression_batches(n_batches)
    model = regression_model()
    h = regression_hessian(batches)
    top = hessian_top_eigenvalue(model, mse, batches, iters=300, tol=1e-8)
    assert top == pytest.approx(torch.linalg.eigvalsh(h).max().item(), rel=1e-3)
    # Standard error sqrt(2 sum_{i!=j} H_ij^2 / S) is 3 % of tr(H) here; the seed fixes the draw.
    trace = hessian_trace(model, mse, batches, samples=1000, seed=1)
    assert trace == pytest.approx(torch.trace(h).item(), rel=0.05)


def test_frozen_parameters_are_constants() -> None:
    batches = regression_batches(2)
    model = regression_model()
    model.bias.requires_grad_(False)
    h = regression_hessian(batches, bias=False)
    top = hessian_top_eigenvalue(model, mse, batches, iters=300, tol=1e-8)
    assert top == pytest.approx(torch.linalg.eigvalsh(h).max().item(), rel=1e-3)
    assert model.bias.requires_grad is False


def test_sam_sharpness_averages_per_batch_closed_forms() -> None:
    batches = regression_batches(3)
    model = regression_model()
    rho = 0.05
    theta = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    expected = []
    for x, y in batches:
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=DTYPE)], dim=1)
        g = 2 * xa.T @ (xa @ theta - y) / len(x)  # global gradient over weight and bias
        h = 2 * xa.T @ xa / len(x)
        e = rho * g / (g.norm() + 1e-12)
        expected.append((g @ e + 0.5 * e @ h @ e).item())
    got = sam_sharpness(model, mse, batches, rho)
    assert got == pytest.approx(sum(expected) / len(expected), rel=1e-9)


# --------------------------------------------------------------------------- state restoration


class TinyCNN(nn.Module):
    """Conv-BN-ReLU-Dropout-Linear: the layers whose mode matters for measurement."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 3)
        self.unused = nn.Linear(2, 2)  # in the model but not in the graph: zero gradient

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.head(x.mean(dim=(2, 3)))


def cnn_setup() -> tuple[TinyCNN, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(0)
    model = TinyCNN()
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 3, 6, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen))
        for _ in range(2)
    ]
    model.train()
    for x, _ in batches:  # move the BN running stats away from their init
        model(x)
    model.drop.eval()  # a mixed state: eval() on the way in must not erase it on the way out
    model.head.bias.requires_grad_(False)
    model.conv.weight.grad = torch.full_like(model.conv.weight, 0.25)
    model.bn.weight.grad = torch.full_like(model.bn.weight, -1.0)
    return model, batches


RUNS = {
    "sam": lambda m, f, b: sam_sharpness(m, f, b, rho=0.05),
    "top_eig": lambda m, f, b: hessian_top_eigenvalue(m, f, b, iters=5),
    "trace": lambda m, f, b: hessian_trace(m, f, b, samples=3),
    "all": lambda m, f, b: compute_sharpness(
        m, f, b, sam_rho=0.05, top_eig=True, trace=True, eig_iters=5, trace_samples=3
    ),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_model_left_exactly_as_found(name: str) -> None:
    model, batches = cnn_setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}  # params and BN buffers
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    grad_values = {n: g.clone() for n, g in grads.items() if g is not None}

    seen_training: list[bool] = []
    for module in (model.bn, model.drop):
        module.register_forward_pre_hook(lambda m, _: seen_training.append(m.training))

    result = RUNS[name](model, nn.functional.cross_entropy, batches)

    assert seen_training and not any(seen_training)  # BN and dropout ran in eval mode
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # bit for bit, running stats included
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        assert p.grad is grads[n], n  # None stays None; existing grads are the same tensors
        if p.grad is not None:
            assert torch.equal(p.grad, grad_values[n]), n
    values = result.values() if isinstance(result, dict) else [result]
    assert all(torch.isfinite(torch.tensor(v)) for v in values)


def test_model_restored_when_measurement_fails() -> None:
    model, batches = cnn_setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    calls = 0

    def failing_loss(outputs: Tensor, targets: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 2:  # the forward at w + e, after the parameters were perturbed
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(outputs, targets)

    with pytest.raises(RuntimeError, match="boom"):
        sam_sharpness(model, failing_loss, batches, rho=1.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert {n: m.training for n, m in model.named_modules()} == modes


class CountingCNN(TinyCNN):
    """Writes a buffer on every forward, in eval mode too (as some caches and trackers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("name", list(RUNS))
def test_buffers_restored_even_if_written_in_eval_mode(name: str) -> None:
    _, batches = cnn_setup()
    model = CountingCNN()
    RUNS[name](model, nn.functional.cross_entropy, batches)
    assert model.calls.item() == 0


def test_measurement_ignores_dropout_and_batch_composition() -> None:
    # With dropout in train mode on entry, a measurement in train mode would draw new masks
    # on every call; eval mode makes repeated measurements identical.
    model, batches = cnn_setup()
    model.drop.train()
    first = sam_sharpness(model, nn.functional.cross_entropy, batches, rho=0.1)
    second = sam_sharpness(model, nn.functional.cross_entropy, batches, rho=0.1)
    assert first == second
    assert first > 0  # a first-order step up the gradient increases the loss


# --------------------------------------------------------------------------- compute_sharpness


def test_compute_sharpness_keys_and_values(quadratic: tuple[Quadratic, Tensor]) -> None:
    model, a = quadratic
    loss = quadratic_loss(a)
    assert compute_sharpness(model, loss, DUMMY_BATCHES) == {}
    only_sam = compute_sharpness(model, loss, DUMMY_BATCHES, sam_rho=0.1)
    assert only_sam == {"sharpness/sam": sam_sharpness(model, loss, DUMMY_BATCHES, 0.1)}
    both = compute_sharpness(
        model, loss, DUMMY_BATCHES, top_eig=True, trace=True, eig_iters=50, trace_samples=4
    )
    assert both == {
        "sharpness/hessian_top_eig": hessian_top_eigenvalue(model, loss, DUMMY_BATCHES, iters=50),
        "sharpness/hessian_trace": hessian_trace(model, loss, DUMMY_BATCHES, samples=4),
    }


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, f, b: sam_sharpness(m, f, b, rho=-0.1), "rho"),
        (lambda m, f, b: sam_sharpness(m, f, [], rho=0.1), "batches is empty"),
        (lambda m, f, b: hessian_top_eigenvalue(m, f, b, iters=0), "iters"),
        (lambda m, f, b: hessian_top_eigenvalue(m, f, b, tol=-1.0), "tol"),
        (lambda m, f, b: hessian_trace(m, f, b, samples=0), "samples"),
    ],
)
def test_invalid_arguments_are_refused(call, message: str) -> None:
    model = regression_model()
    with pytest.raises(ValueError, match=message):
        call(model, mse, regression_batches(1))


def test_model_without_trainable_parameters_is_refused() -> None:
    model = regression_model().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        hessian_trace(model, mse, regression_batches(1))
    assert not any(p.requires_grad for p in model.parameters())
    assert model.training
