"""Run the same Optuna sweep on 1 GPU and on N GPUs, check it, and measure the scaling.

Why a script and not a test: it needs a multi-GPU host and minutes of GPU time, and what it
produces is a table of numbers for docs/benchmarks.md, not a pass/fail.

For each GPU count n (1 and N) it runs, in its own working directory (own ``multirun/`` and
``mlruns/``) and with ``CUDA_VISIBLE_DEVICES`` set to the first n GPUs, the project's own
command::

    python -m zsharp_sweeps.train --multirun +sweep=zsharp_rho_qp_lr \\
        hydra.sweeper.n_jobs=n*k hydra.sweeper.n_trials=n*trials_per_gpu hardware.trials_per_gpu=k ...

while ``nvidia-smi`` samples every GPU's utilisation. Afterwards it checks, from the stores
alone, that every Optuna trial is COMPLETE, that each trial has exactly one FINISHED MLflow
child run under the study's parent run, and that the ``device`` tags cover every GPU; and it
reports trials per hour, aggregate training images/s (images trained by all trials / sweep
wall time) and the scaling efficiency against the 1-GPU sweep. Exit status 1 if a check fails.

    python scripts/sweep_scaling.py --gpus 2 --trials-per-gpu 4 --epochs 2 --out /tmp/scaling
    python scripts/sweep_scaling.py --device cpu --gpus 2 --trials-per-gpu 1 --epochs 1 \\
        --extra data=digits trainer.max_steps_per_epoch=5     # plumbing check without a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDY = "scaling"

GPU_OVERRIDES = [
    "hardware=cuda", "hardware.precision=bf16", "hardware.channels_last=true",
    "hardware.cuda_graph=true",
]
CPU_OVERRIDES = ["hardware=cpu", "hardware.num_threads=1"]


class GpuSampler:
    """Samples ``nvidia-smi`` utilisation every ``interval_ms`` in a background process."""

    def __init__(self, path: Path, interval_ms: int = 500) -> None:
        self.path = path
        self.interval_ms = interval_ms
        self.proc: subprocess.Popen | None = None
        self._file = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._file = open(self.path, "w")
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,index,utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", f"-lms={self.interval_ms}"],
                stdout=self._file, stderr=subprocess.DEVNULL,
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
        if self._file is not None:
            self._file.close()

    def summary(self, gpus: list[int]) -> dict[int, dict[str, float]]:
        """Per GPU: mean utilisation %, share of samples with utilisation > 0, peak MiB."""
        if not self.path.exists():
            return {}
        samples: dict[int, list[tuple[float, float]]] = {g: [] for g in gpus}
        for line in self.path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 4 or not parts[1].isdigit() or int(parts[1]) not in samples:
                continue
            try:
                samples[int(parts[1])].append((float(parts[2]), float(parts[3])))
            except ValueError:
                continue
        return {
            g: {
                "samples": len(s),
                "mean_util": statistics.fmean(u for u, _ in s) if s else 0.0,
                "busy_share": sum(u > 0 for u, _ in s) / len(s) if s else 0.0,
                "peak_mem_mib": max((m for _, m in s), default=0.0),
            }
            for g, s in samples.items()
        }


def run_sweep(workdir: Path, n_gpus: int, args: argparse.Namespace) -> dict:
    """One sweep on the first ``n_gpus`` GPUs; returns its wall time and log path."""
    workdir.mkdir(parents=True, exist_ok=True)
    k = args.concurrent_per_gpu
    n_jobs = n_gpus * k if args.device == "cuda" else n_gpus
    overrides = [
        "+sweep=zsharp_rho_qp_lr", f"model={args.model}",
        "data=synthetic", "data.synthetic_like=cifar10", f"data.synthetic_size={args.images}",
        f"trainer.epochs={args.epochs}", "trainer.progress=false",
        f"hydra.sweeper.study_name={STUDY}", f"hydra.sweeper.n_jobs={n_jobs}",
        f"hydra.sweeper.n_trials={n_gpus * args.trials_per_gpu}",
        f"hardware.trials_per_gpu={k}", f"hydra/launcher={args.launcher}",
        *(GPU_OVERRIDES if args.device == "cuda" else CPU_OVERRIDES),
        *args.extra,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("MLFLOW_TRACKING_URI", None)
    if args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(n_gpus))
    cmd = [sys.executable, "-m", "zsharp_sweeps.train", "--multirun", *overrides]
    log = workdir / "sweep.log"
    print(f"[{n_gpus} GPU] {' '.join(cmd[1:])}", flush=True)
    with GpuSampler(workdir / "nvidia_smi.csv") as sampler, open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(log.read_text()[-4000:], file=sys.stderr)
    return {
        "returncode": proc.returncode, "wall_s": wall, "command": " ".join(cmd[1:]),
        "gpu_util": sampler.summary(list(range(n_gpus))) if args.device == "cuda" else {},
    }


def check_stores(workdir: Path, n_gpus: int, args: argparse.Namespace) -> dict:
    """What the Optuna study and the MLflow store say about the sweep, and what is wrong."""
    import optuna
    from mlflow.tracking import MlflowClient

    problems: list[str] = []
    study = optuna.load_study(
        study_name=STUDY, storage=f"sqlite:///{workdir / 'multirun' / STUDY / 'optuna.db'}"
    )
    states = Counter(t.state.name for t in study.trials)
    expected = n_gpus * args.trials_per_gpu
    if states != Counter({"COMPLETE": expected}):
        problems.append(f"trial states {dict(states)}, expected {expected} COMPLETE")

    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    if len(parents) != 1:
        problems.append(f"{len(parents)} parent runs, expected 1")
    per_trial = Counter(r.data.tags.get("trial_number") for r in children)
    numbers = {str(t.number) for t in study.trials}
    if set(per_trial) != numbers or any(c != 1 for c in per_trial.values()):
        problems.append(f"child runs per trial {dict(per_trial)}, expected one for each of {sorted(numbers)}")
    if any(r.info.status != "FINISHED" for r in children):
        problems.append(f"child run states {Counter(r.info.status for r in children)}")
    devices = Counter(r.data.tags.get("device") for r in children)
    if args.device == "cuda" and set(devices) != {f"cuda:{g}" for g in range(n_gpus)}:
        problems.append(f"devices {dict(devices)}, expected every one of cuda:0..{n_gpus - 1}")

    images = sum(int(r.data.params["num_train"]) * args.epochs for r in children)
    trial_rates = []
    for r in children:
        history = client.get_metric_history(r.info.run_id, "train_images_per_s")
        if history:
            trial_rates.append(max(m.value for m in history))  # epoch 1 includes graph capture
    train_times = [r.data.metrics.get("train_time_s", float("nan")) for r in children]
    return {
        "trials": len(study.trials), "states": dict(states), "child_runs": len(children),
        "devices": dict(devices), "images_trained": images,
        "mean_trial_images_per_s": statistics.fmean(trial_rates) if trial_rates else 0.0,
        "mean_trial_train_time_s": statistics.fmean(train_times) if train_times else 0.0,
        "best_value": study.best_value if states.get("COMPLETE") else None,
        "problems": problems,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2, help="N: compare 1 GPU against N GPUs")
    parser.add_argument("--trials-per-gpu", type=int, default=4, help="trials in the study per GPU")
    parser.add_argument("--concurrent-per-gpu", type=int, default=1,
                        help="trials running at once on each GPU (hardware.trials_per_gpu)")
    parser.add_argument("--launcher", choices=["joblib", "zsharp_streams"], default="joblib",
                        help="joblib: one process per running trial; zsharp_streams: threads "
                             "of one process, a CUDA stream each")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=50000, help="synthetic CIFAR-shaped images")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides")
    args = parser.parse_args()

    results = {}
    for n in sorted({1, args.gpus}):
        workdir = args.out / f"gpus{n}"
        if workdir.exists():
            shutil.rmtree(workdir)
        run = run_sweep(workdir, n, args)
        stores = check_stores(workdir, n, args) if run["returncode"] == 0 else {
            "problems": [f"sweep exited with {run['returncode']} (see {workdir}/sweep.log)"]
        }
        results[n] = {**run, **stores}
        if run["returncode"] == 0:
            results[n]["trials_per_hour"] = 3600 * stores["trials"] / run["wall_s"]
            results[n]["aggregate_images_per_s"] = stores["images_trained"] / run["wall_s"]

    base = results[1]
    print(f"\n{'GPUs':>4} {'trials':>6} {'wall s':>7} {'trials/h':>9} {'agg img/s':>10} "
          f"{'trial img/s':>11} {'scaling':>8}  devices / GPU util (mean %, busy share)")
    for n, r in results.items():
        if "trials_per_hour" not in r:
            print(f"{n:>4} failed: {r['problems']}")
            continue
        eff = r["trials_per_hour"] / (n * base["trials_per_hour"]) if "trials_per_hour" in base else float("nan")
        r["scaling_efficiency"] = eff
        util = ", ".join(
            f"gpu{g} {u['mean_util']:.0f}% {u['busy_share']:.2f}" for g, u in r["gpu_util"].items()
        )
        print(f"{n:>4} {r['trials']:>6} {r['wall_s']:>7.1f} {r['trials_per_hour']:>9.1f} "
              f"{r['aggregate_images_per_s']:>10.0f} {r['mean_trial_images_per_s']:>11.0f} "
              f"{eff:>8.2f}  {r['devices']} {util}")
    problems = {n: r["problems"] for n, r in results.items() if r["problems"]}
    for n, p in problems.items():
        print(f"CHECK FAILED ({n} GPU): {'; '.join(p)}")
    if not problems:
        print("checks: every trial COMPLETE, one FINISHED child run per trial, one parent run, "
              "device tags cover every GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(results, indent=2, default=str))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
