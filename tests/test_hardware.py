"""``hardware=auto`` (zsharp_sweeps/training/hardware.py): what it resolves to on CPU, on CUDA
and on MPS (both pretended: the functions that ask the device are monkeypatched), explicit
values winning, what a run records, and the compile cache reaching runs and sweep workers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from zsharp_sweeps.config import ConfigError, DataConfig, TrainConfig, TrainerConfig, validate
from zsharp_sweeps.training import hardware
from zsharp_sweeps.training.hardware import (
    auto_hardware,
    estimate_steps,
    resolve,
    resolve_config,
    resolve_hardware,
    use_compile_cache,
)

from .conftest import CONF_DIR, REPO

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
LONG, SHORT = 70_200, 3_510  # steps of a 200-epoch and a 10-epoch CIFAR-10 run at batch 128


@pytest.fixture
def h100(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA card with bf16 (compute capability 9.0) where torch.compile works."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(hardware, "compile_supported", lambda: True)


def _hw(**explicit):
    return replace(auto_hardware(), **explicit)


def test_auto_on_cpu_is_fp32_eager() -> None:
    res = resolve(auto_hardware(), CPU, LONG)
    assert (res.precision, res.channels_last, res.compile, res.cuda_graph) == (
        "fp32", False, False, False)
    assert res.mode == "fp32" and res.auto == hardware.SETTINGS
    assert "fp32 (no faster mode is measured to learn the same on cpu)" in res.summary()


def test_auto_on_mps_is_fp32_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    res = resolve(auto_hardware(), MPS, LONG)
    assert res.mode == "fp32" and not (res.channels_last or res.compile or res.cuda_graph)
    assert "on mps" in res.reasons["precision"]


@pytest.mark.usefixtures("h100")
def test_auto_on_a_bf16_cuda_card() -> None:
    long = resolve(auto_hardware(), CUDA, LONG)
    assert long.mode == "bf16+cl+compile+graph"
    assert "70,200 steps ahead >= hardware.compile_min_steps=20,000" in long.reasons["compile"]
    short = resolve(auto_hardware(), CUDA, SHORT)
    assert short.mode == "bf16+cl+graph"
    assert "3,510 steps ahead < hardware.compile_min_steps=20,000" in short.reasons["compile"]
    assert resolve(auto_hardware(), CUDA, None).mode == "bf16+cl+graph"  # unknown: no compile
    assert resolve(_hw(compile_min_steps=3_000), CUDA, SHORT).compile


def test_auto_on_an_older_cuda_card(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(hardware, "compile_supported", lambda: False)
    res = resolve(auto_hardware(), CUDA, LONG)
    assert res.mode == "fp32+graph"  # no bf16 (V100); the graph replays fp32 eager exactly
    assert "7.0 lacks bf16" in res.reasons["precision"]
    assert "cannot run here" in res.reasons["compile"]


@pytest.mark.usefixtures("h100")
def test_explicit_values_win_over_auto() -> None:
    fp32 = resolve(_hw(precision="fp32"), CUDA, LONG)
    assert fp32.mode == "fp32+compile+graph" and "precision" not in fp32.auto
    assert resolve(_hw(precision="fp16"), CUDA, SHORT).mode == "fp16"  # a scaler: no graph
    assert resolve(_hw(compile=True), CUDA, 10).mode == "bf16+cl+compile+graph"
    assert resolve(_hw(cuda_graph=False, channels_last=False), CUDA, SHORT).mode == "bf16"
    cuda = resolve(validate_hw("hardware=cuda"), CUDA, LONG)  # the faithful reference
    assert cuda.mode == "fp32" and cuda.auto == ()
    assert "all settings explicit" in cuda.summary()


def validate_hw(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return validate(compose(config_name="config", overrides=list(overrides))).hardware


def test_the_default_config_is_auto_and_keeps_explicit_values() -> None:
    default = validate_hw()
    assert (default.precision, default.channels_last, default.compile, default.cuda_graph) == (
        "auto", "auto", "auto", "auto")
    mixed = validate_hw("hardware.precision=fp32", "hardware.compile=true")
    assert (mixed.precision, mixed.compile, mixed.cuda_graph) == ("fp32", True, "auto")
    with pytest.raises(ConfigError, match=r"hardware\.compile='maybe'.*true, false or auto"):
        validate_hw("hardware.compile=maybe")
    with pytest.raises(ConfigError, match=r"hardware\.precision='fp8'.*auto"):
        validate_hw("hardware.precision=fp8")


def test_steps_ahead() -> None:
    assert estimate_steps(TrainConfig()) == 351 * 200  # (50,000 - 5,000) // 128 per epoch
    short = TrainConfig(trainer=TrainerConfig(epochs=3, max_steps_per_epoch=10))
    assert estimate_steps(short) == 30
    synthetic = TrainConfig(data=DataConfig(name="synthetic", synthetic_size=1000, val_size=100,
                                            batch_size=64, train_subset=500))
    assert estimate_steps(synthetic) == 500 // 64 * 200


@pytest.mark.usefixtures("h100")
def test_resolved_config_and_tags(caplog: pytest.LogCaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = TrainConfig(hardware=_hw(compile_cache=str(tmp_path / "cache")),
                      trainer=TrainerConfig(epochs=10))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    with caplog.at_level(logging.INFO, logger="zsharp_sweeps.training.hardware"):
        resolved, tags = resolve_hardware(cfg, CUDA)
    hw = resolved.hardware
    assert (hw.precision, hw.channels_last, hw.compile, hw.cuda_graph) == ("bf16", True, False, True)
    assert tags["hardware_mode"] == "bf16+cl+graph"
    assert "precision: bf16 (compute capability 9.0" in tags["hardware_auto"]
    assert tags["compile_cache"] == str(tmp_path / "cache")
    assert "hardware on cuda: bf16+cl+graph" in caplog.text  # printed at start
    assert resolve_config(resolved, CUDA)[0] == resolved  # resolving again changes nothing


def test_compile_cache_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", hardware.CACHE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = tmp_path / "xdg" / "zsharp-sweeps" / "inductor"
    assert use_compile_cache(None) == str(default) and default.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(default)
    assert os.environ["TRITON_CACHE_DIR"] == str(default / "triton")
    # The default does not move a cache directory set already; a setting or the variable does.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache(None) == str(tmp_path / "mine")
    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path / "env"))
    assert use_compile_cache(None) == str(tmp_path / "env")
    assert use_compile_cache(str(tmp_path / "setting")) == str(tmp_path / "setting")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchs-own")
    assert use_compile_cache("off") == "/tmp/torchs-own"  # off: torch's default stays
    assert os.environ["TRITON_CACHE_DIR"] == str(default / "triton")  # the user's is kept


def _mlflow_runs(cwd: Path) -> list:
    client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    experiments = client.search_experiments()
    return [run for e in experiments for run in client.search_runs([e.experiment_id])]


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
                        hardware.CACHE_ENV)}
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    return env


RUN = ["data=digits", "model=mlp", "model.params.hidden=16", "hardware=auto",
       "hardware.device=cpu", "trainer.epochs=1", "trainer.max_steps_per_epoch=2",
       "trainer.progress=false", "sharpness=none"]


@pytest.mark.long
@pytest.mark.slow  # a training run and a 2-worker sweep through the command line
def test_a_run_and_every_sweep_worker_use_the_compile_cache(tmp_path: Path) -> None:
    from .sweep_helpers import make_mlflow_template, seed_mlflow_store

    cache = tmp_path / "compile-cache"
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    template = make_mlflow_template(tmp_path)
    for cwd in (run_dir, sweep_dir):
        cwd.mkdir()
        seed_mlflow_store(template, cwd)
    proc = subprocess.run(
        [sys.executable, "-m", "zsharp_sweeps.train", *RUN, f"hardware.compile_cache={cache}"],
        cwd=run_dir, env=_env(cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hardware on cpu: fp32 (auto: precision: fp32" in proc.stdout + proc.stderr
    (run,) = _mlflow_runs(run_dir)
    assert run.data.tags["compile_cache"] == str(cache)
    assert run.data.tags["hardware_mode"] == "fp32"
    assert run.data.params["hardware.precision"] == "fp32"  # resolved, not "auto"
    assert run.data.params["hardware.cuda_graph"] == "False"
    proc = subprocess.run(
        [sys.executable, "-m", "zsharp_sweeps.train", "--multirun", "+sweep=zsharp_rho_qp_lr",
         *RUN, f"hardware.compile_cache={cache}", "hydra.sweeper.n_trials=2",
         "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.n_startup_trials=2"],
        cwd=sweep_dir, env=_env(cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    children = [r for r in _mlflow_runs(sweep_dir) if "trial_number" in r.data.tags]
    assert len(children) == 2
    for r in children:  # read back from the environment of the worker process that ran it
        assert r.data.tags["compile_cache"] == str(cache)


COMPILE_TWICE = """
import json, torch
from zsharp_sweeps.training.hardware import use_compile_cache
use_compile_cache(None)  # $ZSHARP_COMPILE_CACHE, as a sweep worker or a later sweep would
f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
f(torch.randn(4, 8))
from torch._dynamo.utils import counters
print(json.dumps(dict(counters["inductor"])))
"""


@pytest.mark.long
@pytest.mark.slow  # two cold starts of torch.compile's C++ toolchain (~20 s on 2 cores)
def test_a_second_process_hits_the_compile_cache(tmp_path: Path) -> None:
    env = _env(tmp_path)
    env[hardware.CACHE_ENV] = str(tmp_path / "cache")
    counts = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", COMPILE_TWICE], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert counts[0].get("fxgraph_cache_miss", 0) >= 1
    assert counts[1].get("fxgraph_cache_hit", 0) >= 1 and not counts[1].get("fxgraph_cache_miss")
    assert (tmp_path / "cache" / "fxgraph").is_dir()


def test_building_from_an_unresolved_config_resolves_it() -> None:
    """``build_parts``/``build_step`` called with ``hardware=auto`` values (a user's own loop)
    build what a run would: nothing is taken for truthy "auto"."""
    from zsharp_sweeps.config import ModelConfig
    from zsharp_sweeps.training.build import build_parts, build_step

    cfg = TrainConfig(data=DataConfig(name="synthetic", synthetic_like="digits",
                                      synthetic_size=200, val_size=20, batch_size=16),
                      model=ModelConfig(name="mlp"), hardware=auto_hardware())
    data, model, optimizer = build_parts(cfg, CPU)
    step = build_step(cfg, model, optimizer)
    assert (step.channels_last, step.amp_dtype, step.run is step.eager) == (False, None, True)
    loss, _ = step(*next(iter(data.train)))
    assert torch.isfinite(loss)
