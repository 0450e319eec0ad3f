"""The MLflow page a sweep links to (``zsharp_sweeps/tracking/view.py``): a saved view of the
sweep's trials, best first, with the objective, sharpness and swept parameters as columns.

What MLflow 3.17's page does with it was checked in a headless browser (docs/sweeps.md has
the screenshot); these tests pin the link and the view's content as that page reads them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from zsharp_sweeps.tracking.view import (
    EXPERIMENTS_PAGE,
    SHARED_VIEW_TAG_PREFIX,
    VIEW_KEY_TAG,
    SweepView,
    column,
    latest_sweep_link,
    main,
    parse_view_url,
    publish,
    trials_table,
    ui_base_url,
    view_url,
)

SWEPT = ["optimizer.rho", "optimizer.percentile", "optimizer.lr"]


def _view(**kw) -> SweepView:
    return SweepView(parent_run_id="p123", objective="best_val_acc", params=SWEPT, **kw)


def test_link_opens_the_runs_table_on_the_view_and_carries_no_search_facet() -> None:
    url = view_url("http://127.0.0.1:5000/", "7", "zsharp-abc")
    # /runs and workflowType: a fresh browser lands on the GenAI overview otherwise, and
    # the share key is lost on the way to the runs table.
    assert url == ("http://127.0.0.1:5000/#/experiments/7/runs?"
                   "workflowType=machine_learning&viewStateShareKey=zsharp-abc")
    assert parse_view_url(url) == ("7", "zsharp-abc")
    # MLflow ignores a shared view when the URL itself has a search facet.
    for facet in ("searchFilter", "orderByKey", "orderByAsc", "startTime", "lifecycleFilter"):
        assert facet not in url
    with pytest.raises(ValueError, match="not a sweep view link"):
        parse_view_url("http://127.0.0.1:5000/#/experiments/7")


def test_view_sorts_by_the_objective_and_shows_it_sharpness_and_the_swept_params() -> None:
    state = _view().state()
    assert state["searchFilter"] == "tags.mlflow.parentRunId = 'p123'"  # the trials only
    assert state["orderByKey"] == "metrics.`best_val_acc`"
    assert state["orderByAsc"] is False  # maximised: best first
    assert state["selectedColumns"][:3] == [
        "metrics.`best_val_acc`", "metrics.`final_test_acc`", "metrics.`sharpness/sam`"]
    assert [c for c in state["selectedColumns"] if c.startswith("params.")] == [
        "params.`optimizer.rho`", "params.`optimizer.percentile`", "params.`optimizer.lr`"]
    assert "tags.`run_state`" in state["selectedColumns"]  # pruned trials say so
    # The page never takes expanded rows from a view; sorted by a metric it does not nest.
    assert "runsExpanded" not in state
    assert column("params", "optimizer.lr") == "params.`optimizer.lr`"
    # Names and headers shown whole: MLflow applies a view's widths to the columns its
    # order names, and the run-name column is ``attributes.`Run Name` ``.
    assert state["columnOrder"] == ["attributes.`Run Name`", *state["selectedColumns"]]
    assert set(state["columnWidths"]) == set(state["columnOrder"])
    assert state["columnWidths"]["attributes.`Run Name`"] >= 300
    assert state["columnWidths"]["params.`optimizer.percentile`"] > 100

    minimised = SweepView("p1", "final_val_loss", maximize=False, params=SWEPT).state()
    assert minimised["orderByKey"] == "metrics.`final_val_loss`"
    assert minimised["orderByAsc"] is True
    assert minimised["selectedColumns"][0] == "metrics.`final_val_loss`"
    assert SweepView("p1", None).state()["orderByKey"] == "attributes.`start_time`"


def test_charts_tab_opens_on_the_sweeps_charts_for_every_trial() -> None:
    # MLflow's default: one chart per metric, train_loss first, for the first 10 runs.
    state = _view().state()
    assert state["runsHiddenMode"] == "SHOW_ALL"
    assert state["isAccordionReordered"] is True  # the sweep's section stays first
    [section] = state["compareRunSections"]
    charts = state["compareRunCharts"]
    assert {c["metricSectionId"] for c in charts} == {section["uuid"]}
    assert [c["type"] for c in charts] == ["BAR", "PARALLEL", *["SCATTER"] * 4, "LINE"]
    assert charts[0]["metricKey"] == "best_val_acc"
    assert charts[1]["selectedParams"] == SWEPT and charts[1]["selectedMetrics"] == ["best_val_acc"]
    assert [c["xaxis"] for c in charts[2:6]] == [
        *({"key": p, "type": "PARAM"} for p in SWEPT),
        {"key": "sharpness/sam", "type": "METRIC"}]
    assert all(c["yaxis"] == {"key": "best_val_acc", "type": "METRIC"} for c in charts[2:6])
    assert charts[-1]["metricKey"] == "val_acc"  # the curves behind the objective
    assert "train_loss" not in json.dumps(charts)
    assert SweepView("p1", None).state()["compareRunCharts"] == []


def test_view_is_a_saved_view_envelope_with_a_stable_key() -> None:
    view = _view(name="sweep s")
    value = json.loads(view.tag_value(created_ms=5))
    assert value["name"] == "sweep s" and value["createdAt"] == 5
    assert json.loads(value["state"]) == view.state()
    assert view.key() == _view(name="sweep s").key()  # publishing again adds no tag
    assert view.key() != SweepView("p999", "best_val_acc", params=SWEPT).key()
    assert view.key().startswith("zsharp-")


def _run(trial: str, value: float | None, state: str = "COMPLETE", run_id: str | None = None):
    metrics = {} if value is None else {"best_val_acc": value, "sharpness/sam": 0.1}
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id or f"r{trial}", run_name=f"t{trial}", status="FINISHED"),
        data=SimpleNamespace(tags={"trial_number": trial, "run_state": state},
                             metrics=metrics, params={"optimizer.lr": "0.1"}))


def test_trials_table_is_best_first_and_names_the_best_run() -> None:
    runs = [_run("0", 0.5), _run("1", 0.9), _run("2", None, "FAILED"), _run("3", 0.9),
            _run("4", 0.95, "PRUNED")]
    rows, best = trials_table(runs, _view())
    assert [r["trial"] for r in rows] == ["4", "1", "3", "0", "2"]  # ties by trial number
    assert best == "r1"  # the best *complete* run
    assert rows[0]["optimizer.lr"] == "0.1" and rows[-1]["best_val_acc"] is None
    # The study's best trial wins over the order (a retried trial has an older run too).
    runs.append(_run("3", 0.9, "KILLED", run_id="r3-old"))
    assert trials_table(runs, _view(), best_trial=3)[1] == "r3"


def test_ui_base_url() -> None:
    assert ui_base_url("sqlite:////x/mlflow.db") == "http://127.0.0.1:5000"
    assert ui_base_url("http://host:8080/") == "http://host:8080"
    assert ui_base_url("postgresql://u@h/db", "http://h:5001") == "http://h:5001"


def test_make_ui_prints_the_newest_sweeps_view(tmp_path: Path, mlflow_template: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    missing = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    assert latest_sweep_link(missing) is None
    main(["--uri", missing])
    assert capsys.readouterr().out.strip() == f"MLflow UI: http://127.0.0.1:5000/{EXPERIMENTS_PAGE}"
    assert not (tmp_path / "none").exists()  # nothing created

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    assert latest_sweep_link(uri) is None  # no sweep yet
    for start, name in ((1000, "older"), (2000, "newer")):
        parent = client.create_run(exp, run_name=name, start_time=start).info.run_id
        view = SweepView(parent, "best_val_acc", params=SWEPT, name=name)
        key = publish(client, exp, view)
        client.set_tag(parent, VIEW_KEY_TAG, key)
    tags = client.get_experiment(exp).tags
    assert json.loads(json.loads(tags[SHARED_VIEW_TAG_PREFIX + key])["state"]) == view.state()
    assert publish(client, exp, view) == key  # idempotent
    assert latest_sweep_link(uri, "http://h:1") == view_url("http://h:1", exp, key)
    main(["--uri", uri])
    assert view_url("http://127.0.0.1:5000", exp, key) in capsys.readouterr().out
