"""Where an eager (no CUDA graph) training step spends its host time, per optimizer.

Why: in issue 23's table eager fp32 ZSharp on ResNet-56 cost 1.36x SAM while its extra GPU
work is a few milliseconds at most; an eager step at batch 128 is bound by the host (Python
and kernel launches), so the answer is in the host-side profile: which ops, how many kernel
launches, and whether anything waits for the GPU (a host sync) in the middle of a step.

    python scripts/profile_eager_step.py --model resnet56 --optimizers sam,zsharp[triton],zsharp[fused]

Prints, per optimizer: host ms per step, kernel launches per step, host syncs per step, and
the ops with the most host time. Needs CUDA (torch.profiler with CUDA activity).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zsharp_sweeps.bench import BenchSettings, _make_runner, ms_per_step  # noqa: E402

SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "aten::_local_scalar_dense", "cudaMemcpy ")


def profile(model: str, name: str, steps: int, top: int) -> None:
    s = BenchSettings(device="cuda", model=model, optimizers=(name,), batch_size=128,
                      steps=steps, warmup=5)
    device, _, _, run = _make_runner(s, name)
    wall = ms_per_step(run, device, steps, warmup=5)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        run(steps)
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                         "cudaLaunchKernelExC", "cuLaunchKernelEx"))
    syncs = {e.key: e.count for e in events if any(e.key.startswith(n) for n in SYNC_NAMES)}
    print(f"## {model} {name}: {wall:.2f} ms per step (unprofiled), "
          f"{launches / steps:.0f} kernel launches per step, host syncs per step: "
          f"{ {k: v / steps for k, v in syncs.items()} or 'none'}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=50))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--optimizers", default="sam,zsharp[triton],zsharp[fused]")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    for name in args.optimizers.split(","):
        profile(args.model, name, args.steps, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
