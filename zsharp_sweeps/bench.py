"""``python -m zsharp_sweeps.bench``: what one training step costs, per optimizer, in one process.

Measures the *full* training step as the trainer runs it (batch from the device loader,
both passes, the optimizer), so the ZSharp/SAM and SAM/SGD ratios are the ones a sweep
pays. Prints a table and writes JSON. Modes:

- default: each optimizer in turn on the same model/data: ms per step, images/s, peak
  device memory, and the ratios against SAM and SGD measured in the same run;
- ``--concurrent 1,2,4,8``: k copies of the benchmark as separate processes on one device
  at the same time (the "several trials per GPU" question): aggregate images/s against k=1;
- ``--loader``: images/s the device loader produces, next to torch's DataLoader with workers;
- ``--sharpness``: what each sharpness metric costs at its default settings;
- ``--threshold``: what ZSharp's exact threshold costs on one 4096x4200 gradient (17.2M
  entries, past ``torch.quantile``'s 2^24 limit), per method.

The step is built by :func:`zsharp_sweeps.training.build.build_step`, like the trainer's:
``--label-smoothing``, ``--grad-clip`` and ``--bn-second-pass`` are the trainer's settings.

Example (H100): ``python -m zsharp_sweeps.bench --device cuda --model resnet56
--optimizers sgd,sam,zsharp --batch-size 128 --steps 100 --precision bf16 --channels-last``
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from zsharp_sweeps.config import (
    DataConfig,
    HardwareConfig,
    ModelConfig,
    TrainConfig,
    TrainerConfig,
    optimizer_from,
)
from zsharp_sweeps.graphs import CudaGraphStep
from zsharp_sweeps.training.build import TrainingStep, build_parts, build_step


@dataclass
class BenchSettings:
    device: str = "cpu"
    model: str = "resnet20"
    optimizers: tuple[str, ...] = ("sgd", "sam", "zsharp")
    batch_size: int = 128
    steps: int = 20
    warmup: int = 5
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cuda_graph: bool = False
    data: str = "cifar10"
    image_size: int | None = None
    seed: int = 0
    # The trainer's step settings (trainer.label_smoothing, trainer.grad_clip,
    # optimizer.bn_second_pass): they change what a step computes, so they are benchmarked.
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    bn_second_pass: str = "freeze"
    # ZSharp's optimizer.kernels for each zsharp row (several: one row each, "zsharp[fused]").
    zsharp_kernels: tuple[str, ...] = ("auto",)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def split_variant(name: str) -> tuple[str, str | None]:
    """``zsharp[fused]`` -> (``zsharp``, ``fused``); ``sam`` -> (``sam``, None)."""
    if name.endswith("]") and "[" in name:
        base, kernels = name[:-1].split("[", 1)
        return base, kernels
    return name, None


def variants(s: BenchSettings) -> list[str]:
    """The rows to measure: each optimizer, ZSharp once per ``zsharp_kernels`` value."""
    out = []
    for name in s.optimizers:
        if name == "zsharp" and len(s.zsharp_kernels) > 1:
            out += [f"zsharp[{k}]" for k in s.zsharp_kernels]
        else:
            out.append(name)
    return out


def bench_config(s: BenchSettings, optimizer_name: str) -> TrainConfig:
    """The trainer's config for these settings, on CIFAR-shaped synthetic data
    (``optimizer_name`` may name ZSharp's kernels: ``zsharp[fused]``)."""
    size = s.batch_size * max(s.steps + s.warmup, 8)
    optimizer_name, kernels = split_variant(optimizer_name)
    if kernels is None:
        kernels = s.zsharp_kernels[0] if optimizer_name == "zsharp" else "auto"
    return TrainConfig(
        data=DataConfig(name="synthetic", synthetic_like=s.data, synthetic_size=size + 64,
                        val_size=64, batch_size=s.batch_size, image_size=s.image_size),
        model=ModelConfig(name=s.model),
        # bn_second_pass and kernels for the optimizers that have them (optimizer_shared)
        optimizer=optimizer_from({"name": optimizer_name, "lr": 0.01},
                                 {"bn_second_pass": s.bn_second_pass, "kernels": kernels}),
        hardware=HardwareConfig(device=s.device, precision=s.precision,
                                channels_last=s.channels_last, compile=s.compile,
                                cuda_graph=s.cuda_graph),
        trainer=TrainerConfig(label_smoothing=s.label_smoothing, grad_clip=s.grad_clip),
        seed=s.seed,
    )


def _setup(s: BenchSettings, optimizer_name: str):
    """The trainer's parts (``build_parts``) for :func:`bench_config`."""
    torch.manual_seed(s.seed)
    cfg = bench_config(s, optimizer_name)
    data, model, optimizer = build_parts(cfg, torch.device(s.device))
    return cfg, data, model, optimizer


def _make_runner(s: BenchSettings, optimizer_name: str,
                 prepare: Callable[[torch.nn.Module, torch.optim.Optimizer], None] | None = None):
    """The trainer's step (``build_step``) for these settings, and a function running n steps
    on an endless stream of device batches. ``prepare`` may change the model and the
    optimizer before the step is built (scripts/profile_step_kernels.py's variants)."""
    cfg, data, model, optimizer = _setup(s, optimizer_name)
    if prepare is not None:
        prepare(model, optimizer)
    step: TrainingStep = build_step(cfg, model, optimizer)

    def batches():
        while True:
            yield from data.train

    stream = batches()

    def run(n: int) -> None:
        for _ in range(n):
            step(*next(stream))

    return torch.device(s.device), model, step, run


def ms_per_step(run: Callable[[int], None], device: torch.device, steps: int,
                warmup: int = 0) -> float:
    """Wall ms per step of ``run(steps)`` after ``run(warmup)`` untimed, the device synced
    before and after (peak-memory statistics restart after the warm-up)."""
    run(warmup)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run(steps)
    _sync(device)
    return 1000 * (time.perf_counter() - start) / steps


def measure_optimizer(s: BenchSettings, optimizer_name: str) -> dict[str, Any]:
    """Wall time of ``steps`` full training steps after ``warmup`` untimed ones."""
    device, model, step, run = _make_runner(s, optimizer_name)
    ms = ms_per_step(run, device, s.steps, max(s.warmup, 5 if s.cuda_graph else 0))
    row = {
        "mode": mode_name(s),
        "optimizer": optimizer_name,
        "ms_per_step": ms,
        "images_per_s": 1000 * s.batch_size / ms,
        "peak_mem_mib": (torch.cuda.max_memory_allocated(device) / 2**20)
        if device.type == "cuda" else math.nan,
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    if isinstance(step.run, CudaGraphStep):
        graph = step.run
        row["graph"] = "eager-fallback" if graph.disabled else f"{graph.captures} capture(s)"
    return row


def mode_name(s: BenchSettings) -> str:
    parts = [s.precision] + [n for n, on in (("cl", s.channels_last), ("compile", s.compile),
                                             ("graph", s.cuda_graph)) if on]
    return "+".join(parts)


def parse_mode(text: str, device: str = "cpu", steps: int = 0) -> dict[str, Any]:
    """``bf16+cl+compile+graph`` -> BenchSettings fields; ``auto``: what ``hardware=auto``
    resolves to on ``device`` for a run of ``steps`` steps (training/hardware.py)."""
    if text == "auto":
        from zsharp_sweeps.training.hardware import auto_hardware, resolve

        res = resolve(auto_hardware(), torch.device(device), steps)
        return {"precision": res.precision, "channels_last": res.channels_last,
                "compile": res.compile, "cuda_graph": res.cuda_graph}
    parts = text.split("+")
    if parts[0] not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--modes: {text!r} must start with fp32, bf16 or fp16")
    unknown = set(parts[1:]) - {"cl", "compile", "graph"}
    if unknown:
        raise ValueError(f"--modes: unknown switch(es) {sorted(unknown)} in {text!r}; "
                         "allowed cl, compile, graph")
    return {"precision": parts[0], "channels_last": "cl" in parts,
            "compile": "compile" in parts, "cuda_graph": "graph" in parts}


def run_optimizers(s: BenchSettings) -> dict[str, Any]:
    rows = []
    for name in variants(s):
        try:
            rows.append(measure_optimizer(s, name))
        except Exception as exc:  # one broken variant must not hide the others' numbers
            rows.append({"mode": mode_name(s), "optimizer": name, "error": repr(exc)[:200]})
        if s.device.startswith("cuda"):
            torch.cuda.empty_cache()
    ok = [r for r in rows if "error" not in r]
    by_name = {r["optimizer"]: r for r in ok}
    ratios = {}
    if "sam" in by_name:
        for name in by_name:
            if split_variant(name)[0] in ("zsharp", "asam", "fsam", "sam_magnitude",
                                          "sam_direction"):
                ratios[f"{name}/sam"] = by_name[name]["ms_per_step"] / by_name["sam"]["ms_per_step"]
    if "sgd" in by_name:
        for name, row in by_name.items():
            if name != "sgd":
                ratios[f"{name}/sgd"] = row["ms_per_step"] / by_name["sgd"]["ms_per_step"]
    return {"rows": rows, "ratios": ratios, "mode": mode_name(s)}


# ----- several trials on one device ------------------------------------------------------
def _concurrent_worker(s: BenchSettings, optimizer_name: str, barrier, queue) -> None:
    torch.set_num_threads(1)
    device, _, _, run = _make_runner(s, optimizer_name)
    run(max(s.warmup, 5 if s.cuda_graph else 0))
    _sync(device)
    barrier.wait()
    start = time.time()
    run(s.steps)
    _sync(device)
    queue.put((start, time.time(), s.batch_size * s.steps))


def run_concurrent(s: BenchSettings, ks: Sequence[int], optimizer_name: str) -> list[dict[str, Any]]:
    """k independent training processes on one device at once: aggregate images/s."""
    ctx = mp.get_context("spawn")
    rows = []
    for k in ks:
        barrier, queue = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=_concurrent_worker, args=(s, optimizer_name, barrier, queue))
                 for _ in range(k)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=1800) for _ in procs]
        for p in procs:
            p.join()
        start = min(r[0] for r in results)
        end = max(r[1] for r in results)
        images = sum(r[2] for r in results)
        rows.append({"k": k, "mode": "processes",
                     "aggregate_images_per_s": images / (end - start)})
    base = rows[0]["aggregate_images_per_s"]
    for row in rows:
        row["speedup_vs_first"] = row["aggregate_images_per_s"] / base
    return rows


def run_streams(s: BenchSettings, ks: Sequence[int], optimizer_name: str) -> list[dict[str, Any]]:
    """k independent trainings in ONE process, each on its own CUDA stream.

    Separate processes on one GPU are time-sliced (no two run kernels at once without
    MPS); streams of one process do run concurrently, so k small models can fill the SMs
    that one leaves idle. Each trial keeps its own model, optimizer, data and CUDA graph.
    """
    rows = []
    for k in ks:
        streams = [torch.cuda.Stream() for _ in range(k)]
        runs = []
        for i in range(k):
            with torch.cuda.stream(streams[i]):
                _, _, _, run = _make_runner(replace(s, seed=s.seed + i), optimizer_name)
                run(max(s.warmup, 5 if s.cuda_graph else 0))
            runs.append(run)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(s.steps):
            for stream, run in zip(streams, runs):
                with torch.cuda.stream(stream):
                    run(1)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        rows.append({"k": k, "mode": "streams",
                     "aggregate_images_per_s": k * s.batch_size * s.steps / elapsed})
        del runs
        torch.cuda.empty_cache()
    base = rows[0]["aggregate_images_per_s"]
    for row in rows:
        row["speedup_vs_first"] = row["aggregate_images_per_s"] / base
    return rows


# ----- data loaders ----------------------------------------------------------------------
def run_loader(s: BenchSettings, workers: Sequence[int], epochs: int = 2) -> list[dict[str, Any]]:
    """Augmented training images/s from the device loader and from torch's DataLoader."""
    from zsharp_sweeps.data import build_data

    device = torch.device(s.device)
    size = 50_000 if device.type == "cuda" else 5_000
    rows = []
    variants = [("device", 0)] + [("torch", w) for w in workers]
    for loader, nw in variants:
        data = build_data(
            DataConfig(name="synthetic", synthetic_like=s.data, synthetic_size=size + 64,
                       val_size=64, batch_size=s.batch_size, loader=loader, num_workers=nw),
            device, s.seed,
        )
        for _ in data.train:  # warm-up epoch (workers start, kernels load)
            break
        _sync(device)
        start = time.perf_counter()
        images = 0
        for _ in range(epochs):
            for inputs, _targets in data.train:
                images += inputs.shape[0]
        _sync(device)
        rows.append({"loader": loader, "workers": nw,
                     "images_per_s": images / (time.perf_counter() - start)})
    return rows


# ----- sharpness -------------------------------------------------------------------------
def run_sharpness(
    s: BenchSettings, eig_iters: int | None = None, trace_samples: int | None = None
) -> list[dict[str, Any]]:
    """Seconds per call of each sharpness metric at the trainer's default settings
    (``conf/sharpness/default.yaml``), or with fewer power iterations / Hutchinson samples
    to measure the per-iteration cost on slow machines."""
    from zsharp_sweeps.config import SharpnessConfig
    from zsharp_sweeps.metrics.sharpness import hessian_top_eigenvalue, hessian_trace, sam_sharpness

    _, data, model, _ = _setup(s, "sgd")
    device = torch.device(s.device)
    cfg = SharpnessConfig()
    if eig_iters is not None:
        cfg = replace(cfg, eig_iters=eig_iters, eig_tol=0.0)
    if trace_samples is not None:
        cfg = replace(cfg, trace_samples=trace_samples)
    batches = data.fixed_batches(cfg.num_batches, cfg.batch_size)

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.float(), targets)

    calls = {
        "sharpness/sam": lambda: sam_sharpness(model, loss_fn, batches, cfg.rho),
        "sharpness/hessian_top_eig": lambda: hessian_top_eigenvalue(
            model, loss_fn, batches, iters=cfg.eig_iters, tol=cfg.eig_tol),
        "sharpness/hessian_trace": lambda: hessian_trace(
            model, loss_fn, batches, samples=cfg.trace_samples),
    }
    rows = []
    for name, call in calls.items():
        _sync(device)
        start = time.perf_counter()
        value = call()
        _sync(device)
        rows.append({"metric": name, "seconds": time.perf_counter() - start, "value": value,
                     "batches": f"{cfg.num_batches}x{cfg.batch_size}",
                     "eig_iters": cfg.eig_iters, "trace_samples": cfg.trace_samples})
    return rows


# ----- ZSharp's threshold ----------------------------------------------------------------
def run_threshold(
    s: BenchSettings, shape: tuple[int, int] = (4096, 4200), q: float = 0.95,
    methods: Sequence[str] = ("auto", "kthvalue", "radix"),
) -> list[dict[str, Any]]:
    """Seconds to find ZSharp's kept set in one ``shape`` gradient, per threshold method.

    The default is a 4096x4200 linear layer: 17.2M entries, past ``torch.quantile``'s 2^24
    limit (tests/test_optim_threshold.py pins that the result is exact; this is its cost).
    One untimed call per method first (kernel loading, allocator); then ``s.steps`` timed
    calls, best and mean reported.
    """
    from zsharp_sweeps.optim.threshold import resolve_method, zscore_masks

    device = torch.device(s.device)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(s.seed)).to(device)
    rows = []
    for method in methods:
        (mask,) = zscore_masks([g], q, method=method)
        _sync(device)
        times = []
        for _ in range(s.steps):
            start = time.perf_counter()
            (mask,) = zscore_masks([g], q, method=method)
            _sync(device)
            times.append(time.perf_counter() - start)
        rows.append({"shape": "x".join(map(str, shape)), "entries": g.numel(), "q": q,
                     "method": method, "resolved": resolve_method(method, device),
                     "best_s": min(times), "mean_s": sum(times) / len(times),
                     "kept": int(mask.sum())})
    return rows


# ----- cli -------------------------------------------------------------------------------
def _table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """Aligned plain text (or a markdown table), floats to 4 significant digits."""
    if not rows:
        return "(none)"
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(row.get(k)) for k in keys] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = [" ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True))]
    lines += [" ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def summary_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 23's table from ``--json`` files of step benchmarks: per model, mode and ZSharp
    variant, images/s of SGD, SAM and ZSharp, ZSharp/SAM, SAM/SGD and the fraction of the
    limit (SAM's step time over ZSharp's: 1.0 is ZSharp at SAM's cost)."""
    out = []
    for result in results:
        model = result["settings"]["model"]
        for run in result.get("runs", []):
            by = {r["optimizer"]: r for r in run["rows"] if "error" not in r}
            sgd, sam = by.get("sgd"), by.get("sam")
            for name, row in by.items():
                if split_variant(name)[0] != "zsharp":
                    continue
                line: dict[str, Any] = {"model": model, "mode": run["mode"], "zsharp": name}
                line["sgd_img_s"] = round(sgd["images_per_s"]) if sgd else None
                line["sam_img_s"] = round(sam["images_per_s"]) if sam else None
                line["zsharp_img_s"] = round(row["images_per_s"])
                if sam:
                    line["zsharp/sam"] = row["ms_per_step"] / sam["ms_per_step"]
                    line["of_limit"] = sam["ms_per_step"] / row["ms_per_step"]
                if sam and sgd:
                    line["sam/sgd"] = sam["ms_per_step"] / sgd["ms_per_step"]
                fallbacks = [n for n, r in by.items() if r.get("graph") == "eager-fallback"]
                if fallbacks:
                    line["note"] = "graph capture failed, eager: " + ",".join(fallbacks)
                out.append(line)
            for r in (r for r in run["rows"] if "error" in r):
                out.append({"model": model, "mode": run["mode"], "zsharp": r["optimizer"],
                            "error": r["error"][:80]})
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zsharp_sweeps.bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--optimizers", default="sgd,sam,zsharp",
                        help="comma-separated optimizer names (conf/optimizer)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default 128 on CUDA, 32 on CPU")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per optimizer (default 50 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 10 on CUDA, 1 on CPU)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture each whole training step in a CUDA graph")
    parser.add_argument("--modes", default=None,
                        help="several speed modes in one run, e.g. "
                             "fp32,bf16+cl,bf16+cl+graph,bf16+cl+compile+graph "
                             "(overrides --precision/--channels-last/--compile/--cuda-graph)")
    parser.add_argument("--data", default="cifar10", help="shape to imitate (synthetic data)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--concurrent", type=_ints, default=None,
                        help="k values, e.g. 1,2,4,8: k training processes at once")
    parser.add_argument("--concurrent-mode", choices=("processes", "streams"), default="processes",
                        help="--concurrent as k processes, or k CUDA streams in one process")
    parser.add_argument("--loader", action="store_true", help="benchmark the data loaders")
    parser.add_argument("--loader-workers", type=_ints, default=[2, 8])
    parser.add_argument("--sharpness", action="store_true", help="cost of sharpness metrics")
    parser.add_argument("--sharpness-eig-iters", type=int, default=None,
                        help="with --sharpness: run exactly this many power iterations")
    parser.add_argument("--sharpness-trace-samples", type=int, default=None,
                        help="with --sharpness: this many Hutchinson samples")
    parser.add_argument("--threshold", action="store_true",
                        help="cost of ZSharp's exact threshold on a 4096x4200 gradient")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="trainer.label_smoothing of the benchmarked step")
    parser.add_argument("--grad-clip", type=float, default=None,
                        help="trainer.grad_clip of the benchmarked step")
    parser.add_argument("--bn-second-pass", choices=("freeze", "update"), default="freeze",
                        help="optimizer.bn_second_pass of the benchmarked step")
    parser.add_argument("--zsharp-kernels", default="auto",
                        help="optimizer.kernels of the zsharp rows; several (triton,fused) "
                             "measure one row each, e.g. the earlier and the multi-tensor path")
    parser.add_argument("--table", nargs="+", metavar="JSON",
                        help="print issue 23's table (ZSharp/SAM, SAM/SGD, fraction of the "
                             "limit) from --json files of step benchmarks, and exit")
    parser.add_argument("--markdown", action="store_true", help="--table as a markdown table")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.table:
        results = []
        for path in args.table:
            with open(path) as handle:
                results.append(json.load(handle))
        print(_table(summary_rows(results), markdown=args.markdown))
        return 0
    on_gpu = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (128 if on_gpu else 32)
    args.steps = args.steps or (50 if on_gpu else 3)
    args.warmup = (10 if on_gpu else 1) if args.warmup is None else args.warmup
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch-size and --steps must be >= 1, --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    s = BenchSettings(
        device=args.device, model=args.model, optimizers=tuple(args.optimizers.split(",")),
        batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
        precision=args.precision, channels_last=args.channels_last, compile=args.compile,
        cuda_graph=args.cuda_graph, data=args.data, image_size=args.image_size,
        label_smoothing=args.label_smoothing, grad_clip=args.grad_clip,
        bn_second_pass=args.bn_second_pass,
        zsharp_kernels=tuple(args.zsharp_kernels.split(",")),
    )
    try:
        modes = [parse_mode(m, s.device, s.steps + s.warmup) for m in args.modes.split(",")] \
            if args.modes else None
        for name in variants(s):  # the trainer's range checks, before any work
            bench_config(s, name)
    except ValueError as exc:  # ConfigError names the setting and the allowed range
        parser.error(str(exc))
    env = {
        "torch": torch.__version__, "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name(s.device) if s.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    results: dict[str, Any] = {"settings": vars(s) | {"optimizers": list(s.optimizers)}, "env": env}
    print(f"# {s.model} batch {s.batch_size} {s.precision}"
          f"{' channels_last' if s.channels_last else ''}{' compile' if s.compile else ''}"
          f" on {env['device_name']} (torch {env['torch']})")
    if args.concurrent:
        if args.concurrent_mode == "streams":
            if not s.device.startswith("cuda"):
                parser.error("--concurrent-mode streams needs --device cuda")
            rows = run_streams(s, args.concurrent, s.optimizers[0])
        else:
            rows = run_concurrent(s, args.concurrent, s.optimizers[0])
        results["concurrent"] = rows
        print(_table(rows))
    elif args.loader:
        rows = run_loader(s, args.loader_workers)
        results["loader"] = rows
        print(_table(rows))
    elif args.threshold:
        rows = run_threshold(s)
        results["threshold"] = rows
        print(_table(rows))
    elif args.sharpness:
        rows = run_sharpness(s, args.sharpness_eig_iters, args.sharpness_trace_samples)
        results["sharpness"] = rows
        print(_table(rows))
    else:
        if any(m.get("compile") for m in modes or [vars(s)]):
            # The product's persistent compile cache (training/hardware.py): the first variant
            # compiles the model, the others (and a later run) reuse its kernels.
            from zsharp_sweeps.training.hardware import use_compile_cache

            use_compile_cache(None)
        runs = []
        results["runs"] = runs
        for mode in modes or [{}]:
            ms = replace(s, **mode)
            out = run_optimizers(ms)
            runs.append(out)
            print(_table(out["rows"]))
            if out["ratios"]:
                print(_table([{"mode": out["mode"],
                               **{k: round(v, 3) for k, v in out["ratios"].items()}}]))
            print(flush=True)
            if args.json:  # after each mode: a run stopped by a time limit keeps what it measured
                with open(args.json, "w") as handle:
                    json.dump(results, handle, indent=2, default=str)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
