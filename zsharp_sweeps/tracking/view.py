"""The MLflow page a sweep opens on: its trials, best first, with the objective, sharpness
and the swept parameters as columns.

Why a saved view and not URL parameters: MLflow 3.17's experiment page takes the sort and the
filter from the URL (``searchFilter``, ``orderByKey``, ``orderByAsc``), but the visible columns
only from the browser's local storage or from a *shared view*: ``?viewStateShareKey=<key>``
makes the page apply the view held by the experiment tag ``mlflow.sharedViewState.<key>``
(what its "Share" button writes; a saved-view envelope ``{name, createdAt, updatedAt,
state}``, ``state`` the JSON of the search facets and the UI state). Checked in MLflow's
source (``useSharedExperimentViewState``, ``savedViewEnvelope``) and in a headless browser
(``docs/sweeps.md``). Three rules of that page decide the shape of the link:

- the view is ignored when the URL carries any search facet itself, so the link is only
  ``#/experiments/<id>/runs?workflowType=machine_learning&viewStateShareKey=<key>`` and
  sort and filter live in the view;
- expanded, pinned and hidden rows are never taken from a view, so child runs would stay
  folded under their parent; but the page nests children only when it is sorted by date or
  not at all: sorted by the objective, filtered to the parent's children, the trials are
  rows of their own;
- columns are named ``metrics.`name```, ``params.`name```, ``tags.`name``` and
  ``attributes.`Run Name``` (``makeCanonicalSortKey``).

``python -m zsharp_sweeps.tracking.view`` prints the link of the newest sweep in a store
(``make ui`` runs it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlencode, urlparse

#: Experiment tag prefix of MLflow's shared and saved views, and the URL parameter naming one.
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
SHARE_KEY_PARAM = "viewStateShareKey"
#: Where ``make ui`` serves the store (``mlflow ui --port 5000``).
DEFAULT_UI_URL = "http://127.0.0.1:5000"
#: Where a store without sweeps opens: the experiments list, runs tables rather than the
#: GenAI page MLflow 3 shows by default.
EXPERIMENTS_PAGE = "#/experiments?workflowType=machine_learning"
#: The parent run's tag that names its view (the key of ``SHARED_VIEW_TAG_PREFIX``).
VIEW_KEY_TAG = "mlflow_view"
#: The run-name column and its width in a sweep's view (MLflow's default: 190 px).
RUN_NAME_COLUMN = "attributes.`Run Name`"
RUN_NAME_WIDTH = 330
#: The charts section of a sweep's view (its cards carry this id).
CHART_SECTION = "zsharp-sweep"
#: Metrics shown after the objective when the trials have them.
EXTRA_METRICS = ("best_val_acc", "final_test_acc", "sharpness/sam")


def column(kind: str, name: str) -> str:
    """A runs-table column as MLflow names it: ``column("metrics", "val_acc")`` is
    ``metrics.`val_acc```; ``kind`` is ``metrics``, ``params``, ``tags`` or ``attributes``."""
    return f"{kind}.`{name}`"


def header_width(col: str) -> int:
    """A column's width in pixels that shows its whole header (MLflow's: ~100 px, which
    cuts ``final_test_acc`` and ``optimizer.percentile``)."""
    name = col.split(".", 1)[1].strip("`")
    return max(100, min(170, 24 + 7 * len(name)))


@dataclass(frozen=True)
class SweepView:
    """What the page shows of one sweep: the children of ``parent_run_id``, sorted by the
    metric ``objective`` (descending when ``maximize``), with ``params`` (the swept keys,
    as MLflow params) and ``metrics`` as columns."""

    parent_run_id: str
    objective: str | None
    maximize: bool = True
    params: Sequence[str] = ()
    metrics: Sequence[str] = EXTRA_METRICS
    name: str = "sweep"
    tags: Sequence[str] = field(default=("run_state",))
    #: The per-epoch metric behind the objective (``val_acc`` for ``best_val_acc``): the
    #: curves chart.
    curve: str | None = "val_acc"

    def columns(self) -> list[str]:
        metrics = [m for m in dict.fromkeys([*filter(None, [self.objective]), *self.metrics])]
        return ([column("metrics", m) for m in metrics]
                + [column("params", p) for p in dict.fromkeys(self.params)]
                + [column("tags", t) for t in self.tags])

    def state(self) -> dict:
        """The view as MLflow's experiment page reads it: search facets and UI state."""
        order = (column("metrics", self.objective) if self.objective
                 else column("attributes", "start_time"))
        return {
            "searchFilter": f"tags.mlflow.parentRunId = '{self.parent_run_id}'",
            "orderByKey": order,
            "orderByAsc": not self.maximize if self.objective else False,
            "startTime": "ALL",
            "lifecycleFilter": "Active",
            "modelVersionFilter": "All Runs",
            "datasetsFilter": [],
            "selectedColumns": self.columns(),
            # Widths apply to the columns named in the order (the page's restore rule):
            # trial names carry their values, wider than MLflow's 190 px.
            "columnOrder": [RUN_NAME_COLUMN, *self.columns()],
            "columnWidths": {RUN_NAME_COLUMN: RUN_NAME_WIDTH,
                             **{c: header_width(c) for c in self.columns()}},
            "runListHidden": False,
            "viewMaximized": False,
            # The charts tab: what a sweep asks (the objective per trial, the parameters
            # against it, sharpness against it, the curves), in one section first, for
            # every trial (MLflow's default charts are one per metric, train_loss first,
            # for the first 10 runs).
            "runsHiddenMode": "SHOW_ALL",
            "compareRunCharts": self.charts(),
            "compareRunSections": [{"uuid": CHART_SECTION, "name": self.name, "display": True,
                                    "isReordered": True, "deleted": False,
                                    "isGenerated": False}],
            "isAccordionReordered": True,
        }

    def charts(self) -> list[dict]:
        """The chart cards, as MLflow serialises ``RunsChartsCardConfig``s."""
        if not self.objective:
            return []

        def card(kind: str, uid: str, **fields) -> dict:
            return {"uuid": f"zsharp-{uid}", "type": kind, "metricSectionId": CHART_SECTION,
                    "deleted": False, "isGenerated": False, "runsCountToCompare": 100,
                    **fields}

        objective = {"key": self.objective, "type": "METRIC"}
        cards = [
            card("BAR", "objective", metricKey=self.objective),
            card("PARALLEL", "parallel", selectedParams=list(self.params),
                 selectedMetrics=[self.objective], showAllRuns=True),
        ]
        cards += [card("SCATTER", f"param-{i}", xaxis={"key": p, "type": "PARAM"},
                       yaxis=objective) for i, p in enumerate(self.params)]
        if "sharpness/sam" in self.metrics:
            cards.append(card("SCATTER", "sharpness",
                              xaxis={"key": "sharpness/sam", "type": "METRIC"}, yaxis=objective))
        if self.curve:
            cards.append(card("LINE", "curve", metricKey=self.curve,
                              selectedMetricKeys=[self.curve], lineSmoothness=0,
                              scaleType="linear", xAxisKey="step", selectedXAxisMetricKey=""))
        return cards

    def key(self) -> str:
        """The view's share key: a hash of its state, so publishing it again is a no-op."""
        text = json.dumps(self.state(), sort_keys=True)
        return "zsharp-" + hashlib.sha256(text.encode()).hexdigest()[:24]

    def tag_value(self, created_ms: int | None = None) -> str:
        """The experiment tag's value: a saved-view envelope (it is listed by ``name`` in
        the page's saved views) around the state."""
        now = int(time.time() * 1000) if created_ms is None else created_ms
        return json.dumps({"name": self.name, "createdAt": now, "updatedAt": now,
                           "state": json.dumps(self.state())})


def view_url(base_url: str, experiment_id: str, key: str) -> str:
    """The link that opens ``experiment_id``'s runs table on the view ``key``.

    ``/runs`` and ``workflowType=machine_learning``: without them a browser that has not
    opened MLflow before lands on the experiment's GenAI overview, and the share key is
    dropped on the way to the runs table.
    """
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?"
            f"{urlencode({'workflowType': 'machine_learning', SHARE_KEY_PARAM: key})}")


def parse_view_url(url: str) -> tuple[str, str]:
    """``(experiment_id, key)`` of a :func:`view_url` link (ValueError otherwise)."""
    fragment = urlparse(url).fragment
    path, _, query = fragment.partition("?")
    parts = path.strip("/").split("/")
    keys = parse_qs(query).get(SHARE_KEY_PARAM)
    if len(parts) != 3 or parts[0] != "experiments" or parts[2] != "runs" or not keys:
        raise ValueError(f"not a sweep view link: {url}")
    return parts[1], keys[0]


def ui_base_url(tracking_uri: str, default: str = DEFAULT_UI_URL) -> str:
    """Where the store's UI is: an MLflow server serves its own; a database store is served
    by ``make ui`` (``default``)."""
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return tracking_uri.rstrip("/")
    return default


def publish(client, experiment_id: str, view: SweepView) -> str:
    """Write ``view`` as an experiment tag (once: an existing key is kept); returns its key.
    ``client`` is an ``mlflow.MlflowClient``."""
    key = view.key()
    tag = SHARED_VIEW_TAG_PREFIX + key
    if tag not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, tag, view.tag_value())
    return key


def trials_table(runs: Sequence, view: SweepView, best_trial: int | None = None
                 ) -> tuple[list[dict], str | None]:
    """The sweep's trial runs (MLflow ``Run``s, children of its parent) as table rows, best
    first by ``view.objective`` (runs without it last; ties by trial number), and the id of
    the best run: the complete run of trial ``best_trial`` when given (the study's best),
    else the first complete row with the objective (None if there is none). Each row: the
    trial number, run name and id, state, the view's metrics and swept params."""
    metrics = list(dict.fromkeys([*filter(None, [view.objective]), *view.metrics]))
    rows = []
    for run in runs:
        data, info = run.data, run.info
        row = {"trial": data.tags.get("trial_number", ""), "run_name": info.run_name,
               "run_id": info.run_id,
               "state": data.tags.get("run_state", info.status)}
        row.update({m: data.metrics.get(m) for m in metrics})
        row.update({p: data.params.get(p) for p in view.params})
        rows.append(row)
    sign = -1.0 if view.maximize else 1.0

    def order(row: dict) -> tuple:
        value = row.get(view.objective) if view.objective else None
        number = int(row["trial"]) if str(row["trial"]).isdigit() else 1 << 30
        return (value is None, sign * value if value is not None else 0.0, number)

    rows.sort(key=order)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if best_trial is not None:
        best = next((r["run_id"] for r in complete if r["trial"] == str(best_trial)), None)
    else:
        best = next((r["run_id"] for r in complete
                     if view.objective and r.get(view.objective) is not None), None)
    return rows, best


def latest_sweep_link(tracking_uri: str, base_url: str = DEFAULT_UI_URL) -> str | None:
    """The view link of the newest sweep parent run in the store (None: no sweep, or a
    database file that does not exist yet, which is not created)."""
    from zsharp_sweeps.tracking.uris import sqlite_path

    db = sqlite_path(tracking_uri)
    if db is not None and not db.exists():
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = client.search_experiments()
    if not experiments:
        return None
    runs = client.search_runs([e.experiment_id for e in experiments],
                              filter_string=f"tags.{VIEW_KEY_TAG} != ''",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    return view_url(base_url, run.info.experiment_id, run.data.tags[VIEW_KEY_TAG])


def main(argv: Sequence[str] | None = None) -> int:
    """Print the link ``make ui`` opens: the newest sweep's trials, else the experiments."""
    from zsharp_sweeps.tracking import default_tracking_uri

    parser = argparse.ArgumentParser(prog="python -m zsharp_sweeps.tracking.view",
                                     description=main.__doc__)
    parser.add_argument("--uri", default=None, help="tracking URI (default: the project's)")
    parser.add_argument("--url", default=DEFAULT_UI_URL, help="where the UI is served")
    args = parser.parse_args(argv)
    uri = args.uri or default_tracking_uri()
    base = ui_base_url(uri, args.url)
    try:
        link = latest_sweep_link(uri, base)
    except Exception as exc:  # a store the UI may still open: fall back to the list
        print(f"(could not read {uri}: {type(exc).__name__}: {exc})")
        link = None
    if link is None:
        print(f"MLflow UI: {base}/{EXPERIMENTS_PAGE}")
    else:
        print(f"MLflow UI, the newest sweep's trials (best first): {link}")
        print(f"  every experiment: {base}/{EXPERIMENTS_PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
