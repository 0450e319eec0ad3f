"""Where a ZSharp training step's extra GPU time over SAM's goes, kernel by kernel.

Why: on ViT in a CUDA graph ZSharp cost 5-6 % more per step than SAM (issue 23), about
0.6 ms, while its filter moves only ~0.1 ms worth of memory. Guessing which kernels (or
which gaps between them) make the difference wastes GPU time, so this script measures it:
for each variant it builds the trainer's own step (``zsharp_sweeps.bench``), replays it
(captured in a CUDA graph when the mode says so) under ``torch.profiler`` and reads the
kernel timeline from the Chrome trace:

- ``wall``: ms per step without the profiler (what the benchmark measures);
- ``kernels``: the summed GPU time of all kernels per step (all streams);
- ``busy``: the union of the kernel intervals per step: ``wall - busy`` is time the GPU sat
  idle (launch gaps, waits between streams);
- then, per kernel name, ms and launches per step, and the difference against SAM.

    python scripts/profile_step_kernels.py --model vit --mode bf16+cl+graph \\
        --variants "sam;zsharp;zsharp:stats_streams=0;zsharp:early=off,priority=-1"
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from zsharp_sweeps.bench import BenchSettings, _make_runner, ms_per_step, parse_mode


def compile_blocks(model: nn.Module) -> int:
    """Regional compilation: ``torch.compile`` each block of the model's stacks of
    same-type blocks (ViT's encoder layers, a CIFAR ResNet's BasicBlocks), in place; returns
    how many. The experiment behind it: a whole-model compile hands every gradient over at
    the end of its backward pass, so ZSharp's statistics cannot overlap it (ViT
    compile+graph 1.050x SAM on an H100); compiled block by block, each block's gradients
    come as its backward ends and the gradient hooks can start the statistics there. Use it
    with a mode without ``compile`` (the trainer would compile the whole model too), e.g.
    ``--mode bf16+cl+graph --variants "sam:regional=on;zsharp:regional=on"``."""
    count = 0
    for stack in list(model.modules()):
        if not isinstance(stack, (nn.Sequential, nn.ModuleList)) or len(stack) < 2:
            continue
        kinds = {type(block) for block in stack}
        kind = next(iter(kinds))
        if len(kinds) == 1 and not issubclass(kind, (nn.Sequential, nn.ModuleList)) and any(
                True for _ in next(iter(stack)).children()):
            for block in stack:
                block.compile()
                count += 1
    # The blocks share one code object: each block (its own parameters, a stage's shapes)
    # is a recompile of it, and past Dynamo's limit (8) the rest would silently run eager.
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * count)
    return count


def _runner(s: BenchSettings, variant: str):
    """The trainer's step for ``variant`` (``name[:attr=value,...]``; ``early=off`` stops the
    gradient hooks from starting ZSharp's statistics, ``stats=off`` skips them altogether
    (timing only), ``priority=-1`` puts them on high-priority streams, ``regional=on``
    compiles block by block; any other key sets that optimizer attribute), as a function
    running n steps."""
    name, _, opts = variant.partition(":")

    def prepare(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for item in filter(None, opts.split(",")):
            key, value = item.split("=")
            if key == "regional":
                if value == "on":
                    compile_blocks(model)
            elif key == "early":
                if value == "off":
                    optimizer._stats_armed = lambda device: False
            elif key == "stats":
                # Timing only: no per-tensor mean()/std() at all (the filter reads whatever
                # the buffers hold), i.e. what the step would cost if the exact statistics
                # were free: the share of ZSharp's extra time that is theirs.
                if value == "off":
                    optimizer._stats_armed = lambda device: False
                    optimizer._early_stats.begin = lambda bufs, grads: 0
            elif key == "priority":  # ZSharp's statistics streams at this stream priority
                device = torch.device("cuda", torch.cuda.current_device())
                optimizer._streams[device] = [torch.cuda.Stream(device, priority=int(value))
                                              for _ in range(optimizer.stats_streams)]
            else:
                setattr(optimizer, key, type(getattr(optimizer, key))(value))

    return _make_runner(s, name, prepare)[3]


def _short(name: str) -> str:
    """A kernel name without templates and arguments, at most 70 characters."""
    name = re.sub(r"<.*>", "<>", name)
    name = re.sub(r"\(.*\)", "", name)
    return name[:70]


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -1.0
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1000.0  # trace times are microseconds


def measure(s: BenchSettings, variant: str, steps: int, profiled: int,
            trace_dir: str | None = None) -> dict[str, Any]:
    run = _runner(s, variant)
    wall = ms_per_step(run, torch.device(s.device), steps, warmup=8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(profiled)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            trace = json.load(handle)
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", variant)
        with gzip.open(os.path.join(trace_dir, f"{name}.json.gz"), "wt") as handle:
            json.dump({"traceEvents": [e for e in trace.get("traceEvents", [])
                                       if e.get("ph") == "X"]}, handle)
    kernels = [e for e in trace.get("traceEvents", [])
               if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
    per_name: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        per_name[_short(e["name"])].append(e["dur"])
    return {
        "variant": variant,
        "wall": wall,
        "kernels": sum(e["dur"] for e in kernels) / 1000.0 / profiled,
        "busy": _union_ms([(e["ts"], e["ts"] + e["dur"]) for e in kernels]) / profiled,
        "span": ((max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels))
                 / 1000.0 / profiled) if kernels else float("nan"),
        "by_name": {k: (sum(v) / 1000.0 / profiled, len(v) / profiled)
                    for k, v in per_name.items()},
    }


def report(rows: list[dict[str, Any]], top: int) -> None:
    print(f"{'variant':<40} {'wall ms':>8} {'kernels':>8} {'busy':>8} {'span':>8}")
    for r in rows:
        print(f"{r['variant']:<40} {r['wall']:8.3f} {r['kernels']:8.3f} {r['busy']:8.3f} "
              f"{r['span']:8.3f}")
    base = rows[0]
    for r in rows[1:]:
        names = set(r["by_name"]) | set(base["by_name"])
        diff = []
        for n in names:
            ms, count = r["by_name"].get(n, (0.0, 0.0))
            ms0, count0 = base["by_name"].get(n, (0.0, 0.0))
            diff.append((ms - ms0, ms, count, ms0, count0, n))
        diff.sort(key=lambda d: -abs(d[0]))
        print(f"\n-- {r['variant']} minus {base['variant']}: "
              f"wall {r['wall'] - base['wall']:+.3f} ms, kernels {r['kernels'] - base['kernels']:+.3f}, "
              f"busy {r['busy'] - base['busy']:+.3f}")
        print(f"{'delta ms':>9} {'ms':>8} {'n/step':>7} {'base ms':>8} {'n':>5}  kernel")
        for d, ms, count, ms0, count0, n in diff[:top]:
            print(f"{d:+9.4f} {ms:8.4f} {count:7.1f} {ms0:8.4f} {count0:5.1f}  {n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit")
    parser.add_argument("--mode", default="bf16+cl+graph")
    parser.add_argument("--variants", default="sam,zsharp")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--profiled", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace-dir", default=None,
                        help="also write each variant's Chrome trace here (gzipped)")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    s = BenchSettings(device="cuda", model=args.model, batch_size=args.batch_size, steps=1,
                      warmup=0)
    s = replace(s, **parse_mode(args.mode, "cuda", args.steps))
    print(f"== {args.model}, {args.mode}, batch {args.batch_size}, {torch.cuda.get_device_name()}")
    rows = []
    for v in args.variants.split(";" if ";" in args.variants else ","):
        rows.append(measure(s, v, args.steps, args.profiled, args.trace_dir))
        print(f"  {v}: {rows[-1]['wall']:.3f} ms per step", flush=True)  # a timeout keeps these
    report(rows, args.top)


if __name__ == "__main__":
    main()
