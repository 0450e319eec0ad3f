"""On a GPU: ZSharp's multi-tensor filter (``optimizer.kernels=fused``, the CUDA default since
issue 23) keeps exactly the entries the official rule keeps, like the earlier paths, on large
random tensors and on real ResNet-56 and ViT gradients, eagerly, without host syncs, and in a
CUDA graph whose capture starts the statistics from gradient hooks.

    python scripts/check_zsharp_kernels.py [--quick]

Prints one line per check and a last line ``all checks passed`` (exit 0) or the failures
(exit 1). Needs torch with CUDA and Triton, and omegaconf + PyYAML (the models' configs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zsharp_sweeps.optim import ZSharp, multitensor  # noqa: E402
from zsharp_sweeps.optim.threshold import SegmentLayout, zscore_masks  # noqa: E402

FAILURES: list[str] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILURES.append(name)


def official(g: torch.Tensor, q: float) -> torch.Tensor:
    """``|z| > torch.quantile(|z|, q)`` as the official code computes it (CUDA's quantile
    takes at most 2^24 entries: beyond that, the radix select pinned equal to it on the CPU)."""
    if g.numel() > 2**24:
        return zscore_masks([g], q, method="radix")[0]
    z = (g - g.mean()) / (g.std() + 1e-12)
    return z.abs() > torch.quantile(z.abs().reshape(-1), q)


def fused_masks(grads: list[torch.Tensor], q: float) -> list[torch.Tensor]:
    layout = SegmentLayout.build([g.numel() for g in grads], torch.float32, grads[0].device)
    bufs = multitensor.FilterBuffers.build(layout, [torch.empty(0)] * len(grads), q)
    for i, g in enumerate(grads):
        multitensor.launch_stats(g, bufs.mean_slots[i], bufs.std_slots[i], None)
    packed, orders = multitensor.pack(layout, grads)
    absz, tau = multitensor.select_threshold(packed, bufs)
    ok = torch.isfinite(bufs.means) & torch.isfinite(bufs.stds)
    keep = (absz.view(torch.float32) > layout.per_chunk(tau)) & layout.per_chunk(ok)
    return multitensor.unpack_like(keep, layout, grads, orders)  # memory order: g's strides


DEVICE = "cuda"


def random_tensors(quick: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 3, 3, 3), (384, 1536), (7, 5), (1, 65, 384), (1,), (2, 2), (10, 640)]
    grads = [torch.randn(s, generator=gen) * 10 ** float(torch.randn(1, generator=gen))
             for s in shapes]
    grads.append((torch.randn(300, 200, generator=gen) * 3).round())  # heavy ties
    grads.append(torch.full((5, 5), 0.25))  # constant
    if not quick:
        grads.append(torch.randn(1000, 1000, generator=gen))
        grads.append(torch.randn(4096, 4200, generator=gen))  # 17.2M: past quantile's limit
    grads = [g.to(DEVICE) for g in grads]
    for q in (0.0, 0.5, 0.95, 0.999):
        got = fused_masks(grads, q)
        bad = [tuple(g.shape) for g, m in zip(grads, got, strict=True)
               if not torch.equal(m, official(g, q))]
        report(f"random tensors, Q_p={q}: kept sets equal the official rule's", not bad,
               f"{len(grads)} tensors, up to {max(g.numel() for g in grads):,} entries"
               + (f"; differ: {bad}" if bad else ""))


def model_gradients(model_name: str):
    from zsharp_sweeps.bench import BenchSettings, _setup

    s = BenchSettings(device=DEVICE, model=model_name, optimizers=("zsharp",), batch_size=128,
                      steps=2, warmup=1, precision="bf16", channels_last=True)
    _, data, model, _ = _setup(s, "sgd")
    x, y = next(iter(data.train))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    return model


def perturbations(model: torch.nn.Module, kernels: str) -> list[torch.Tensor]:
    opt = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, kernels=kernels)
    if DEVICE != "cuda" and kernels == "triton":  # the earlier path: CUDA only
        kernels = "torch"
    opt.kernels = kernels
    return [e.clone() for e in opt._perturbation(opt._with_grads())]


def real_gradients(model_name: str) -> None:
    model = model_gradients(model_name)
    filtered = [p.grad for p in model.parameters() if p.grad is not None and p.grad.ndim > 1]
    got = fused_masks(filtered, 0.95)
    bad = sum(not torch.equal(m, official(g, 0.95)) for g, m in zip(filtered, got, strict=True))
    report(f"{model_name} gradients: kept sets equal the official rule's", bad == 0,
           f"{len(filtered)} filtered tensors, {sum(g.numel() for g in filtered):,} entries"
           + (f", {bad} differ" if bad else ""))
    es = {k: perturbations(model, k) for k in ("torch", "triton", "fused")}
    for other in ("triton", "fused"):
        same_kept = all(torch.equal(a != 0, b != 0) for a, b in zip(es[other], es["torch"],
                                                                   strict=True))
        rel = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                  for a, b in zip(es[other], es["torch"], strict=True))
        report(f"{model_name}: kernels={other} e vs kernels=torch", same_kept and rel < 1e-5,
               f"same kept entries: {same_kept}, max relative difference {rel:.2e}")


def no_host_sync(model_name: str) -> None:
    model = model_gradients(model_name)
    opt = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1, kernels="fused")
    opt.first_step()  # builds layouts and constants (probes quantile once: syncs)
    opt.restore()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.first_step()
        opt.restore()
        ok, detail = True, "first_step queued without reading the device"
    except RuntimeError as exc:
        ok, detail = False, str(exc)[:200]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    report(f"{model_name}: the fused step never waits for the GPU", ok, detail)


def train(model_name: str, kernels: str, graph: bool, steps: int = 8):
    from zsharp_sweeps.bench import BenchSettings, _setup
    from zsharp_sweeps.training.build import build_step

    s = BenchSettings(device="cuda", model=model_name, optimizers=("zsharp",), batch_size=128,
                      steps=steps, warmup=1, precision="bf16", channels_last=True,
                      cuda_graph=graph, zsharp_kernels=(kernels,))
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    cfg, data, model, opt = _setup(s, "zsharp")
    step = build_step(cfg, model, opt)
    batches = iter(data.train)
    for _ in range(steps):
        step(*next(batches))
    torch.cuda.synchronize()
    return [p.detach().clone() for p in model.parameters()], opt


def graph_with_hooks(model_name: str) -> None:
    eager, _ = train(model_name, "fused", graph=False)
    graphed, opt = train(model_name, "fused", graph=True)
    k = sum(len(b.params) for b in opt._buffers.values())
    report(f"{model_name}: a captured step took its statistics from gradient hooks",
           opt._early_stats.reused == k, f"{opt._early_stats.reused} of {k} at capture")
    diff = max(float((a - b).abs().max()) for a, b in zip(eager, graphed, strict=True))
    if model_name == "vit":  # flash attention's backward accumulates with atomics: not bitwise
        report(f"{model_name}: 8 steps in a CUDA graph (hooks) vs 8 eager steps", True,
               f"max |weight difference| {diff:.2e} (informational: SDPA's backward is not "
               "deterministic)")
        return
    report(f"{model_name}: 8 steps in a CUDA graph (hooks) equal 8 eager steps bit for bit",
           diff == 0, f"max |weight difference| {diff:.2e}")


def main() -> int:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the 1M- and 17.2M-entry tensors")
    parser.add_argument("--models", default="resnet56,vit")
    parser.add_argument("--device", default="cuda",
                        help="cpu: a smoke test of this script under TRITON_INTERPRET=1 (no "
                             "sync or graph checks)")
    args = parser.parse_args()
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    start = time.perf_counter()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(f"# ZSharp kernels on {name} (torch {torch.__version__})")
    random_tensors(args.quick)
    for model in args.models.split(","):
        real_gradients(model)
        if DEVICE == "cuda":
            no_host_sync(model)
            graph_with_hooks(model)
    print(f"{'all checks passed' if not FAILURES else 'FAILED: ' + '; '.join(FAILURES)} "
          f"({time.perf_counter() - start:.0f} s)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
