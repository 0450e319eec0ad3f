"""The verdict's settings and plan, in-process: what is refused before anything exists, and
what each stage's sweep is told to run."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from zsharp_sweeps.config import ConfigError
from zsharp_sweeps.verdict.plan import (
    build_plan,
    differences,
    fingerprint,
    training_overrides,
)
from zsharp_sweeps.verdict.settings import load_settings, register_verdict_schema

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
BASE = ["data=digits", "model=mlp", "hardware=cpu"]


@pytest.fixture
def compose_verdict(tmp_path):
    register_verdict_schema()

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="verdict", overrides=[
                *BASE, f"verdict.dir={tmp_path}/v", *overrides])
            settings = load_settings(cfg.verdict)
            common = training_overrides([*BASE, *[o for o in overrides
                                                  if not o.startswith("verdict")]], settings)
            return cfg, settings, common

    return _compose


def _plan(compose_verdict, *overrides: str):
    cfg, settings, common = compose_verdict(*overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        plans, final_epochs = build_plan(settings, common, "sqlite:////tmp/x.db")
    return settings, common, plans, final_epochs


@pytest.mark.slow
def test_the_default_protocol_compares_five_optimizers_with_equal_budgets(compose_verdict):
    settings, common, plans, final_epochs = _plan(compose_verdict)
    assert [p.name for p in plans] == ["sgd", "sam", "asam", "fsam", "zsharp"]
    assert settings.reference == "zsharp"
    assert settings.name == "verdict-equal_budget-mlp-digits"
    assert {p.tune.n_trials for p in plans} == {16}
    assert final_epochs == 200  # trainer.epochs of conf/trainer/default.yaml
    zsharp = next(p for p in plans if p.name == "zsharp").tune.overrides
    assert "optimizer=zsharp" in zsharp and "trainer.epochs=10" in zsharp
    assert "seed=0" in zsharp and "sharpness=none" in zsharp
    assert "study.pruner=hyperband" in zsharp and "hydra/sweeper/sampler=tpe" in zsharp
    assert "optimizer.percentile=interval(0.5, 0.99)" in zsharp
    assert "optimizer.lr=tag(log, interval(0.01, 0.5))" in zsharp
    # ASAM's rho on its own paper's scale, not SAM's
    asam = next(p for p in plans if p.name == "asam").space
    assert asam["optimizer.rho"] == "tag(log, interval(0.1, 5.0))"
    # every arm tunes on the same sampler seed and pruner, in its own study
    studies = [p.tune.study_name for p in plans]
    assert len(set(studies)) == 5
    assert all("hydra.sweeper.sampler.seed=0" in p.tune.overrides for p in plans)


def test_the_lr_range_follows_the_base_optimizer_of_the_model_recipe(compose_verdict):
    # model=vit brings Adam at 1e-3 (conf/model/optimizer/vit_*.yaml): an SGD lr range
    # would diverge every trial.
    _s, _c, plans, _e = _plan(compose_verdict, "model=vit",
                              "verdict.optimizers=[sgd,sam,zsharp]")
    lr = {plan.name: plan.space["optimizer.lr"] for plan in plans}
    assert lr == {"sgd": "tag(log, interval(0.01, 0.5))",  # plain SGD stays SGD
                  "sam": "tag(log, interval(1e-4, 1e-2))",
                  "zsharp": "tag(log, interval(1e-4, 1e-2))"}


@pytest.mark.slow
def test_the_review_grid_preset_is_the_papers_grid(compose_verdict):
    settings, _c, plans, _e = _plan(compose_verdict, "verdict=review_grid")
    zsharp = next(p for p in plans if p.name == "zsharp")
    assert zsharp.space == {"optimizer.lr": "choice(0.01, 0.05, 0.1)",
                            "optimizer.percentile": "choice(0.5, 0.7, 0.9)"}
    assert zsharp.tune.n_trials == 9
    assert next(p for p in plans if p.name == "sgd").tune.n_trials == 3  # capped at its grid
    assert "hydra/sweeper/sampler=grid" in zsharp.tune.overrides
    assert len(settings.final.seeds) == 5


@pytest.mark.parametrize(("override", "message"), [
    ("verdict.reference=adamw", "verdict.reference='adamw' is invalid: allowed one of the "
                               "compared arms"),
    ("verdict.optimizers=[sgd,nope]", "verdict.optimizers='nope' is invalid"),
    ("verdict.final.seeds=[0,1,2]", "seeds that tuning never used"),
    ("verdict.final.seeds=[5]", "at least 2 seeds"),
    ("verdict.tune.trials=0", "verdict.tune.trials=0 is invalid: allowed >= 1"),
    ("verdict.tune.sampler=bayes", "allowed one of tpe, random, grid, cmaes"),
])
def test_bad_protocol_settings_are_one_line_naming_the_setting(compose_verdict, override,
                                                                message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        compose_verdict(override)


@pytest.mark.parametrize(("override", "owner"), [
    ("optimizer=sam", "verdict.optimizers"),
    ("optimizer.lr=0.1", "it is tuned"),
    ("optimizer.percentile=0.9", "it is tuned"),
    ("seed=3", "verdict.final.seeds"),
    ("study.pruner=median", "verdict.tune.pruner"),
])
def test_training_overrides_the_verdict_owns_are_refused(compose_verdict, override, owner):
    with pytest.raises(ConfigError, match=f"{override} is set by the verdict: use .*{owner}"):
        compose_verdict(override)


def test_shared_training_settings_pass_through(compose_verdict):
    _cfg, _s, common = compose_verdict("optimizer.weight_decay=1e-4", "trainer.epochs=3")
    assert common == [*BASE, "optimizer.weight_decay=1e-4", "trainer.epochs=3"]


def test_a_space_edge_that_no_arm_accepts_is_refused_before_anything_exists(compose_verdict):
    with pytest.raises(ConfigError, match=r"optimizer.percentile=70.0 is invalid.*verdict arm "
                                          r"zsharp with"):
        _plan(compose_verdict, "verdict.optimizers=[sgd,zsharp]",
              "verdict.arms.zsharp.space={optimizer.percentile: 'interval(0.5, 70)'}")


@pytest.mark.slow
def test_a_resume_with_other_settings_names_each_difference(compose_verdict):
    s1, c1, p1, e1 = _plan(compose_verdict, "verdict.optimizers=[sgd,zsharp]")
    s2, c2, p2, e2 = _plan(compose_verdict, "verdict.optimizers=[sgd,zsharp,sam]",
                           "verdict.tune.trials=20", "verdict.tune.epochs=4")
    old, new = fingerprint(s1, c1, p1, e1), fingerprint(s2, c2, p2, e2)
    assert differences(old, new) == ["tune.epochs: 10 -> 4", "tune.trials: 16 -> 20"]
    # an arm added later is not a difference; resources are not part of the fingerprint
    _s3, c3, p3, e3 = _plan(compose_verdict, "verdict.optimizers=[sgd,zsharp]",
                            "hardware.trials_per_gpu=2")
    assert differences(old, fingerprint(s1, c3, p3, e3)) == []
    assert OmegaConf.create(old)  # JSON-able, as stored in the study


@pytest.mark.slow
def test_a_resume_that_changes_what_is_measured_is_refused(compose_verdict, tmp_path):
    from zsharp_sweeps.config import TrackingConfig
    from zsharp_sweeps.verdict.app import prepare

    off = TrackingConfig(enabled=False)

    def prepared(*overrides: str):
        _cfg, settings, common = compose_verdict(*overrides)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return prepare(settings, common, off, 1)

    first = prepared("verdict.optimizers=[sgd,zsharp]")
    assert first.state.get("fingerprint")["tune"]["trials"] == 16
    with pytest.raises(ConfigError, match=r"was started with other settings \(tune.trials: "
                                          r"16 -> 3\): rerun with the settings it started "
                                          r"with, or start a new verdict"):
        prepared("verdict.optimizers=[sgd,zsharp]", "verdict.tune.trials=3")
    # more workers, another reference, an added arm: the same verdict goes on
    again = prepared("verdict.optimizers=[sgd,zsharp,sam]", "verdict.reference=sgd",
                     "verdict.n_jobs=4")
    assert set(again.state.get("fingerprint")["arms"]) == {"sgd", "zsharp", "sam"}


def test_the_stages_run_on_the_launcher_the_command_line_names(compose_verdict):
    _s, common, plans, _e = _plan(compose_verdict, "verdict.optimizers=[sgd,zsharp]",
                                  "+launcher=slurm", "hydra.launcher.partition=gpu")
    tune = plans[0].tune.overrides
    assert "+launcher=slurm" in tune and "hydra.launcher.partition=gpu" in tune
    assert "hydra/launcher=zsharp_workers" not in tune
    final = plans[0].final(_s, common, {"optimizer.lr": 0.1}, 2, "sqlite:////tmp/x.db",
                           Path("/tmp/v"), "v")
    assert "+launcher=slurm" in final.overrides and "optimizer.lr=0.1" in final.overrides
    _s, _c, plans, _e = _plan(compose_verdict, "verdict.optimizers=[sgd,zsharp]")
    assert "hydra/launcher=zsharp_workers" in plans[0].tune.overrides  # one host: workers


def test_an_arm_whose_tuning_never_completed_fails_in_one_line(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from zsharp_sweeps.config import TrackingConfig
    from zsharp_sweeps.sweep.records import StudyStore
    from zsharp_sweeps.tracking import Tracker
    from zsharp_sweeps.verdict.app import Verdict
    from zsharp_sweeps.verdict.plan import ArmPlan, Stage
    from zsharp_sweeps.verdict.runner import StageFailed
    from zsharp_sweeps.verdict.settings import ArmConfig, VerdictConfig

    url = f"sqlite:///{tmp_path}/optuna.db"
    store = StudyStore(url, "v")
    study = optuna.create_study(study_name="v.tune.sgd", storage=store.storage,
                                direction="maximize")
    for state in (TrialState.PRUNED, TrialState.FAIL):
        study.tell(study.ask(), state=state)
    settings = VerdictConfig(name="v", dir=str(tmp_path), optimizers=["sgd"], reference="sgd",
                             arms={"sgd": ArmConfig(optimizer="sgd")})
    plan = ArmPlan("sgd", Stage("tune", "sgd", "v.tune.sgd", 2, str(tmp_path / "tune-sgd"), ()),
                   ("optimizer=sgd",), {})
    verdict = Verdict(settings, [], [plan], 2, url, store,
                      Tracker(TrackingConfig(enabled=False)), 1)
    with pytest.raises(StageFailed, match=r"arm sgd: study v.tune.sgd: no tuning trial "
                                          r"completed \(1 pruned, 1 failed\): see .*sweep.log"):
        verdict.selected(plan)
