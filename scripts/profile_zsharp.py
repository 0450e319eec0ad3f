"""Where ZSharp's extra time over SAM goes, stage by stage, on a real model's gradients.

Why: the ZSharp/SAM step ratio (issue 8) is decided by a few dozen small kernels; guessing
which ones matter wastes GPU time. Each stage below is captured in its own CUDA graph (as the
trainer replays the whole step) and timed over many replays, so launch overhead is gone and
what remains is GPU time, comparable with the step times of ``zsharp_sweeps.bench``.

    python scripts/profile_zsharp.py --device cuda --models resnet56,vit
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from zsharp_sweeps.bench import BenchSettings, _setup
from zsharp_sweeps.optim.threshold import (
    SegmentLayout,
    abs_zscores,
    quantile_threshold,
    sort_chunks,
)


def graph_ms(fn, replays: int) -> float:
    """Mean GPU time of ``fn`` captured once in a CUDA graph and replayed (CPU: plain calls)."""
    if not torch.cuda.is_available():
        fn()
        start = time.perf_counter()
        for _ in range(replays):
            fn()
        return 1000 * (time.perf_counter() - start) / replays
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / replays


def profile(model_name: str, replays: int, device: str) -> None:
    s = BenchSettings(device=device, model=model_name, precision="bf16", channels_last=True,
                      cuda_graph=True, batch_size=128, steps=1, warmup=0)
    _, data, model, _, zsharp = _setup(s, "zsharp")
    _, _, _, _, sam = _setup(s, "sam")
    inputs, targets = next(iter(data.train))
    inputs = inputs.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(inputs).float(), targets)
    loss.backward()
    # SAM's optimizer holds a different model: give it the same gradients' shapes and values.
    zs_groups = zsharp._with_grads()
    sam_params = [p for g in sam.param_groups for p in g["params"]]
    zs_params = [p for g in zsharp.param_groups for p in g["params"]]
    for ps, pz in zip(sam_params, zs_params, strict=True):
        ps.grad = pz.grad.clone() if pz.grad is not None else None
    sam_groups = sam._with_grads()

    items = [(p, g) for g, ps in zs_groups for p in ps if p.grad.ndim > 1]
    grads = [p.grad for p, _ in items]
    layout = zsharp._layout([g.numel() for g in grads], torch.float32, grads[0].device)
    q = zs_groups[0][0]["percentile"]

    def pack():
        return layout.pack(grads)

    def stats():
        torch.stack([g.mean() for g in grads])
        torch.stack([g.std() for g in grads])

    side = [torch.cuda.Stream() for _ in range(4)] if device == "cuda" else []

    def stats_streams():
        if not side:
            return stats()
        main = torch.cuda.current_stream()
        outs = []
        for i, stream in enumerate(side):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append([(g.mean(), g.std()) for g in grads[i :: len(side)]])
        for stream in side:
            main.wait_stream(stream)

    def zscores():
        return abs_zscores(grads, layout.pack(grads), layout)

    def zscores_sort():
        absz, _ = zscores()
        sort_chunks(absz.view(layout.int_dtype))

    def threshold():
        absz, has_nan = zscores()
        return quantile_threshold(absz, has_nan, layout, q, "radix" if side else "kthvalue")

    n_filtered = sum(g.numel() for g in grads)
    print(f"\n== {model_name}: {len(grads)} filtered tensors, {n_filtered:,} entries "
          f"({layout.num_chunks} chunks); {sum(1 for _, ps in zs_groups for p in ps) - len(grads)} "
          "unfiltered")
    rows = [
        ("SAM perturbation", lambda: sam._perturbation(sam_groups)),
        ("ZSharp perturbation", lambda: zsharp._perturbation(zs_groups)),
        ("  pack", pack),
        ("  per-tensor mean+std", stats),
        ("  per-tensor mean+std, 4 streams", stats_streams),
        ("  pack + |z|", zscores),
        ("  pack + |z| + row sort", zscores_sort),
        ("  pack + |z| + threshold", threshold),
    ]
    import zsharp_sweeps.optim.zsharp as zsharp_module

    def perturbation_variant(streams: int, chunk: int, kernels: str):
        configured = []

        def run():
            if not configured:  # once, in graph_ms's eager warm-up (layouts sync the host)
                zsharp.stats_streams = streams
                zsharp.kernels = kernels
                zsharp_module.CHUNK = chunk
                zsharp._layouts.clear()
                zsharp._streams.clear()
                configured.append(True)
            return zsharp._perturbation(zs_groups)
        return run

    variants = [(0, 1024, "torch"), (4, 1024, "torch"), (8, 4096, "torch"), (0, 4096, "triton"),
                (4, 4096, "triton"), (8, 4096, "triton"), (16, 4096, "triton")]
    for streams, chunk, kernels in variants:
        if kernels == "triton" and device != "cuda":
            continue
        rows.append((f"ZSharp perturbation, {streams} streams, chunk {chunk}, {kernels}",
                     perturbation_variant(streams, chunk, kernels)))
    for chunk in (1024, 4096):
        other = SegmentLayout.build([g.numel() for g in grads], torch.float32, grads[0].device, chunk)

        def threshold_chunk(other=other):
            absz, has_nan = abs_zscores(grads, other.pack(grads), other)
            return quantile_threshold(absz, has_nan, other, q, "radix" if side else "kthvalue")

        rows.append((f"  pack + |z| + threshold, chunk {chunk}", threshold_chunk))
    for name, fn in rows:
        print(f"{name:<36} {graph_ms(fn, replays):8.4f} ms")

    if device != "cuda":
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            zsharp._perturbation(zs_groups)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet56,vit")
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    for name in args.models.split(","):
        profile(name, args.replays, args.device)


if __name__ == "__main__":
    main()
