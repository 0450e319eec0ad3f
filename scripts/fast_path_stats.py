"""Does the fast path learn the same thing? A statistical check over seeds (airbench-style).

The CUDA-graph path must replay the eager step exactly (tests/gpu/test_graph_matrix.py checks
parameters bit for bit), but bf16 and channels-last change the arithmetic, so single runs
cannot tell "same learning" from "different learning": this script trains ResNet-20 on the
embedded digits data for n seeds in two modes and compares final test accuracy per optimizer
with Welch's t-test. Each run is ``zsharp_sweeps.training.run.run_training`` on a config composed
from conf/ (tracking off), i.e. what ``python -m zsharp_sweeps.train`` runs:

    python scripts/fast_path_stats.py                       # sgd, sam, zsharp, fsam; 10 seeds
    python scripts/fast_path_stats.py --fast gpu_fast --seeds 16 --epochs 12

``--fast graph`` (default) is ``hardware=gpu_fast hardware.compile=false``: bf16,
channels-last and the whole step in a CUDA graph, without ``torch.compile`` (its warm-up per
fresh process/model costs more than these short runs). ``--fast gpu_fast`` includes compile.
Seeds go in the outer loop, so a ``--time-limit`` that stops early leaves every
optimizer x mode with the same number of runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from scipy import stats  # noqa: E402

from zsharp_sweeps.config import register_configs  # noqa: E402
from zsharp_sweeps.report.tables import format_table  # noqa: E402
from zsharp_sweeps.training.run import run_training  # noqa: E402

#: The reference and the fast mode, as command-line overrides of the hardware group.
MODES = {
    "eager-fp32": ["hardware=cuda"],
    "graph": ["hardware=gpu_fast", "hardware.compile=false"],
    "gpu_fast": ["hardware=gpu_fast"],
}


def overrides(optimizer: str, mode: str, seed: int, epochs: int) -> list[str]:
    """The command line of one run (digits, ResNet-20, no tracking, no sharpness)."""
    return [
        "data=digits", "model=resnet20", f"optimizer={optimizer}", *MODES[mode],
        f"seed={seed}", f"trainer.epochs={epochs}", "trainer.progress=false",
        "trainer.checkpoint=false", "sharpness=none", "tracking=off",
    ]


def run(optimizer: str, mode: str, seed: int, epochs: int) -> dict[str, float]:
    warnings.filterwarnings("ignore", message="The version_base parameter is deprecated")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides(optimizer, mode, seed, epochs))
    summary = run_training(cfg)
    return {"final_test_acc": summary["final_test_acc"], "train_time_s": summary["train_time_s"]}


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t statistic and two-sided p-value of mean(b) - mean(a) (nan if undefined)."""
    if len(a) < 2 or len(b) < 2 or (statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0):
        return math.nan, math.nan
    result = stats.ttest_ind(b, a, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def rank_p(a: list[float], b: list[float]) -> float:
    """Two-sided Mann-Whitney U p-value: robust to the odd diverged run, which a t-test on
    means is not (ZSharp at lr 0.1 on digits has them, in both modes)."""
    if len(a) < 2 or len(b) < 2 or len(set(a) | set(b)) == 1:
        return math.nan
    return float(stats.mannwhitneyu(b, a, alternative="two-sided").pvalue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--optimizers", default="sgd,sam,zsharp,fsam")
    parser.add_argument("--seeds", type=int, default=10, help="runs per optimizer and mode (>= 2)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fast", choices=["graph", "gpu_fast"], default="graph")
    parser.add_argument("--time-limit", type=float, default=math.inf,
                        help="start no new seed after this many seconds")
    parser.add_argument("--json", type=Path, help="write every run's result here")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error(f"--seeds={args.seeds} is invalid: allowed >= 2 (a t-test needs two runs)")
    if not torch.cuda.is_available():
        parser.error("the fast path needs a CUDA device, and none is available here")
    register_configs()
    optimizers = args.optimizers.split(",")
    modes = ["eager-fp32", args.fast]
    results: dict[tuple[str, str], list[float]] = {(o, m): [] for o in optimizers for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    records = []
    start = time.perf_counter()
    for seed in range(args.seeds):
        if time.perf_counter() - start > args.time_limit:
            print(f"time limit reached: {seed} seeds run", flush=True)
            break
        for optimizer in optimizers:
            for mode in modes:
                out = run(optimizer, mode, seed, args.epochs)
                results[(optimizer, mode)].append(out["final_test_acc"])
                times[mode].append(out["train_time_s"])
                records.append({"optimizer": optimizer, "mode": mode, "seed": seed, **out})
                print(f"{optimizer:>8} {mode:>10} seed {seed}: test acc "
                      f"{out['final_test_acc']:.4f} in {out['train_time_s']:.1f} s", flush=True)
    rows = []
    for optimizer in optimizers:
        ref = results[(optimizer, modes[0])]
        fast = results[(optimizer, modes[1])]
        t, p = welch(ref, fast)
        rows.append({
            "optimizer": optimizer, "n": len(fast),
            f"{modes[0]} mean": round(statistics.fmean(ref), 4),
            f"{modes[0]} std": round(statistics.stdev(ref), 4) if len(ref) > 1 else math.nan,
            f"{modes[1]} mean": round(statistics.fmean(fast), 4),
            f"{modes[1]} std": round(statistics.stdev(fast), 4) if len(fast) > 1 else math.nan,
            "diff": round(statistics.fmean(fast) - statistics.fmean(ref), 4),
            "welch t": round(t, 2), "p": round(p, 3), "mann-whitney p": round(rank_p(ref, fast), 3),
        })
    print()
    print(format_table(rows))
    print("mean train_time_s per run: " + ", ".join(
        f"{m} {statistics.fmean(v):.2f}" for m, v in times.items() if v))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{args.epochs} epochs, total {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "runs": records}, indent=1))


if __name__ == "__main__":
    main()
