"""The sweep report on small real Optuna studies with real MLflow runs (no training).

The main study mimics ``compare_optimizers`` crossed with the ZSharp space: three
configurations (two ZSharp, one SAM) over seeds 0 and 1, a pruned and a failed trial, and
two trials the sweeper flagged as not counting whose poisoned numbers must not show.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from zsharp_sweeps.config import TrackingConfig
from zsharp_sweeps.report import counted_trials, study_view, sweep_figures, write_report
from zsharp_sweeps.report.__main__ import main
from zsharp_sweeps.report.plots import IMPORTANCE_MIN_TRIALS, TrialCurve, val_curves_figure
from zsharp_sweeps.report.tables import compare, format_table, paired_test, seed_table
from zsharp_sweeps.tracking import Tracker

RHO, QP, LR = "optimizer.rho", "optimizer.percentile", "optimizer.lr"
SPACE = {
    "optimizer": CategoricalDistribution(["zsharp", "sam"]),
    RHO: FloatDistribution(0.01, 0.5, log=True),
    QP: FloatDistribution(0.5, 0.99),
    LR: FloatDistribution(0.01, 0.5, log=True),
    "seed": CategoricalDistribution([0, 1]),
}
A = {"optimizer": "zsharp", RHO: 0.05, QP: 0.9, LR: 0.1}
B = {"optimizer": "zsharp", RHO: 0.2, QP: 0.6, LR: 0.02}
C = {"optimizer": "sam", RHO: 0.05, QP: 0.9, LR: 0.1}  # A's numbers, another optimizer
# (config, seed, state, validation objective, final test accuracy, user attrs)
TRIALS = [
    (A, 0, TrialState.COMPLETE, 0.82, 0.80, {}),
    (A, 1, TrialState.COMPLETE, 0.86, 0.84, {}),
    (B, 0, TrialState.COMPLETE, 0.61, 0.60, {}),
    (B, 1, TrialState.COMPLETE, 0.69, 0.70, {}),
    (C, 0, TrialState.COMPLETE, 0.80, 0.78, {}),
    (C, 1, TrialState.COMPLETE, 0.81, 0.80, {}),
    ({"optimizer": "zsharp", RHO: 0.01, QP: 0.55, LR: 0.3}, 0, TrialState.PRUNED, 0.3, None, {}),
    ({"optimizer": "zsharp", RHO: 0.4, QP: 0.95, LR: 0.45}, 1, TrialState.FAIL, None, None, {}),
    (A, 0, TrialState.FAIL, 0.10, 0.10, {"interrupted": True}),
    (A, 1, TrialState.COMPLETE, 0.0, 0.0, {"zsharp:surplus": True}),
]
EPOCHS = 3


def _curve(value: float, state: TrialState) -> list[float]:
    """Per-epoch val_acc ending at ``value``; a pruned trial stops after epoch 1."""
    points = [value - 0.2, value - 0.1, value]
    return points[:1] if state == TrialState.PRUNED else points


def _add_trial(study: optuna.Study, params: dict, value, state: TrialState, attrs: dict) -> int:
    space = {k: SPACE[k] for k in params}
    curve = _curve(value, state) if value is not None else []
    trial = create_trial(
        params=params, distributions=space, state=state, user_attrs=attrs,
        values=None if state != TrialState.COMPLETE else [value],
        intermediate_values={i + 1: v for i, v in enumerate(curve)},
    )
    study.add_trial(trial)
    return study.trials[-1].number


def _run(client: MlflowClient, experiment_id: str, parent: str, tags: dict, params: dict,
         curve: list[float], test_acc: float | None) -> str:
    run_id = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent, **tags}).info.run_id
    metrics = [Metric("val_acc", v, 0, epoch) for epoch, v in enumerate(curve, start=1)]
    if test_acc is not None:
        metrics.append(Metric("final_test_acc", test_acc, 0, EPOCHS))
    client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run_id, "FINISHED" if test_acc is not None else "KILLED")
    return run_id


def _tracker(mlflow_uri: str, experiment: str) -> Tracker:
    return Tracker(TrackingConfig(uri=mlflow_uri, experiment=experiment))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str):
    """The main study on disk (as a sweep leaves it) and its MLflow runs; report written once."""
    root = tmp_path_factory.mktemp("sweep")
    tracker = _tracker(mlflow_uri, "test-report-main")
    client = MlflowClient(mlflow_uri)
    parent = client.create_run(tracker.experiment_id, tags={"sweep": "true"}).info.run_id
    study = optuna.create_study(study_name="mini", storage=f"sqlite:///{root / 'optuna.db'}",
                                direction="maximize")
    study.set_user_attr("mlflow_parent_run_id", parent)
    for config, seed, state, value, test_acc, attrs in TRIALS:
        number = _add_trial(study, {**config, "seed": seed}, value, state, attrs)
        curve = _curve(value, state) if value is not None else []
        tags = {"trial_number": str(number), "study_name": "mini", "optimizer": config["optimizer"]}
        params = {**{k: v for k, v in config.items() if k != "optimizer"}, "seed": seed}
        _run(client, tracker.experiment_id, parent, tags, params, curve, test_acc)
    report = write_report(study, root / "report", tracker=tracker)
    return {"root": root, "study": study, "files": report, "tracker": tracker, "parent": parent}


def test_seed_table_groups_by_configuration_and_seed(sweep) -> None:
    seeds = pd.read_csv(sweep["root"] / "report" / "seeds.csv")
    assert list(seeds["optimizer"]) == ["zsharp", "sam", "zsharp"]  # best validation first
    assert list(seeds[RHO]) == [0.05, 0.05, 0.2]
    assert list(seeds["n"]) == [2, 2, 2]  # the interrupted and surplus trials do not count
    assert list(seeds["test_acc_mean"]) == pytest.approx([0.82, 0.79, 0.65])
    assert list(seeds["test_acc_std"]) == pytest.approx(
        [0.02 * math.sqrt(2), 0.01 * math.sqrt(2), 0.05 * math.sqrt(2)])
    assert list(seeds["objective_mean"]) == pytest.approx([0.84, 0.805, 0.65])
    summary = (sweep["root"] / "report" / "summary.txt").read_text()
    assert "final test accuracy per configuration over seeds" in summary


def test_every_plot_and_table_is_written_and_returned(sweep) -> None:
    out = sweep["root"] / "report"
    expected = {"history.png", "importances.png", "slice.png", "contour.png",
                "parallel_coordinate.png", "val_curves.png", "best_settings.csv", "trials.csv",
                "seeds.csv", "summary.txt", "report.md"}
    assert {p.name for p in sweep["files"]} == expected
    for path in sweep["files"]:
        assert path.parent == out and path.stat().st_size > 100, path
    markdown = (out / "report.md").read_text()
    for image in ("history", "slice", "contour", "val_curves"):
        assert f"![{image}]({image}.png)" in markdown


def test_pruned_and_failed_trials_show_with_their_state_excluded_ones_do_not(sweep) -> None:
    trials = pd.read_csv(sweep["root"] / "report" / "trials.csv")
    assert list(trials["trial"]) == list(range(8))  # 8 (interrupted) and 9 (surplus) left out
    assert list(trials["state"]) == ["COMPLETE"] * 6 + ["PRUNED", "FAIL"]
    pruned = trials.iloc[6]
    assert (pruned["epochs"], pruned["last_reported"]) == (1, pytest.approx(0.1))
    # seed is swept: a replicate, so the best settings are configurations over their seeds,
    # never one seed's run
    best = pd.read_csv(sweep["root"] / "report" / "best_settings.csv")
    assert "seed" not in best.columns and "trial" not in best.columns
    assert list(best["optimizer"]) == ["zsharp", "sam", "zsharp"]
    assert list(best["objective_mean"]) == pytest.approx([0.84, 0.805, 0.65])
    assert list(best["n_seeds"]) == [2, 2, 2]
    assert "2 not counted (retried, surplus or waiting)" in (
        sweep["root"] / "report" / "summary.txt").read_text()


@pytest.fixture(scope="module")
def figures(sweep):
    """The optuna figures of the main study, before they are saved."""
    study = sweep["study"]
    made, _ = sweep_figures(study_view(study, counted_trials(study)), ["objective"])
    yield made
    for fig in made.values():
        plt.close(fig)


def test_log_sampled_params_get_log_axes(figures) -> None:
    scales = {ax.get_xlabel(): ax.get_xscale() for ax in figures["slice"].axes if ax.get_xlabel()}
    assert scales[RHO] == scales[LR] == "log"
    assert scales[QP] == "linear"
    contour = {ax.get_xlabel(): ax.get_xscale() for ax in figures["contour"].axes
               if ax.get_xlabel()}
    assert contour == {RHO: "log", QP: "linear", LR: "log"}  # no seed: noise, not a setting
    figures["slice"].canvas.draw()
    rho_axis = next(ax for ax in figures["slice"].axes if ax.get_xlabel() == RHO)
    low, high = rho_axis.get_xlim()
    labels = [t.get_text() for t in rho_axis.get_xticklabels() if low <= t.get_position()[0] <= high]
    assert labels == ["0.05", "0.1", "0.2"]  # plain numbers at 1-2-5, not 2x10^-2 minor labels


def test_importances_warn_with_few_trials(sweep, figures) -> None:
    assert 6 < IMPORTANCE_MIN_TRIALS
    title = figures["importances"].axes[0].get_title(loc="left")
    assert "WARNING" in title and "6 complete trials" in title
    markdown = (sweep["root"] / "report" / "report.md").read_text()
    assert "> **WARNING: importances from only 6 complete trials" in markdown


def test_a_seed_is_never_ranked_or_sliced_as_a_hyperparameter(figures) -> None:
    figures["importances"].canvas.draw()
    ranked = {t.get_text() for t in figures["importances"].axes[0].get_yticklabels()}
    assert "seed" not in ranked and RHO in ranked
    assert "seed" not in {ax.get_xlabel() for ax in figures["slice"].axes}


def test_val_curves_one_legend_entry_per_trial_and_integer_epochs() -> None:
    curves = [
        TrialCurve(0, "COMPLETE", {RHO: 0.0512345, "seed": 0}, [(1, 0.5), (2, 0.6), (3, 0.7)]),
        TrialCurve(3, "PRUNED", {RHO: 0.2, "seed": 1}, [(1, 0.2)]),
        TrialCurve(4, "COMPLETE", {RHO: 0.1, "seed": 0}, [(1, 0.4), (2, 0.5), (3, 0.8)]),
    ]
    fig = val_curves_figure(curves, "validation accuracy per trial")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["#0 rho=0.0512 seed=0", "#3 rho=0.2 seed=1 (pruned)", "#4 rho=0.1 seed=0"]
    assert len({line.get_color() for line in ax.get_lines()}) == 3
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    plt.close(fig)


def test_val_curves_from_mlflow_cover_counted_trials(sweep) -> None:
    from zsharp_sweeps.report import mlflow_results

    study = sweep["study"]
    results = mlflow_results(sweep["tracker"], sweep["parent"], counted_trials(study))
    assert [c.number for c in results.curves] == [0, 1, 2, 3, 4, 5, 6]  # 7 failed: no epochs
    assert results.curves[6].state == "PRUNED" and len(results.curves[6].points) == 1
    epochs, values = zip(*results.curves[0].points)
    assert epochs == (1, 2, 3) and values == pytest.approx((0.62, 0.72, 0.82))
    assert len(results.seed_runs) == 6


def test_cli_compare_pairs_best_configurations_by_seed(sweep, tmp_path: Path, capsys) -> None:
    uri = sweep["tracker"].uri
    rc = main([str(sweep["root"]), "--out", str(tmp_path), "--tracking-uri", uri,
               "--experiment", "test-report-main", "--compare", "zsharp,sam"])
    assert rc == 0
    assert "paired test zsharp - sam on final test accuracy across seeds" in capsys.readouterr().out
    # zsharp's best configuration by validation is A: test 0.80, 0.84 against sam's 0.78, 0.80;
    # differences 0.02, 0.04: mean 0.03, sample std 0.02/sqrt(2), t = 0.03 / (std/sqrt(2)) = 3.
    paired = pd.read_csv(tmp_path / "compare_zsharp_sam.csv").iloc[0]
    assert paired["n"] == 2
    assert paired["mean_diff"] == pytest.approx(0.03)
    assert paired["std_diff"] == pytest.approx(0.02 / math.sqrt(2))
    assert paired["t_stat"] == pytest.approx(3.0)
    assert paired["p_value"] == pytest.approx(0.2048, abs=1e-4)  # t(1 dof), two-sided
    logged = {a.path for a in MlflowClient(uri).list_artifacts(sweep["parent"], "report")}
    assert {"report/seeds.csv", "report/val_curves.png", "report/report.md"} <= logged


@pytest.mark.parametrize("argv, message", [
    (["--compare", "zsharp"], "give two optimizers"),
    (["--compare", "zsharp,adamw"], "no runs for 'adamw'"),
    (["--compare", "sam,sam"], "two different optimizers"),
    (["--compare", "zsharp,sam", "--no-mlflow"], "--compare needs the sweep's MLflow runs"),
])
def test_cli_bad_compare_is_a_one_line_error(sweep, tmp_path: Path, capsys, argv, message) -> None:
    rc = main([str(sweep["root"]), "--out", str(tmp_path), "--tracking-uri",
               sweep["tracker"].uri, "--experiment", "test-report-main", *argv])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_nested_seed_runs_and_a_single_parameter(tmp_path: Path, mlflow_uri: str) -> None:
    """``study.n_seeds=2``: each trial is a group run whose nested runs are the seeds."""
    tracker = _tracker(mlflow_uri, "test-report-nested")
    client = MlflowClient(mlflow_uri)
    parent = client.create_run(tracker.experiment_id).info.run_id
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("mlflow_parent_run_id", parent)
    for rho, (t0, t1) in ((0.05, (0.7, 0.9)), (0.3, (0.5, 0.6))):
        number = _add_trial(study, {RHO: rho}, (t0 + t1) / 2, TrialState.COMPLETE, {})
        tags = {"trial_number": str(number), "optimizer": "zsharp"}
        group = _run(client, tracker.experiment_id, parent, {**tags, "n_seeds": "2"},
                     {RHO: rho}, [0.5, 0.6, (t0 + t1) / 2], None)
        for seed, acc in enumerate((t0, t1)):
            _run(client, tracker.experiment_id, group, {**tags, "seed": str(seed)},
                 {RHO: rho, "seed": seed}, [0.5, 0.6, acc], acc)
    files = write_report(study, tmp_path, tracker=tracker)
    seeds = pd.read_csv(tmp_path / "seeds.csv")
    assert list(seeds[RHO]) == [0.05, 0.3]
    assert list(seeds["n"]) == [2, 2]
    assert list(seeds["test_acc_mean"]) == pytest.approx([0.8, 0.55])
    assert list(seeds["test_acc_std"]) == pytest.approx([0.2 / math.sqrt(2), 0.1 / math.sqrt(2)])
    names = {p.name for p in files}
    assert {"slice.png", "importances.png", "val_curves.png"} <= names
    assert "contour.png" not in names and "parallel_coordinate.png" not in names
    markdown = (tmp_path / "report.md").read_text()
    assert "not drawn: contour and parallel coordinates need 2+ varying parameters" in markdown


def test_single_trial_without_mlflow(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    _add_trial(study, {RHO: 0.05, QP: 0.9}, 0.7, TrialState.COMPLETE, {})
    files = write_report(study, tmp_path)
    assert {p.name for p in files} == {"best_settings.csv", "trials.csv", "history.png",
                                       "slice.png", "summary.txt", "report.md"}
    summary = (tmp_path / "summary.txt").read_text()
    assert "not drawn: importances need 2+ complete trials" in summary
    assert "not drawn: MLflow not read" in summary


def test_no_complete_trial(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    _add_trial(study, {RHO: 0.05}, 0.2, TrialState.PRUNED, {})
    files = write_report(study, tmp_path)
    assert not [p for p in files if p.suffix == ".png"]
    summary = (tmp_path / "summary.txt").read_text()
    assert "(no complete trials)" in summary and "PRUNED" in summary


def test_failed_trials_show_why_they_failed(tmp_path: Path) -> None:
    """A failed trial's reason (the ``fail_reason`` user attribute a worker sets, one line)
    is in the summary and in trials.csv; a trial from before it existed says so."""
    study = optuna.create_study(direction="maximize")
    _add_trial(study, {RHO: 0.05}, 0.7, TrialState.COMPLETE, {})
    reason = ("the run diverged: training loss nan at epoch 1 (first at step 2 of 3, global "
              "step 2) with optimizer.lr=1e+06; try a smaller optimizer.lr")
    _add_trial(study, {RHO: 0.2}, None, TrialState.FAIL, {"fail_reason": reason})
    _add_trial(study, {RHO: 0.3}, None, TrialState.FAIL, {})
    write_report(study, tmp_path)
    summary = (tmp_path / "summary.txt").read_text()
    assert "failed trials (why):" in summary
    assert f"    1  {reason}" in summary.splitlines()
    assert "    2  (no reason recorded)" in summary.splitlines()
    trials = pd.read_csv(tmp_path / "trials.csv", keep_default_na=False)
    assert list(trials["fail_reason"]) == ["", reason, "(no reason recorded)"]


def test_multi_objective_report_has_pareto_front(tmp_path: Path) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    space = {RHO: SPACE[RHO], QP: SPACE[QP]}
    for rho, qp, acc, sharp in ((0.05, 0.9, 0.8, 0.3), (0.1, 0.7, 0.7, 0.1),
                                (0.2, 0.6, 0.6, 0.5)):
        study.add_trial(create_trial(params={RHO: rho, QP: qp}, distributions=space,
                                     values=[acc, sharp]))
    files = {p.name for p in write_report(study, tmp_path)}
    assert {"pareto.png", "history_objective0.png", "slice_objective1.png",
            "contour_objective0.png"} <= files
    best = pd.read_csv(tmp_path / "best_settings.csv")
    assert list(best["trial"]) == [0, 1]  # (0.6, 0.5) is dominated by both
    assert "None" not in (tmp_path / "summary.txt").read_text()  # no epoch reports: '-'


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` showed the module docstring's reStructuredText (double backticks)."""
    import re

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and not re.search(r":[a-z]+:`", out), out
    assert "Write a sweep's report again" in out and "--compare zsharp,sam" in out


def test_format_table_uses_pandas_layout() -> None:
    text = format_table([{"optimizer": "zsharp", "acc": 0.8123456, "std": float("nan")}])
    assert text.splitlines() == ["optimizer    acc  std", "   zsharp 0.8123    -"]
    assert format_table([], empty="(no rows)") == "(no rows)"
    assert seed_table(pd.DataFrame()).empty


def test_optuna_plots_leave_no_experimental_warning_and_no_style_behind() -> None:
    study = optuna.create_study(direction="maximize")
    for rho, qp, value in ((0.05, 0.9, 0.7), (0.2, 0.6, 0.5), (0.1, 0.8, 0.6)):
        _add_trial(study, {RHO: rho, QP: qp}, value, TrialState.COMPLETE, {})
    with warnings.catch_warnings():  # setting up, not under test
        warnings.simplefilter("ignore")
        study.set_metric_names(["objective"])
    facecolor = plt.rcParams["axes.facecolor"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figures, _ = sweep_figures(study_view(study, counted_trials(study)), ["objective"])
    for fig in figures.values():
        plt.close(fig)
    assert set(figures) == {"history", "slice", "importances", "contour", "parallel_coordinate"}
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    assert plt.rcParams["axes.facecolor"] == facecolor  # optuna's plt.style.use("ggplot") undone


def test_paired_test_uses_only_the_seeds_both_ran() -> None:
    result = paired_test([0.90, 0.92, 0.91], [0.88, 0.91, 0.89])
    assert result["n"] == 3 and result["mean_diff"] == pytest.approx(0.05 / 3)
    assert result["t_stat"] == pytest.approx(5.0) and 0.03 < result["p_value"] < 0.04
    by_seed = {"zsharp": {0: [0.9], 1: [0.92], 2: [0.91]}, "sam": {0: [0.88], 1: [0.91], 3: [0.5]}}
    assert compare(by_seed, "zsharp", "sam")["n"] == 2  # seeds 0 and 1
    assert math.isnan(paired_test([0.5, 0.75], [0.25, 0.5])["t_stat"])  # constant difference
