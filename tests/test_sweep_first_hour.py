"""What a researcher meets in the first hour of sweeping (issue 25, part A): search spaces that
follow the model's recipe, a command-line value that pins a swept key, a resume that never
mixes settings, a resumed sweep that says how far it is, ``+sweep=`` without ``--multirun``.

The refusals run the real entry point in-process (``train.main`` with ``sys.argv``, as
``test_errors.py`` does): they stop before any trial, so no worker starts. One subprocess sweep
of one-epoch trials on a tiny MLP covers what needs trials to run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from zsharp_sweeps import train
from zsharp_sweeps.sweep.sampling import parse_search_space

from .sweep_helpers import REPO, load_study, run_sweep

SMALL_RUN = ["data=digits", "model=mlp", "model.params.hidden=16", "hardware=cpu",
             "trainer.epochs=1", "trainer.progress=false", "sharpness=none"]
TINY_SWEEP = ("--multirun", "+sweep=zsharp_rho_qp_lr", *SMALL_RUN, "tracking=off",
              "hydra.sweeper.sampler.n_startup_trials=1")
TINY_STUDY = "zsharp_rho_qp_lr-mlp-digits"


def run_main(argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the entry point in-process in ``cwd``; its exit status and its stderr."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["zsharp_sweeps.train", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train.main()
    return info.value.code, capsys.readouterr().err


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# ---- 6. +sweep= without --multirun ---------------------------------------------------------


def test_a_sweep_config_without_multirun_is_one_line_and_trains_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stderr = run_main(["+sweep=zsharp_rho_qp_lr", *SMALL_RUN, "tracking=off"], tmp_path,
                            monkeypatch, capsys)
    assert code == 2
    line = _one_line(stderr)
    assert "+sweep=zsharp_rho_qp_lr" in line and "--multirun" in line
    assert not list(tmp_path.rglob("checkpoints"))


# ---- 3. a command-line value pins a swept key ----------------------------------------------


def test_a_plain_value_after_a_range_pins_the_key() -> None:
    space = parse_search_space([
        "optimizer.lr=tag(log, interval(0.01, 0.5))", "optimizer.rho=interval(0.01, 0.5)",
        "data=digits", "optimizer.lr=1e6",
    ])
    assert list(space.distributions) == ["optimizer.rho"]
    assert space.pinned == ["optimizer.lr"]
    assert space.fixed == ["data=digits", "optimizer.lr=1e6"]
    # A range given after a plain value still sweeps (the last override wins).
    again = parse_search_space(["optimizer.lr=0.1", "optimizer.lr=choice(0.01, 0.1)"])
    assert list(again.distributions) == ["optimizer.lr"] and again.pinned == []
