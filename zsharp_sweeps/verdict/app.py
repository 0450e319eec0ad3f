"""A verdict from start to end: check everything, run the stages, analyse, record.

Stages: (1) ``tune``: per arm, a sweep of ``verdict.tune.trials`` trials over the arm's own
space on the validation split; (2) ``final``: per arm, its best configuration retrained on
``verdict.final.seeds``; (3) the analysis (``zsharp_sweeps.analysis``), written to
``<verdict dir>/verdict/`` and to the verdict's MLflow run, under which every stage's sweep
and trial run is nested. Each stage resumes where it stopped; see ``runner``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zsharp_sweeps.config import ConfigError, TrackingConfig, flatten
from zsharp_sweeps.sweep.records import StudyStore
from zsharp_sweeps.tracking import Tracker
from zsharp_sweeps.training.signals import check_stop
from zsharp_sweeps.verdict import collect
from zsharp_sweeps.verdict.plan import ArmPlan, Stage, build_plan, differences, fingerprint
from zsharp_sweeps.verdict.runner import (
    POLL_S,
    Scheduler,
    StageFailed,
    check_ended,
    forwarded_signals,
)
from zsharp_sweeps.verdict.settings import VerdictConfig

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint"
PARENT_RUN = "mlflow_parent_run_id"
ANALYSED = "analysed"


class Stopped(KeyboardInterrupt):
    """The verdict was stopped by a signal; every stage can be resumed."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@dataclass
class Verdict:
    """One verdict's plan and handles."""

    settings: VerdictConfig
    common: list[str]
    plans: list[ArmPlan]
    final_epochs: int
    storage_url: str
    state: StudyStore
    tracker: Tracker
    n_devices: int
    #: ``cuda`` or ``cpu``: what the stages' workers compute on.
    n_devices_kind: str = "cpu"

    @property
    def root(self) -> Path:
        return Path(self.settings.dir).resolve()

    def final_stage(self, plan: ArmPlan, selected: dict[str, Any]) -> Stage:
        return plan.final(self.settings, self.common, selected["params"], self.final_epochs,
                          self.storage_url, self.root, self.settings.name)

    def selected(self, plan: ArmPlan) -> dict[str, Any] | None:
        """The arm's chosen configuration, chosen once, when its tuning is done."""
        chosen = self.state.get(f"selected.{plan.name}")
        if chosen is None and self.state.done(plan.tune.study_name, plan.tune.n_trials):
            try:
                chosen = self.state.best(plan.tune.study_name)
            except ValueError as exc:  # every tuning trial failed or was pruned
                raise StageFailed(f"arm {plan.name}: {exc}: see "
                                  f"{Path(plan.tune.sweep_dir) / 'sweep.log'}") from None
            self.state.set(f"selected.{plan.name}", chosen)
            log.info(f"{plan.name}: best of tuning is trial {chosen['trial']} "
                     f"(val {chosen['value']:.4f}): {chosen['params']}")
        return chosen


def prepare(settings: VerdictConfig, common: list[str], tracking: TrackingConfig,
            n_devices: int, device_kind: str = "cpu") -> Verdict:
    """Everything checked before anything is created: settings, every arm's config at the
    corners of its space, the tracking store; then the storage and the protocol's
    fingerprint (a resume with other settings is refused, naming them)."""
    from zsharp_sweeps.verdict.plan import storage_url

    url = storage_url(settings)
    plans, final_epochs = build_plan(settings, common, url)
    tracker = Tracker(tracking)  # checks the store (one line if it cannot be used)
    state = StudyStore(url, settings.name)
    new = fingerprint(settings, common, plans, final_epochs)
    old = state.get(FINGERPRINT)
    if old is not None:
        changed = differences(old, new)
        if changed:
            raise ConfigError(
                f"verdict {settings.name} in {url} was started with other settings ("
                + "; ".join(changed) + "): rerun with the settings it started with, or start "
                "a new verdict with verdict.name=<new name> (or verdict.dir=...)"
            )
        new = {**new, "arms": {**old["arms"], **new["arms"]}}
    state.set(FINGERPRINT, new)
    return Verdict(settings, common, plans, final_epochs, url, state, tracker, n_devices,
                   device_kind)


def _parent_run(v: Verdict) -> str | None:
    """The verdict's MLflow run: created once, reopened by every resume."""
    if not v.tracker.enabled:
        return None
    run_id = v.state.get(PARENT_RUN)
    if run_id is not None and v.tracker.reopen(run_id):
        return run_id
    run_id = v.tracker.start(
        run_name=f"verdict {v.settings.name}",
        tags={"verdict": v.settings.name, "verdict_protocol": v.settings.protocol,
              "verdict_stage": "verdict"},
    )
    v.tracker.log_params(flatten(v.state.get(FINGERPRINT)))
    v.state.set(PARENT_RUN, run_id)
    return run_id


def run(v: Verdict) -> Path:
    """Run what is left of the verdict; returns the folder of its analysis."""
    out = v.root / "verdict"
    analysed = v.state.get(ANALYSED)
    if analysed == _analysis_key(v) and (out / "verdict.md").exists():
        log.info(f"Verdict {v.settings.name} is complete (nothing to run): {out}")
        print((out / "verdict.md").read_text(), flush=True)
        return out
    check_stop()
    parent = _parent_run(v)
    status = "FAILED"
    started = time.monotonic()
    concurrent = v.settings.concurrent or len(v.plans)
    extra = [f"tracking.parent_run_id={parent}"] if parent else []
    extra += _cpu_threads(v, concurrent)
    scheduler = Scheduler(v.state, concurrent, v.n_devices, extra)
    try:
        _run_stages(v, scheduler)
        if scheduler.signum is not None:
            raise Stopped(scheduler.signum)
        v.state.add("busy_s", scheduler.busy_s)
        v.state.add("wall_s", time.monotonic() - started)
        scheduler.busy_s, started = 0.0, time.monotonic()
        check_stop()
        _analyse(v, out)
        status = "FINISHED"
    except Stopped:
        status = "KILLED"
        raise
    except KeyboardInterrupt as exc:  # a signal during the analysis (graceful_stop)
        status = "KILLED"
        raise Stopped(int(getattr(exc, "signum", signal.SIGINT))) from None
    finally:
        v.state.add("busy_s", scheduler.busy_s)
        v.state.add("wall_s", time.monotonic() - started)
        if v.tracker.enabled and v.tracker.run_id:
            v.tracker.end(status)
    return out


def _cpu_threads(v: Verdict, concurrent: int) -> list[str]:
    """CPU sweeps running side by side split the cores (one thread per core each would
    oversubscribe them: an epoch several times slower); an explicit setting wins."""
    from zsharp_sweeps.verdict.plan import override_key

    if v.n_devices_kind != "cpu" or any(override_key(o) == "hardware.num_threads"
                                        for o in v.common):
        return []
    threads = max(1, (os.cpu_count() or 1) // (concurrent * v.settings.n_jobs))
    return [f"hardware.num_threads={threads}"]


def _pending(v: Verdict) -> list[Stage]:
    queue = []
    for plan in v.plans:
        chosen = v.selected(plan)
        if chosen is None:
            queue.append(plan.tune)
            continue
        final = v.final_stage(plan, chosen)
        if not v.state.done(final.study_name, final.n_trials):
            queue.append(final)
    return queue


def _stages(v: Verdict) -> list[Stage]:
    """Every stage whose size is known (finals: once their tuning chose)."""
    out = []
    for plan in v.plans:
        out.append(plan.tune)
        chosen = v.state.get(f"selected.{plan.name}")
        out.append(v.final_stage(plan, chosen) if chosen else
                   Stage("final", plan.name, f"{v.settings.name}.final.{plan.name}",
                         len(v.settings.final.seeds), "", ()))
    return out


def _run_stages(v: Verdict, scheduler: Scheduler) -> None:
    from tqdm import tqdm

    queue = _pending(v)
    stages = _stages(v)
    total = sum(s.n_trials for s in stages)

    def finished() -> int:
        return sum(min(v.state.progress(s.study_name).finished, s.n_trials) for s in stages)

    if not queue:
        return
    log.info(f"Verdict {v.settings.name}: {len(v.plans)} arms, {finished()}/{total} trials "
             f"done, {len(queue)} sweep(s) to run, up to {scheduler.concurrent} at once; "
             f"storage {v.storage_url}")
    with tqdm(total=total, initial=finished(), desc="verdict", unit="trial",
              dynamic_ncols=True) as bar, forwarded_signals(scheduler):
        last = time.monotonic()
        try:
            while queue or scheduler.running:
                while queue and scheduler.has_room():
                    scheduler.start(queue.pop(0))
                if scheduler.signum is not None:
                    scheduler.wait_all()
                    return
                time.sleep(POLL_S)
                now = time.monotonic()
                ended, last = scheduler.tick(now - last), now
                for r, code in ended:
                    if scheduler.signum is not None:
                        continue
                    check_ended(r, code, v.state)
                    log.info(f"{r.stage.key}: done")
                    if r.stage.kind == "tune":
                        plan = next(p for p in v.plans if p.name == r.stage.arm)
                        chosen = v.selected(plan)
                        assert chosen is not None
                        queue.append(v.final_stage(plan, chosen))
                bar.set_postfix_str(", ".join(r.stage.key for r in scheduler.running))
                bar.update(finished() - bar.n)
        except (StageFailed, ConfigError):
            import signal

            scheduler.stop(signal.SIGTERM)
            scheduler.wait_all()
            raise


def _analysis_key(v: Verdict) -> str:
    return ",".join(v.settings.optimizers) + f"|{v.settings.reference}"


def _analyse(v: Verdict, out: Path) -> None:
    from zsharp_sweeps.analysis import summarize, to_markdown, write_verdict

    results, budgets = [], []
    device_s = {k[len("device_s."):]: float(val) for k, val in v.state.attrs.items()
                if k.startswith("device_s.")}
    epoch_s = worker_s = 0.0
    for plan in v.plans:
        chosen = v.selected(plan)
        assert chosen is not None
        final = v.final_stage(plan, chosen).study_name
        try:
            results += collect.seed_results(plan.name, v.state, final)
        except ValueError as exc:
            raise StageFailed(f"analysis: {exc}") from None
        budgets.append(collect.arm_budget(plan.name, v.state, plan.tune.study_name, chosen,
                                          device_s))
        for study in (plan.tune.study_name, final):
            e, w = v.state.epoch_seconds(study)
            epoch_s, worker_s = epoch_s + e, worker_s + w
    try:
        verdict = summarize(results, budgets, v.settings.reference)
    except ValueError as exc:  # e.g. a final run failed: its seed does not pair
        raise StageFailed(
            f"analysis: {exc} (a final run that failed is not retried by a rerun: see "
            f"{v.root}/final-<arm>/sweep.log; to run that arm's seeds again: optuna "
            f"delete-study --storage {v.storage_url} --study-name {v.settings.name}.final.<arm>)"
        ) from None
    check_stop()
    paths = write_verdict(verdict, out)
    cost = _cost(v, epoch_s, worker_s)
    (out / "cost.md").write_text(cost + "\n")
    markdown = to_markdown(verdict)
    print(markdown + "\n\n" + cost, flush=True)
    if v.tracker.enabled:
        for path in [*paths, out / "cost.md"]:
            v.tracker.log_artifact(path, "verdict")
        v.tracker.set_tags({"mlflow.note.content": markdown + "\n\n" + cost})
        metrics = {}
        for row in verdict.arms.to_dict("records"):
            metrics[f"test_acc_mean.{row['arm']}"] = row["test_mean"]
            metrics[f"test_acc_std.{row['arm']}"] = row["test_std"]
        for row in verdict.comparisons.to_dict("records"):
            metrics[f"p_holm.{row['arm']}"] = row["p_holm"]
            metrics[f"mean_diff.{row['arm']}"] = row["mean_diff"]
        v.tracker.log_metrics({k: val for k, val in metrics.items() if val == val}, step=0)
    check_stop()
    v.state.set(ANALYSED, _analysis_key(v))
    log.info(f"Verdict written to {out}")


def _cost(v: Verdict, epoch_s: float, worker_s: float) -> str:
    """Device minutes per stage and how much of the time went to anything but training."""
    attrs = v.state.attrs
    lines = ["| stage | device-minutes | wall minutes (sum over sweeps) |", "|---|---|---|"]
    for kind in ("tune", "final"):
        dev = sum(float(val) for k, val in attrs.items() if k.startswith(f"device_s.{kind}."))
        wall = sum(float(val) for k, val in attrs.items() if k.startswith(f"wall_s.{kind}."))
        lines.append(f"| {kind} | {dev / 60:.1f} | {wall / 60:.1f} |")
    wall = float(attrs.get("wall_s", 0.0))
    busy = float(attrs.get("busy_s", 0.0))
    outside = max(0.0, wall - busy)
    lines.append("")
    lines.append(
        f"Verdict wall time {wall / 60:.1f} min on {v.n_devices} device(s); outside the "
        f"sweeps (checks, scheduling, analysis) {outside:.0f} s "
        f"({100 * outside / wall if wall else 0:.1f}%). Trials spent {epoch_s / 60:.1f} of "
        f"their {worker_s / 60:.1f} minutes in training epochs "
        f"({100 * epoch_s / worker_s if worker_s else 0:.1f}%)."
    )
    return "\n".join(lines)
