"""The sweep runtime's pieces, in-process and fast: per-trial seeds, which trials count, the
surplus guard, the stop file and watchdog, a worker that keeps its data warm."""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from zsharp_sweeps.config import StudyConfig
from zsharp_sweeps.sweep import build_pruner
from zsharp_sweeps.sweep.lifecycle import StopRequest
from zsharp_sweeps.sweep.plan import HostPlan, StudyPlan
from zsharp_sweeps.sweep.progress import (
    INTERRUPTED_ATTR,
    REJECTED_ATTR,
    SURPLUS_ATTR,
    is_surplus,
    progress,
)
from zsharp_sweeps.sweep.sampling import (
    TrialSeededSampler,
    derive_seed,
    override_value,
    sampler_factory,
)
from zsharp_sweeps.sweep.worker import Worker, _retry, trial_run_name
from zsharp_sweeps.training.signals import Terminated, check_stop, graceful_stop, stop_pending

from .conftest import REPO
from .sweep_helpers import worker_job

SPACE = {"x": FloatDistribution(0.0, 1.0), "y": FloatDistribution(1e-3, 1.0, log=True)}
TPE = {"_target_": "optuna.samplers.TPESampler", "seed": 0, "n_startup_trials": 3}


def _sampled(study: optuna.Study, n: int) -> list[tuple[float, float]]:
    for _ in range(n):
        trial = study.ask(SPACE)
        study.tell(trial, trial.params["x"] + trial.params["y"])
    return [(t.params["x"], t.params["y"]) for t in study.trials]


def _seeded_study(storage=None, name: str = "s") -> optuna.Study:
    sampler = TrialSeededSampler(sampler_factory(TPE, None), study_seed=0)
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                               direction="maximize", load_if_exists=True)


def test_derived_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(0, 3) == derive_seed(0, 3)
    seeds = {derive_seed(0, n) for n in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert derive_seed(1, 3) != derive_seed(0, 3)


def test_a_seeded_study_is_reproducible_and_resumes_without_repeats(tmp_path: Path) -> None:
    first = _sampled(_seeded_study(), 6)
    assert _sampled(_seeded_study(), 6) == first  # same seed, same study
    assert len(set(first)) == 6

    # Resuming in a new process (a new sampler object on the same storage) continues the
    # sequence: trial 4 is not trial 0 again, which a once-per-process seed would give.
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    _sampled(_seeded_study(storage), 4)
    resumed = _sampled(_seeded_study(storage), 2)
    assert len(set(resumed)) == 6
    assert resumed == first  # and it is exactly the uninterrupted study


def test_qmc_keeps_one_sequence_for_the_study() -> None:
    conf = {"_target_": "optuna.samplers.QMCSampler", "seed": 0}
    sampler = TrialSeededSampler(sampler_factory(conf, None), study_seed=0)
    assert sampler.inner_name == "QMCSampler"
    study = optuna.create_study(sampler=sampler)
    assert len(set(_sampled(study, 4))) == 4


def test_grid_sampler_gets_its_grid() -> None:
    conf = {"_target_": "optuna.samplers.GridSampler", "_partial_": True, "seed": 0}
    sampler = TrialSeededSampler(sampler_factory(conf, {"c": [1, 2, 3]}), study_seed=0)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: t.suggest_categorical("c", [1, 2, 3]), n_trials=3)
    assert sorted(t.params["c"] for t in study.trials) == [1, 2, 3]


def _add(study: optuna.Study, state: TrialState, x: float, **attrs) -> None:
    study.add_trial(create_trial(
        state=state, params={"x": x}, distributions={"x": SPACE["x"]},
        value=x if state == TrialState.COMPLETE else None, user_attrs=attrs,
    ))


def test_progress_counts_retries_once_and_ignores_surplus() -> None:
    study = optuna.create_study()
    _add(study, TrialState.COMPLETE, 0.1)
    _add(study, TrialState.FAIL, 0.2)                       # a real failure: counts
    _add(study, TrialState.FAIL, 0.3, **{INTERRUPTED_ATTR: True})
    _retry(study, study.trials[2], None)                     # its retry, WAITING
    _add(study, TrialState.PRUNED, 0.4)
    _add(study, TrialState.FAIL, 0.5, **{SURPLUS_ATTR: True})
    _add(study, TrialState.FAIL, 0.6, **{REJECTED_ATTR: "NaN"})  # counts, but is no failure
    state = progress(study)
    assert (state.complete, state.failed, state.pruned, state.running, state.waiting) == (
        1, 2, 1, 0, 1)
    assert state.finished == 4 and not state.done(5)
    assert state.has_work(4)  # the WAITING retry is work even when the places are taken
    assert state.counted_failures == 1  # what max_failure_rate bounds


def test_only_one_of_the_workers_racing_for_the_last_place_wins() -> None:
    study = optuna.create_study()
    _add(study, TrialState.COMPLETE, 0.1)
    a, b = study.ask(), study.ask()  # two workers asked at once; one place is left
    assert not is_surplus(study, a.number, n_trials=2)
    assert is_surplus(study, b.number, n_trials=2)


def test_build_pruner_by_name_and_path() -> None:
    assert isinstance(build_pruner(StudyConfig(pruner="median")), optuna.pruners.MedianPruner)
    assert isinstance(build_pruner(StudyConfig(pruner="hyperband")),
                      optuna.pruners.HyperbandPruner)
    assert isinstance(build_pruner(StudyConfig(pruner="none")), optuna.pruners.NopPruner)
    custom = build_pruner(StudyConfig(pruner="tests.sweep_helpers.AlwaysPrune"))
    assert type(custom).__name__ == "AlwaysPrune"


def test_trial_names_and_override_values() -> None:
    assert trial_run_name(7, {"optimizer.lr": 0.041234, "+tracking.tags.w": "a",
                              "trainer.epochs": 3}) == "t7 lr=0.0412 w=a epochs=3"
    assert override_value("plain") == "plain"
    assert override_value("has space") == "'has space'"
    assert override_value("it's") == "'it\\'s'"
    assert override_value(None) == "null" and override_value(True) == "true"
    assert override_value(0.5) == "0.5"


def test_stop_request_writes_the_stop_file_and_exit_code(tmp_path: Path) -> None:
    stop = StopRequest(tmp_path / "stop")
    with stop.installed(), stop.launching():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert (tmp_path / "stop").exists()
        assert stop.exit_code == 128 + signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert not (tmp_path / "stop").exists()
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_a_ctrl_c_swallowed_during_the_set_up_stops_the_sweep_before_its_workers_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python runs a signal handler wherever the main thread is, a garbage collector's
    callback included, where the KeyboardInterrupt it raises is printed and dropped (seen
    while MLflow opened its store: the sweep then ran all its trials). The sweep's handler
    remembers it, and the workers do not start."""
    swallowed: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_value))

    class Collected:
        def __del__(self) -> None:  # like SQLAlchemy's weakref callbacks
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs here, and its exception goes nowhere

    stop = StopRequest(tmp_path / "stop")
    with stop.installed():
        Collected()
        assert swallowed and isinstance(swallowed[0], KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt), stop.launching():
            pytest.fail("the workers started after a Ctrl-C")
    assert not (tmp_path / "stop").exists()


def test_a_signal_inside_a_deferred_step_of_the_set_up_is_acted_on_after_it(
    tmp_path: Path,
) -> None:
    stop = StopRequest(tmp_path / "stop")
    steps: list[str] = []
    with stop.installed(), pytest.raises(Terminated):
        with stop.deferred():  # the MLflow parent run being created: not cut in half
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            steps.append("recorded")
        steps.append("went on")
    assert steps == ["recorded"]


def test_graceful_stop_waits_for_a_safe_point_and_a_second_signal_stops_at_once() -> None:
    with graceful_stop():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # delivered: nothing raised mid-work, only remembered
        assert stop_pending()
        with pytest.raises(Terminated):
            check_stop()
        with pytest.raises(KeyboardInterrupt):  # a second signal does not wait
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert not stop_pending()
    check_stop()  # outside the block: nothing pending, nothing raised


def test_watchdog_turns_the_stop_file_into_sigterm(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from zsharp_sweeps.training.signals import Terminated, check_stop, graceful_stop\n"
        "from zsharp_sweeps.sweep.lifecycle import watchdog\n"
        f"with graceful_stop(), watchdog({str(tmp_path / 'stop')!r}, main_pid=-1):\n"
        "    print('ready', flush=True)\n"
        "    try:\n"
        "        for _ in range(1200):\n"
        "            time.sleep(0.05)\n"
        "            check_stop()\n"
        "    except Terminated:\n"
        "        print('terminated', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "ready"
    (tmp_path / "stop").touch()
    out, _ = proc.communicate(timeout=20)
    assert out.strip() == "terminated" and proc.returncode == 0


def _plans(tmp_path: Path, storage: str, study_name: str, devices: list[str],
           space: dict, n_trials: int, main_pid: int, fixed: list[str] | None = None
           ) -> tuple[StudyPlan, HostPlan]:
    study = StudyPlan(
        study_name=study_name, storage=storage, n_trials=n_trials, max_failure_rate=0.0,
        space=space, fixed_overrides=list(fixed or []),
        make_sampler=functools.partial(optuna.samplers.RandomSampler), sampler_seed=0,
        directions=["maximize"], sweep_dir=str(tmp_path / "sweep"),
        objectives=["best_val_acc"], epoch_metric="val_acc",
    )
    host = HostPlan(devices=devices, trials_per_device=1, main_pid=main_pid,
                    stop_file=str(tmp_path / "stop"))
    return study, host


def test_worker_runs_trials_in_process_with_its_data_kept_warm(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from zsharp_sweeps.train import task

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="w", storage=storage, direction="maximize")
    # hardware.warmup_steps=2: the worker trains 2 steps of the base config before its first
    # trial (on CUDA that is the default; on a CPU it is off unless asked).
    fixed = ["data=digits", "hardware=cpu", "model=mlp", "model.params.hidden=16",
             "trainer.epochs=1", "trainer.progress=false", "tracking=off", "sharpness=none",
             "hardware.warmup_steps=2"]
    with worker_job(fixed, tmp_path / "sweep", task) as job, caplog.at_level(logging.INFO):
        job.study, job.host = _plans(
            tmp_path, storage, "w", ["cpu:0", "cpu:1"],
            {"optimizer.lr": CategoricalDistribution([0.05, 0.1])}, 3, os.getpid(), fixed)
        summary = Worker.join(job, index=1).run()
    # Every trial, the first included, found the data the warm-up built.
    assert summary == {"worker": summary["worker"], "device": "cpu:1", "trials": 3,
                       "warmup_s": summary["warmup_s"], "stopped": None, "data_cache_hits": 3}
    assert summary["warmup_s"] > 0
    assert re.search(r"Worker \S+/1 warmed up in [\d.]+s \(2 steps, fp32\)", caplog.text)
    study = optuna.load_study(study_name="w", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert {t.user_attrs["worker"]["device"] for t in study.trials} == {"cpu:1"}
    assert {t.user_attrs["worker"]["warmup_s"] for t in study.trials} == {summary["warmup_s"]}
    # A reused (warm) dataset trains exactly like a fresh one: 3 trials over 2 choices, so
    # at least two share their parameters, and those reach the same value.
    by_lr: dict[float, list[float]] = {}
    for trial in study.trials:
        by_lr.setdefault(trial.params["optimizer.lr"], []).append(trial.value)
    repeated = [values for values in by_lr.values() if len(values) > 1]
    assert repeated and all(len(set(values)) == 1 for values in repeated), by_lr
    for trial in study.trials:
        folder = tmp_path / "sweep" / str(trial.number)
        assert (folder / ".hydra" / "config.yaml").is_file()
        assert f"optimizer.lr={trial.params['optimizer.lr']}" in (
            folder / ".hydra" / "overrides.yaml").read_text()
        assert set(trial.user_attrs["metrics"]) >= {"best_val_acc", "final_test_acc"}
        assert len(trial.user_attrs["curves"]["val_acc"]) == 1


def test_a_stop_between_a_trials_ask_and_its_training_interrupts_it(tmp_path: Path) -> None:
    """The signal is acted on at the trial's first safe point, before training: the trial
    is told FAIL but marked interrupted, so it does not count and a resume retries it."""
    from zsharp_sweeps.train import task

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=storage, direction="maximize")
    fixed = ["data=digits", "hardware=cpu", "model=mlp", "model.params.hidden=16",
             "trainer.epochs=1", "trainer.progress=false", "tracking=off", "sharpness=none"]
    with worker_job(fixed, tmp_path / "sweep", task) as job:
        job.study, job.host = _plans(
            tmp_path, storage, "s", ["cpu:0"],
            {"optimizer.lr": CategoricalDistribution([0.05, 0.1])}, 2, os.getpid(), fixed)
        worker = Worker.join(job, index=0)
        with graceful_stop():
            os.kill(os.getpid(), signal.SIGTERM)  # pending until the next check_stop()
            with pytest.raises(Terminated):
                worker.study.optimize(worker.objective, n_trials=1, catch=(Exception,))
        study = optuna.load_study(study_name="s", storage=storage)
        (trial,) = study.trials
        assert trial.state == TrialState.FAIL and trial.user_attrs[INTERRUPTED_ATTR] is True
        assert trial.user_attrs["fail_reason"] == "interrupted (SIGTERM): retried"
        assert progress(study).failed == 0 and progress(study).finished == 0
        # Its retry copies its user attributes; the stale reason goes.
        _retry(worker.study, trial, None)
        worker.study.optimize(worker.objective, n_trials=1, catch=(Exception,))
    retry = optuna.load_study(study_name="s", storage=storage).trials[1]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["fail_reason"] is None


@pytest.mark.slow
def test_a_failed_trial_is_one_line_with_its_reason_and_epoch_lines_name_their_trial(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A diverged trial: one log line with what diverged, where and what to try (no Hydra
    "Error executing job" line, no traceback), and that line as the trial's ``fail_reason``
    user attribute (optuna-dashboard, the report). Epoch lines of parallel workers
    interleave in one log: each starts with its trial (``[t0] epoch 1/1: ...``)."""
    from dataclasses import replace

    from zsharp_sweeps.sweep.progress import FAIL_REASON_ATTR
    from zsharp_sweeps.train import task

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="d", storage=storage, direction="maximize")
    study.enqueue_trial({"optimizer.lr": 0.05})
    study.enqueue_trial({"optimizer.lr": 1e30})
    fixed = ["data=digits", "hardware=cpu", "model=mlp", "model.params.hidden=16",
             "optimizer=sgd", "trainer.epochs=1", "trainer.max_steps_per_epoch=3",
             "tracking=off", "sharpness=none"]
    with worker_job(fixed, tmp_path / "sweep", task) as job, caplog.at_level(logging.INFO):
        plan, job.host = _plans(tmp_path, storage, "d", ["cpu:0"],
                                {"optimizer.lr": CategoricalDistribution([0.05, 1e30])}, 2,
                                os.getpid(), fixed)
        job.study = replace(plan, max_failure_rate=1.0)
        Worker.join(job, index=0).run()
    good, diverged = optuna.load_study(study_name="d", storage=storage).trials
    assert (good.state, diverged.state) == (TrialState.COMPLETE, TrialState.FAIL)
    reason = diverged.user_attrs[FAIL_REASON_ATTR]
    assert reason.startswith("the run diverged: training loss nan at epoch 1 (first at step 2 "
                             "of 3, global step 2) with optimizer.lr=1e+30; try "), reason
    assert FAIL_REASON_ATTR not in good.user_attrs
    failed = [r for r in caplog.records if "trial 1 failed" in r.getMessage()]
    assert [r.getMessage().split(" (t1 ")[0] for r in failed] == [f"trial 1 failed: {reason}"]
    # (Optuna's own records of it are dropped by its handler's filter: test above.)
    assert not [r for r in caplog.records if r.exc_info and not r.name.startswith("optuna")]
    assert "Error executing job" not in capsys.readouterr().err
    trial_log = (tmp_path / "sweep" / "0" / "train.log").read_text()
    assert re.search(r"\] - \[t0\] epoch 1/1: train_loss=", trial_log), trial_log


def test_prestarted_worker_processes_wait_for_a_job_and_end_when_discarded() -> None:
    """The sweeper starts the worker processes before its study exists (their imports take
    seconds); those that get no job (the sweep failed first) end with nothing done."""
    import multiprocessing

    from hydra_plugins.zsharp_workers_launcher.launcher import WorkersLauncher

    before = set(multiprocessing.active_children())
    launcher = WorkersLauncher()
    launcher.prestart(2)
    started = set(multiprocessing.active_children()) - before
    assert len(started) == 2 and all(p.is_alive() for p in started)
    launcher.prestart(2)  # already there: no more
    assert len(set(multiprocessing.active_children()) - before) == 2
    launcher.discard()
    assert all(not p.is_alive() and p.exitcode == 0 for p in started)
    assert not set(multiprocessing.active_children()) - before


def _mark_slot(folder: Path, slot: int) -> None:
    (folder / f"slot{slot}").write_text(str(os.getpid()))


def test_each_prestarted_process_warms_up_for_the_job_it_will_get(tmp_path: Path) -> None:
    """``warm(i)`` runs in the i-th prestarted process before any job comes, and that
    process is the one ``launch`` hands its i-th job (the order of ``_idle``); a top-up
    for a larger launch (as ``launch`` calls it) warms its new process as the next slot."""
    from hydra_plugins.zsharp_workers_launcher.launcher import WorkersLauncher

    launcher = WorkersLauncher(start_method="fork")
    try:
        launcher.prestart(2, warm=functools.partial(_mark_slot, tmp_path))
        launcher._fill(3)  # launch's top-up
        deadline = time.time() + 30
        while len(list(tmp_path.glob("slot*"))) < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert {p.name: int(p.read_text()) for p in tmp_path.glob("slot*")} == {
            f"slot{i}": slot.proc.pid for i, slot in enumerate(launcher._idle)}
    finally:
        launcher.discard()


def test_a_failed_warm_up_leaves_the_process_waiting_for_its_job(tmp_path: Path) -> None:
    from hydra_plugins.zsharp_workers_launcher.launcher import WorkersLauncher

    launcher = WorkersLauncher(start_method="fork")
    launcher.prestart(1, warm=functools.partial(_mark_slot, tmp_path / "missing"))
    (proc,) = [slot.proc for slot in launcher._idle]
    time.sleep(1.0)
    assert proc.is_alive()  # it still waits for its job
    launcher.discard()
    assert proc.exitcode == 0


def test_the_sweeper_prestarts_each_worker_on_the_device_its_job_will_have(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four workers, two per GPU: the processes started before the study exists are told
    the devices ``HostPlan.device_for`` gives their jobs, in launch order."""
    from types import SimpleNamespace

    from hydra_plugins.zsharp_optuna_sweeper.sweeper import WORKER_MODULES, ZSharpOptunaSweeper
    from zsharp_sweeps.sweep.placement import prepin_slot

    calls: list[tuple] = []

    class Launcher:
        def prestart(self, n_workers, preload=(), warm=None):
            calls.append(("prestart", n_workers, tuple(preload), warm))

        def discard(self):
            calls.append(("discard",))

    sweeper = ZSharpOptunaSweeper(sampler=None, direction="maximize", storage=None,
                                  study_name=None, n_trials=8, n_jobs=4,
                                  max_failure_rate=0.0, custom_search_space=None, params=None,
                                  devices=["cuda:0", "cuda:1"])
    sweeper.launcher = Launcher()
    sweeper.app = SimpleNamespace(hardware=SimpleNamespace(device="cuda", trials_per_gpu=2))
    for name in ("_check_urls", "_check_configs", "_check_devices", "_warn_recipe_conflicts"):
        monkeypatch.setattr(sweeper, name, lambda *args: None)
    monkeypatch.setattr(sweeper, "_search_space",
                        lambda arguments: (SimpleNamespace(pinned=[], fixed=[]), None))
    monkeypatch.setattr(sweeper, "_storage_url", lambda: "sqlite://")
    monkeypatch.setattr(sweeper, "_sweep",
                        lambda *args: calls.append(("sweep", args[-1])))
    sweeper._set_up_and_sweep([], stop=None)
    (_, n, preload, warm), sweep, discard = calls
    assert (n, preload) == (4, WORKER_MODULES)
    labels = ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert warm.func is prepin_slot and warm.args == (labels,)
    plan = HostPlan(devices=["cuda:0", "cuda:1"], trials_per_device=2, main_pid=0,
                    stop_file="")
    assert labels == [plan.device_for(i) for i in range(4)]
    assert sweep == ("sweep", ["cuda:0", "cuda:1"]) and discard == ("discard",)


def test_the_join_line_says_how_long_cuda_took_before_the_job(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose process started CUDA before its job says so in its join line, in the
    form scripts/sweep_scaling.py reads; one that did not adds nothing."""
    import importlib.util

    import zsharp_sweeps.sweep.placement as placement

    spec = importlib.util.spec_from_file_location(
        "sweep_scaling", Path(__file__).resolve().parents[1] / "scripts" / "sweep_scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    line = ("Worker vm/0 on cuda:0 joined study bench 1.1s after launch (process 0.4s, "
            "study 0.7s, device 0.0s{})")
    monkeypatch.setattr(placement, "_prepinned", None)
    assert Worker._early_device.fget(None) == ""
    assert scaling.JOIN.findall(line.format("")) == [("1.1", "0.4", "0.7", "0.0", "")]
    monkeypatch.setattr(placement, "_prepinned", placement.Prepinned(
        "cuda:0", placement.Pinned("cuda:0", "GPU-aaaa", isolated=True), 0.87))
    note = Worker._early_device.fget(None)
    assert note == "; CUDA was ready before the job: 0.9s then"
    assert scaling.JOIN.findall(line.format(note)) == [("1.1", "0.4", "0.7", "0.0", "0.9")]


def test_a_worker_forked_after_cuda_started_says_to_spawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch refuses CUDA in a child forked after the parent started it; the worker's error
    names the setting that avoids it."""
    import zsharp_sweeps.sweep.placement as placement

    def refuse(*args, **kwargs):
        raise RuntimeError("Cannot re-initialize CUDA in forked subprocess. To use CUDA with "
                           "multiprocessing, you must use the 'spawn' start method")

    monkeypatch.setattr(placement, "pin_gpu", refuse)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="f", storage=storage, direction="maximize")
    with worker_job([], tmp_path / "sweep", lambda cfg: 0.0) as job:
        job.study, job.host = _plans(tmp_path, storage, "f", ["cuda:1"], {}, 1, -1)
        with pytest.raises(RuntimeError, match="hydra.launcher.start_method=spawn"):
            Worker.join(job, index=0).run()
    assert optuna.load_study(study_name="f", storage=storage).trials == []


def test_optuna_records_of_failed_trials_are_dropped() -> None:
    """A failed or interrupted trial: the worker's one line says it, with its reason (and
    logs the traceback of a bug itself); Optuna's two records of it are dropped. Its other
    warnings stay."""
    import io
    import logging

    from zsharp_sweeps.sweep.quiet import quiet_failed_trials
    from zsharp_sweeps.training.signals import Terminated

    optuna.logging.enable_default_handler()
    quiet_failed_trials()
    quiet_failed_trials()  # twice: one filter
    handler = logging.getLogger("optuna").handlers[0]
    assert len(handler.filters) == 1
    logger = optuna.logging.get_logger("optuna.study._optimize")
    stream = handler.setStream(io.StringIO())
    try:
        for exc in (KeyboardInterrupt(), Terminated(), ValueError("diverged")):
            try:
                raise exc
            except BaseException:
                logger.warning(f"Trial 0 failed with parameters: {{}} because of the following "
                               f"error: {exc!r}.", exc_info=True)
        logger.warning("Trial 0 failed with value None.")
        optuna.logging.get_logger("optuna.samplers").warning("something else")
    finally:
        err = handler.setStream(stream).getvalue()
    assert "Trial 0" not in err and "Traceback" not in err
    assert "something else" in err
