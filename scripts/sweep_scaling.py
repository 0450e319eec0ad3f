"""How fast and how well a sweep runs on one host's GPUs: scaling, fixed cost, GPU busy share,
and asynchronous workers against the batch-synchronous sweeper under pruning.

Why a script and not a test: it needs GPUs and minutes, and what it produces is a table of
numbers for docs/benchmarks.md, not a pass/fail (it still exits 1 when a store check fails).

Each sweep runs the project's own command in its own working directory (own ``multirun/`` and
``mlruns/``), with ``CUDA_VISIBLE_DEVICES`` set to the GPUs it may use, while ``nvidia-smi``
samples every GPU::

    python -m zsharp_sweeps.train --multirun +sweep=zsharp_rho_qp_lr \\
        hydra.sweeper.n_jobs=<gpus x k> hardware.trials_per_gpu=<k> hydra.sweeper.n_trials=...

Modes (``--modes``, comma-separated):

- ``scaling``: ``--trials-per-gpu`` trials on 1 GPU, then ``gpus x trials-per-gpu`` on
  ``--gpus`` GPUs: trials per hour and the efficiency against linear scaling.
- ``warmup``: ``gpus x workers-per-gpu x trials-per-gpu`` trials, five times: CUDA graph
  without and with the workers' warm-up (``hardware.warmup_steps=0`` / default), compile
  without and with it from an empty compile cache, and compile again on the warm cache. Prints
  each worker's warm-up, its first trial's wall time and its later trials' (issue: a first
  trial at most 5 s above the later ones).
- ``pruned``: ``--pruned-trials`` trials with ``study.pruner=hyperband`` on ``--gpus`` GPUs,
  by this tree's workers and, with ``--baseline-tree DIR`` (a checkout of the old
  batch-synchronous sweeper, e.g. ``git worktree add .old e100710``), by that one.

From the stores alone it checks that every trial finished, that each has exactly one MLflow
child run (FINISHED, or KILLED when pruned) under one parent run and that the ``device`` tags
cover every GPU. From the trials' ``wall_s``/``overhead_s`` attributes (see
``zsharp_sweeps/sweep/worker.py``) it reports the per-trial fixed cost: wall time minus the
epochs (training, evaluation, sharpness), for every trial after each worker's first.

    python scripts/sweep_scaling.py --gpus 4 --trials-per-gpu 4 --epochs 2 --out /tmp/scaling
    python scripts/sweep_scaling.py --device cpu --gpus 2 --trials-per-gpu 2 --epochs 1 \\
        --modes scaling --out /tmp/s --extra data=digits model=mlp   # plumbing, no GPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDY = "bench"
JOIN = re.compile(r"joined study \S+ ([\d.]+)s after launch \(process ([\d.]+)s, study "
                  r"([\d.]+)s, device ([\d.]+)s(?:; CUDA was ready before the job: "
                  r"([\d.]+)s then)?\)")

GPU_OVERRIDES = [
    "hardware=cuda", "hardware.precision=bf16", "hardware.channels_last=true",
    "hardware.cuda_graph=true",
]
CPU_OVERRIDES = ["hardware=cpu", "hardware.num_threads=1"]


class GpuSampler:
    """Samples ``nvidia-smi`` utilisation every ``interval_ms`` in a background process."""

    def __init__(self, path: Path, interval_ms: int = 200) -> None:
        self.path = path
        self.interval_ms = interval_ms
        self.proc: subprocess.Popen | None = None
        self._file = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._file = open(self.path, "w")  # noqa: SIM115  closed in __exit__
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,index,utilization.gpu",
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

    def summary(self, gpus: list[int], start: float, end: float) -> dict[int, float]:
        """Mean utilisation (% of time a kernel ran) per GPU between two wall-clock times:
        from the first trial's start to the last trial's end."""
        from datetime import datetime

        if not self.path.exists():
            return {}
        samples: dict[int, list[float]] = {g: [] for g in gpus}
        for line in self.path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) not in samples:
                continue
            try:
                stamp = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                if start <= stamp <= end:
                    samples[int(parts[1])].append(float(parts[2]))
            except ValueError:
                continue
        return {g: statistics.fmean(s) if s else 0.0 for g, s in samples.items()}


def sweep(workdir: Path, n_gpus: int, n_trials: int, args: argparse.Namespace, *,
          extra: list[str], tree: Path = REPO, workers_per_gpu: int | None = None,
          timeout: float | None = None, env_extra: dict[str, str] | None = None) -> dict:
    """One sweep on the first ``n_gpus`` GPUs with ``n_gpus x k`` workers; stopped (and
    marked ``censored``) after ``timeout`` s."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    k = workers_per_gpu or args.workers_per_gpu
    overrides = [
        "+sweep=zsharp_rho_qp_lr", f"model={args.model}",
        "data=synthetic", "data.synthetic_like=cifar10", f"data.synthetic_size={args.images}",
        f"trainer.epochs={args.epochs}", "trainer.progress=false",
        f"hydra.sweeper.study_name={STUDY}", f"hydra.sweeper.n_jobs={n_gpus * k}",
        f"hydra.sweeper.n_trials={n_trials}", f"hardware.trials_per_gpu={k}",
        *(GPU_OVERRIDES if args.device == "cuda" else CPU_OVERRIDES),
        *args.extra, *extra,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(env_extra or {})
    if args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(n_gpus))
    cmd = [sys.executable, "-m", "zsharp_sweeps.train", "--multirun", *overrides]
    print(f"[{workdir.name}] {' '.join(cmd[3:])}", flush=True)
    with GpuSampler(workdir / "nvidia_smi.csv") as sampler, open(workdir / "sweep.log", "w") as out:
        start, started_at = time.perf_counter(), time.time()
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # censored: the sweep took at least `timeout` s
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = None
        wall = time.perf_counter() - start
    result: dict = {"returncode": returncode, "wall_s": wall, "gpus": n_gpus,
                    "workers": n_gpus * k, "command": " ".join(cmd[1:]),
                    "started_at": started_at}
    if returncode is None:
        result["censored"] = True
        result["problems"] = [f"stopped after {timeout:.0f} s (--sweep-timeout): wall >= that"]
        return result
    if returncode != 0:
        print((workdir / "sweep.log").read_text()[-3000:], file=sys.stderr)
        result["problems"] = [f"sweep exited with {returncode}"]
        return result
    result.update(check_stores(workdir, n_gpus, n_trials, args))
    result["trials_per_hour"] = 3600 * result["trials"] / wall
    if result.get("window"):  # where the wall time goes: before the first trial, after the last
        result["before_first_trial_s"] = result["window"][0] - started_at
        result["after_last_trial_s"] = started_at + wall - result["window"][1]
        result["worker_first_start_s"] = [s - started_at for s in result["worker_starts"]]
    if result.get("window"):
        result["gpu_util"] = sampler.summary(list(range(n_gpus)), *result["window"])
    if result.get("steady_window"):
        result["gpu_util_steady"] = sampler.summary(list(range(n_gpus)),
                                                    *result["steady_window"])
    # "Worker host/3 on cuda:1 joined study bench 4.2s after launch (process ..., study ...,
    # device ...)": where each worker's start went.
    result["joins"] = JOIN.findall((workdir / "sweep.log").read_text())
    return result


def check_stores(workdir: Path, n_gpus: int, n_trials: int, args: argparse.Namespace) -> dict:
    """What the Optuna study and the MLflow store say about the sweep, and what is wrong."""
    import optuna
    from mlflow.tracking import MlflowClient

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    problems: list[str] = []
    study = optuna.load_study(
        study_name=STUDY, storage=f"sqlite:///{workdir / 'multirun' / STUDY / 'optuna.db'}"
    )
    trials = study.get_trials()
    states = Counter(t.state.name for t in trials)
    if sum(states[s] for s in ("COMPLETE", "PRUNED")) != n_trials or len(trials) != n_trials:
        problems.append(f"trial states {dict(states)}, expected {n_trials} COMPLETE/PRUNED")

    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    if len(parents) != 1:
        problems.append(f"{len(parents)} parent runs, expected 1")
    per_trial = Counter(r.data.tags.get("trial_number") for r in children)
    if set(per_trial) != {str(t.number) for t in trials} or set(per_trial.values()) != {1}:
        problems.append(f"child runs per trial {dict(per_trial)}")
    bad = [r.info.status for r in children if r.info.status not in ("FINISHED", "KILLED")]
    if bad:
        problems.append(f"child run states {Counter(bad)}")
    devices = Counter(r.data.tags.get("device") for r in children)
    if args.device == "cuda" and set(devices) != {f"cuda:{g}" for g in range(n_gpus)}:
        problems.append(f"devices {dict(devices)}, expected every one of cuda:0..{n_gpus - 1}")

    # Fixed cost per trial after each worker's first (that one loads data, compiles, ...).
    by_worker: dict[tuple, list] = defaultdict(list)
    for t in trials:
        worker = t.user_attrs.get("worker")
        if worker and "overhead_s" in t.user_attrs:
            by_worker[(worker["host"], worker["index"])].append(t)
    first, later, worker_starts = [], [], []
    first_wall, later_wall, warmups = [], [], []
    for ts in by_worker.values():
        ts.sort(key=lambda t: t.datetime_start)
        first.append(ts[0].user_attrs["overhead_s"])
        later += [t.user_attrs["overhead_s"] for t in ts[1:]]
        worker_starts.append(ts[0].datetime_start.timestamp())
        # Whole trials (epochs included): the first trial's extra over the later ones is
        # what a worker's warm-up (or its absence) costs inside trial time.
        if not any(t.state.name == "PRUNED" for t in ts):
            first_wall.append(ts[0].user_attrs["wall_s"])
            later_wall += [t.user_attrs["wall_s"] for t in ts[1:]]
        warmups.append(ts[0].user_attrs["worker"].get("warmup_s", 0.0))
    starts = [t.datetime_start.timestamp() for t in trials if t.datetime_start]
    ends = [t.datetime_complete.timestamp() for t in trials if t.datetime_complete]
    # Steady state: every worker has finished its first trial (data, CUDA, kernels warm) and
    # none has run out of trials yet.
    steady = None
    done = [sorted(t.datetime_complete.timestamp() for t in ts if t.datetime_complete)
            for ts in by_worker.values()]
    if done and all(len(d) >= 2 for d in done):
        steady = (max(d[0] for d in done), min(d[-1] for d in done))
        steady = steady if steady[1] > steady[0] else None
    rates, first_epoch, later_epochs, eval_sharp = [], [], [], []
    first_numbers = {str(ts[0].number) for ts in by_worker.values()}
    setup_first, setup_later = [], []
    for r in children:
        if "setup_s" in r.data.metrics:  # data, model, optimizer, the run's params
            (setup_first if r.data.tags.get("trial_number") in first_numbers
             else setup_later).append(r.data.metrics["setup_s"])
        history = client.get_metric_history(r.info.run_id, "train_images_per_s")
        if history:
            rates.append(max(m.value for m in history))
        train = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "epoch_time_s")}
        wall = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "epoch_wall_s")}
        for step, seconds in train.items():
            (first_epoch if step == 1 else later_epochs).append(seconds)
            if step in wall:
                eval_sharp.append(wall[step] - seconds)
    return {
        "trials": len(trials), "states": dict(states), "devices": dict(devices),
        "overhead_first_s": statistics.fmean(first) if first else None,
        "first_trial_wall_s": statistics.fmean(first_wall) if first_wall else None,
        "later_trial_wall_s": statistics.fmean(later_wall) if later_wall else None,
        "warmup_s": statistics.fmean(warmups) if warmups else None,
        "overhead_later_mean_s": statistics.fmean(later) if later else None,
        "overhead_later_max_s": max(later) if later else None,
        "window": (min(starts), max(ends)) if starts and ends else None,
        "steady_window": steady,
        "epoch1_train_s": statistics.fmean(first_epoch) if first_epoch else None,
        "epoch_later_train_s": statistics.fmean(later_epochs) if later_epochs else None,
        "epoch_eval_sharpness_s": statistics.fmean(eval_sharp) if eval_sharp else None,
        "setup_first_s": statistics.fmean(setup_first) if setup_first else None,
        "setup_later_s": statistics.fmean(setup_later) if setup_later else None,
        "worker_starts": sorted(worker_starts),
        "trial_images_per_s": statistics.fmean(rates) if rates else None,
        "best_value": study.best_value if states.get("COMPLETE") else None,
        "problems": problems,
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _util(values: dict | None) -> str:
    return " ".join(f"{u:.0f}" for u in (values or {}).values()) or "-"


def print_table(title: str, rows: dict[str, dict], base: dict | None = None) -> None:
    print(f"\n{title}")
    print(f"{'sweep':<22} {'GPUs':>4} {'workers':>7} {'trials':>6} {'wall s':>7} "
          f"{'trials/h':>9} {'vs linear':>9} {'fixed s (mean/max)':>18} {'GPU util %':>16} "
          f"{'steady %':>16}")
    for name, r in rows.items():
        if "trials_per_hour" not in r:
            print(f"{name:<22} failed: {r.get('problems')}")
            continue
        eff = (r["trials_per_hour"] / (r["gpus"] * base["trials_per_hour"])
               if base and "trials_per_hour" in base else None)
        fixed = (f"{_fmt(r['overhead_later_mean_s'], '.2f')}/"
                 f"{_fmt(r['overhead_later_max_s'], '.2f')}")
        print(f"{name:<22} {r['gpus']:>4} {r['workers']:>7} {r['trials']:>6} "
              f"{r['wall_s']:>7.1f} {r['trials_per_hour']:>9.1f} {_fmt(eff, '.2f'):>9} "
              f"{fixed:>18} {_util(r.get('gpu_util')):>16} {_util(r.get('gpu_util_steady')):>16}")
    print("  per sweep: first trial starts / last ends (s after the command); epoch 1 and later "
          "epochs' training s; evaluation + sharpness s per epoch; workers joined (s after "
          "launch: process, study, device; CUDA started before the job came, s)")
    for name, r in rows.items():
        if "trials_per_hour" not in r:
            continue
        joins = "; ".join(f"{j[0]} ({j[1]}, {j[2]}, {j[3]}"
                          + (f"; CUDA {j[4]} before" if j[4] else "") + ")"
                          for j in r.get("joins", []))
        print(f"  {name}: {_fmt(r.get('before_first_trial_s'), '.1f')} / "
              f"{_fmt(r['wall_s'] - (r.get('after_last_trial_s') or 0), '.1f')}; train "
              f"{_fmt(r.get('epoch1_train_s'), '.2f')} / {_fmt(r.get('epoch_later_train_s'), '.2f')}"
              f"; eval+sharpness {_fmt(r.get('epoch_eval_sharpness_s'), '.2f')}; "
              f"first trial fixed {_fmt(r.get('overhead_first_s'), '.1f')} (setup "
              f"{_fmt(r.get('setup_first_s'), '.2f')}, later trials "
              f"{_fmt(r.get('setup_later_s'), '.2f')}); joined {joins}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--trials-per-gpu", type=int, default=4)
    parser.add_argument("--workers-per-gpu", type=int, default=1,
                        help="hardware.trials_per_gpu: worker processes sharing each GPU")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=50000, help="synthetic CIFAR-shaped images")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--modes", default="scaling,pruned")
    parser.add_argument("--util-workers", default="1,2",
                        help="util mode: workers per GPU to compare (hardware.trials_per_gpu)")
    parser.add_argument("--util-trials-per-worker", type=int, default=6)
    parser.add_argument("--pruned-trials", type=int, default=24)
    parser.add_argument("--pruned-epochs", type=int, default=6)
    parser.add_argument("--sweep-timeout", type=float, default=None,
                        help="stop the baseline sweep after this many s (a lower bound)")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="checkout of the batch-synchronous sweeper to compare against")
    parser.add_argument("--warmup-variants", default="",
                        help="warmup mode: only these (graph, compile; or graph-on, compile-on "
                             "for the warm-up rows alone), comma-separated")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides")
    args = parser.parse_args()
    modes = set(args.modes.split(","))
    results: dict[str, dict] = {}

    if "scaling" in modes:
        rows = {}
        for n in sorted({1, args.gpus}):
            rows[f"scaling-{n}gpu"] = sweep(args.out / f"scaling{n}", n, n * args.trials_per_gpu,
                                            args, extra=[])
        print_table(f"{args.model}, {args.epochs} epochs, {args.workers_per_gpu} worker(s)/GPU",
                    rows, base=rows["scaling-1gpu"])
        results.update(rows)
        save(args.out, results)  # what ran so far survives a later sweep's crash or timeout
    if "util" in modes:
        rows = {}
        for k in (int(v) for v in args.util_workers.split(",")):
            n = args.gpus * k * args.util_trials_per_worker
            rows[f"util-{k}per-gpu"] = sweep(args.out / f"util{k}", args.gpus, n, args,
                                             extra=[], workers_per_gpu=k)
        print_table(f"GPU busy share, {args.gpus} GPU(s), {args.util_trials_per_worker} trials "
                    "per worker", rows)
        results.update(rows)
        save(args.out, results)  # what ran so far survives a later sweep's crash or timeout
    if "pruned" in modes:
        rows = {}
        pruned = [f"trainer.epochs={args.pruned_epochs}", "study.pruner=hyperband",
                  "hydra.sweeper.sampler.n_startup_trials=4"]
        rows["pruned-workers"] = sweep(args.out / "pruned_workers", args.gpus,
                                       args.pruned_trials, args, extra=pruned)
        if args.baseline_tree is not None:
            rows["pruned-batch-sync"] = sweep(
                args.out / "pruned_batch", args.gpus, args.pruned_trials, args,
                extra=[*pruned, "hydra/launcher=joblib"], tree=args.baseline_tree.resolve(),
                timeout=args.sweep_timeout,
            )
        print_table(f"hyperband, {args.pruned_trials} trials x <= {args.pruned_epochs} epochs",
                    rows)
        workers, batch = rows["pruned-workers"], rows.get("pruned-batch-sync", {})
        if "trials_per_hour" in workers and "wall_s" in batch:
            speedup = batch["wall_s"] / workers["wall_s"]
            at_least = ">= " if batch.get("censored") else ""
            print(f"workers vs batch-synchronous: {at_least}{speedup:.2f}x faster"
                  + (" (the batch sweep was stopped at --sweep-timeout)" if at_least else ""))
            workers["speedup_vs_batch"] = speedup
            workers["speedup_is_lower_bound"] = bool(at_least)
            batch.pop("problems", None)  # a stopped baseline is a bound, not a failure
        results.update(rows)
        save(args.out, results)  # what ran so far survives a later sweep's crash or timeout

    if "warmup" in modes:
        rows = {}
        n = args.gpus * args.workers_per_gpu * args.trials_per_gpu
        compile_on = ["hardware.compile=true"]
        # Each compile variant but the last starts from an empty compile cache, as a fresh
        # host does; the last reuses the one before it (a later sweep on the same host).
        # Without warm-up: this tree with hardware.warmup_steps=0 (it still opens the store
        # and loads the data first), or, with --baseline-tree, that tree (before warm-ups).
        base = args.baseline_tree.resolve() if args.baseline_tree else None
        off = [] if base else ["hardware.warmup_steps=0"]
        variants = [
            ("graph, no warm-up", off, "graph-off", base or REPO),
            ("graph, warm-up", [], "graph-on", REPO),
            ("compile, no warm-up", [*compile_on, *off], "compile-off", base or REPO),
            ("compile, warm-up", compile_on, "compile-on", REPO),
            ("compile, warm-up, again", compile_on, "compile-on", REPO),
        ]
        if args.warmup_variants:
            wanted = set(args.warmup_variants.split(","))
            variants = [v for v in variants if v[2] in wanted or v[2].split("-")[0] in wanted]
        for name, extra, cache, tree in variants:
            folder = args.out / "warmup" / name.replace(", ", "_").replace(" ", "-")
            rows[name] = sweep(folder, args.gpus, n, args, extra=extra, tree=tree,
                               env_extra={"ZSHARP_COMPILE_CACHE": str(args.out / "cache" / cache)})
            results[f"warmup: {name}"] = rows[name]
            save(args.out, results)
        print(f"\nfirst trial against later ones, {args.gpus} GPU(s) x {args.workers_per_gpu} "
              f"worker(s), {n} trials of {args.epochs} epochs ({args.model})")
        print(f"{'variant':<26} {'wall s':>7} {'warm-up s':>9} {'first trial s':>13} "
              f"{'later trials s':>14} {'first - later':>13}")
        for name, r in rows.items():
            if "trials_per_hour" not in r:
                print(f"{name:<26} failed: {r.get('problems')}")
                continue
            gap = (r["first_trial_wall_s"] - r["later_trial_wall_s"]
                   if r.get("first_trial_wall_s") and r.get("later_trial_wall_s") else None)
            print(f"{name:<26} {r['wall_s']:>7.1f} {_fmt(r.get('warmup_s'), '.1f'):>9} "
                  f"{_fmt(r.get('first_trial_wall_s'), '.1f'):>13} "
                  f"{_fmt(r.get('later_trial_wall_s'), '.1f'):>14} {_fmt(gap, '+.1f'):>13}")

    problems = {k: r["problems"] for k, r in results.items() if r.get("problems")}
    for k, p in problems.items():
        print(f"CHECK FAILED ({k}): {'; '.join(p)}")
    if not problems:
        print("checks: every trial finished with one MLflow child run under one parent run; "
              "device tags cover every GPU")
    save(args.out, results)
    return 1 if problems else 0


def save(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_bench.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
