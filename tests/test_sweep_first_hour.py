"""What a researcher meets in the first hour of sweeping (issue 25, part A): search spaces that
follow the model's recipe, a command-line value that pins a swept key, a resume that never
mixes settings, a resumed sweep that says how far it is, ``+sweep=`` without ``--multirun``.

The refusals run the real entry point in-process (``train.main`` with ``sys.argv``, as
``test_errors.py`` does): they stop before any trial, so no worker starts. One sweep
of one-epoch trials on a tiny MLP covers what needs trials to run, in-process too (with
``n_jobs=1`` the worker runs in the sweep's own process, as from a shell).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from zsharp_sweeps import train
from zsharp_sweeps.sweep.sampling import parse_search_space

from .cli_helpers import run_main
from .sweep_helpers import REPO, load_study

SMALL_RUN = ["data=digits", "model=mlp", "model.params.hidden=16", "hardware=cpu",
             "trainer.epochs=1", "trainer.progress=false", "sharpness=none"]
TINY_SWEEP = ("--multirun", "+sweep=zsharp_rho_qp_lr", *SMALL_RUN, "tracking=off",
              "hydra.sweeper.report=false",
              "hydra.sweeper.sampler.n_startup_trials=1")
TINY_STUDY = "zsharp_rho_qp_lr-mlp-digits"


def sweep_in_process(argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str]) -> str:
    """A sweep that succeeds, in-process (one worker runs in the sweep's own process, as
    with ``n_jobs=1`` from a shell): what it printed."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["zsharp_sweeps.train", *argv])
    capsys.readouterr()
    train.main()
    captured = capsys.readouterr()
    return captured.out + captured.err


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


# ---- 1. search spaces follow the model's recipe --------------------------------------------


def _compose(config: str, overrides: list[str]):
    from zsharp_sweeps.config import register_configs
    from zsharp_sweeps.verdict.settings import register_verdict_schema

    register_configs()
    register_verdict_schema()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config, overrides=overrides, return_hydra_config=config == "config")


SGD_LR, ADAM_LR = "tag(log, interval(0.01, 0.5))", "tag(log, interval(1e-4, 1e-2))"


@pytest.mark.parametrize(("overrides", "lr", "rho"), [
    (["+sweep=zsharp_rho_qp_lr"], SGD_LR, "tag(log, interval(0.01, 0.5))"),
    # model=vit brings Adam at lr 1e-3 (conf/model/optimizer/vit_zsharp.yaml): Adam's range.
    (["+sweep=zsharp_rho_qp_lr", "model=vit"], ADAM_LR, "tag(log, interval(0.01, 0.5))"),
    (["+sweep=zsharp_random", "optimizer.base=adamw"], ADAM_LR, "tag(log, interval(0.01, 0.5))"),
    # ASAM's rho on its paper's scale (its perturbation is scaled by |w|).
    (["+sweep=lr_rho_grid", "optimizer=asam"], "choice(0.01, 0.05, 0.1, 0.2, 0.3)",
     "choice(0.1, 0.5, 1.0)"),
])
def test_sweep_ranges_follow_the_optimizer_and_its_base(overrides, lr, rho) -> None:
    params = _compose("config", overrides).hydra.sweeper.params
    assert (params["optimizer.lr"], params["optimizer.rho"]) == (lr, rho)


def test_the_verdict_reads_the_same_ranges() -> None:
    cfg = _compose("verdict", ["model=vit"])
    verdict = OmegaConf.to_container(cfg.verdict, resolve=True)
    assert verdict["lr_space"] == OmegaConf.to_container(cfg.study.spaces.lr, resolve=True)
    assert verdict["lr_space"]["adam"] == ADAM_LR
    assert verdict["arms"]["asam"]["space"]["optimizer.rho"] == "tag(log, interval(0.1, 5.0))"


# ---- 1, 3, 4, 5 through a real sweep -------------------------------------------------------


@pytest.mark.slow
def test_pinned_keys_recipe_warnings_resume_progress_and_changed_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A plain value on the command line pins the key; a range that excludes the recipe's
    # value is flagged before anything starts.
    same = ("optimizer.lr=0.05", "optimizer.rho=tag(log, interval(0.1, 0.5))")
    out = sweep_in_process([*TINY_SWEEP, "hydra.sweeper.n_trials=1", *same], tmp_path,
                           monkeypatch, capsys)
    assert "Pinned on the command line, not swept: optimizer.lr=0.05" in out, out[-3000:]
    assert ("optimizer.rho: the swept range tag(log, interval(0.1, 0.5)) excludes the recipe's "
            "value optimizer.rho=0.05 (model=mlp, optimizer=zsharp)") in out
    study = load_study(tmp_path, TINY_STUDY)
    (trial,) = study.trials
    assert sorted(trial.params) == ["optimizer.percentile", "optimizer.rho"]
    ran = (tmp_path / "multirun" / TINY_STUDY / "0" / ".hydra" / "overrides.yaml").read_text()
    assert "optimizer.lr=0.05" in ran

    # Resumed with another fixed setting, or another space: refused in one line before any
    # trial.
    refusals = [
        (["trainer.epochs=2", *same], ["trainer.epochs: 1 -> 2", "allow_changed_settings=true",
                                       f"hydra.sweeper.study_name={TINY_STUDY}-2"]),
        (["optimizer.lr=0.05", "optimizer.rho=tag(log, interval(0.1, 0.4))"],
         ["search space optimizer.rho: FloatDistribution(high=0.5"]),
        # A kind of distribution Optuna cannot mix with the study's trials: always refused.
        ([*same, "optimizer.percentile=choice(0.5, 0.9)"],
         ["changed in a way Optuna cannot resume", "optimizer.percentile"]),
    ]
    for extra, named in refusals:
        argv = [*TINY_SWEEP, "hydra.sweeper.n_trials=3", *extra]
        code, stderr = run_main(argv, tmp_path, monkeypatch, capsys)
        assert code == 2, stderr[-3000:]
        line = _one_line(stderr)
        assert all(n in line for n in named), line
    assert len(load_study(tmp_path, TINY_STUDY).trials) == 1

    # Accepted deliberately: the resumed sweep says so, and how far the study is.
    out = sweep_in_process([*TINY_SWEEP, "hydra.sweeper.n_trials=2", "trainer.epochs=2", *same,
                            "hydra.sweeper.allow_changed_settings=true"],
                           tmp_path, monkeypatch, capsys)
    assert "2 trials (1 done, 1 to go), 1 worker(s)" in out
    assert "resumed with changed settings" in out and "trainer.epochs: 1 -> 2" in out
    assert len(load_study(tmp_path, TINY_STUDY).trials) == 2


# ---- 2. a sweep that did not learn says so, with advice that fits what ran -----------------


@pytest.mark.parametrize(("overrides", "says", "not_says"), [
    # ResNet-20 on SGD at a usual lr, 1 epoch: the epochs, not a ViT's recipe.
    (["model=resnet20", "optimizer.lr=0.04", "trainer.epochs=1"],
     "optimizer.base=sgd optimizer.lr=0.04 is a usual setting for resnet20, so 1 epoch(s) are "
     "probably too few", "ViT"),
    (["model=vit", "optimizer.base=sgd", "optimizer.lr=0.1"],
     "model=vit does not train with SGD", "epoch(s)"),
    (["model=vit", "optimizer.lr=0.3"],
     "optimizer.lr=0.3 is high for optimizer.base=adam: its usual range is "
     "tag(log, interval(1e-4, 1e-2))", "ViT"),
])
def test_the_did_not_learn_advice_fits_the_model_and_optimizer(overrides, says, not_says) -> None:
    from zsharp_sweeps.config import validate
    from zsharp_sweeps.training.health import learning_advice, learning_problem

    cfg = validate(_compose("config", ["data=digits", *overrides]))
    advice = learning_advice(cfg)
    assert says in advice and not_says not in advice
    problem = learning_problem([{"train_loss": 2.3, "val_acc": 0.11}], 10, 200, 1000, advice)
    assert problem.message.endswith(f"guessing): {advice}.")


def _study(best_val_accs: list[float]):
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    study = optuna.create_study(direction="maximize")
    for i, acc in enumerate(best_val_accs):
        study.add_trial(create_trial(
            value=acc, params={"optimizer.lr": 0.01 * (i + 1)},
            distributions={"optimizer.lr": FloatDistribution(0.001, 1.0)},
            user_attrs={"metrics": {"best_val_acc": acc, "chance_acc": 0.1636}}))
    return study


def test_a_report_whose_best_trial_is_at_chance_says_so_at_its_top(tmp_path: Path) -> None:
    from zsharp_sweeps.report import write_report

    write_report(_study([0.10, 0.145]), tmp_path / "chance")
    top = (tmp_path / "chance" / "summary.txt").read_text().splitlines()[:3]
    assert top[2].startswith("THE SWEEP DID NOT LEARN: its best trial (1, best_val_acc 0.1450) "
                             "is at chance (below 0.1636"), top
    write_report(_study([0.10, 0.9]), tmp_path / "learned")
    assert "DID NOT LEARN" not in (tmp_path / "learned" / "summary.txt").read_text()


@pytest.mark.slow
def test_the_readme_quick_sweep_learns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's quick sweep (``make sweep ARGS=...``, the Makefile's recipe), cut to its
    first trial: it learns well above chance (0.10). With ResNet-20 for 1 epoch, the former
    quick sweep, all 4 trials stayed at chance."""
    import re
    import shlex

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("A quick sweep on the CPU"):]
    args = shlex.split(re.search(r'make sweep ARGS="([^"]*)"', section).group(1))
    recipe = re.search(r"^sweep:\n\t\$\(PY\) -m zsharp_sweeps.train (.*)\$\(ARGS\)$",
                       (REPO / "Makefile").read_text(), re.M).group(1).split()
    assert recipe[:2] == ["--multirun", "+sweep=zsharp_rho_qp_lr"]
    args = [a for a in args if not a.startswith("hydra.sweeper.n_trials=")]
    sweep_in_process([*recipe, *args, "hydra.sweeper.n_trials=1", "tracking=off",
                      "trainer.progress=false", "hydra.sweeper.report=false"],
                     tmp_path, monkeypatch, capsys)
    model = next((a.split("=")[1] for a in [*recipe, *args] if a.startswith("model=")),
                 "resnet20")  # conf/config.yaml's default
    (trial,) = load_study(tmp_path, f"zsharp_rho_qp_lr-{model}-digits").trials
    assert trial.value > 0.5, trial


def test_a_study_fingerprints_what_trials_compute_not_where_they_run() -> None:
    from zsharp_sweeps.sweep.resume import differences, fixed_settings

    cfg = _compose("config", ["data=digits"])
    settings = fixed_settings(cfg, ["optimizer.lr", "+optimizer_shared.rho"])
    assert settings["trainer.epochs"] == "200" and settings["data.name"] == "'digits'"
    assert not [k for k in settings if k == "optimizer.lr" or k.startswith(
        ("optimizer_shared.rho", "tracking.", "hardware.device", "data.root", "hydra"))]
    # A group swept as a whole (optimizer=choice(sam, zsharp)) takes its subtree with it.
    assert not [k for k in fixed_settings(cfg, ["optimizer"]) if k.startswith("optimizer.")]
    moved = fixed_settings(_compose("config", ["data=digits", "hardware.device=cuda:3",
                                               "data.root=/mnt/elsewhere"]), ["optimizer.lr"])
    assert differences(settings, moved) == []
    longer = fixed_settings(_compose("config", ["data=digits", "trainer.epochs=5"]),
                            ["optimizer.lr"])
    assert differences(settings, longer) == ["trainer.epochs: 200 -> 5"]
