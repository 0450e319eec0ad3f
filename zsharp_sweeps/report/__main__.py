"""``python -m zsharp_sweeps.report <sweep dir | study storage>``: a sweep's report again.

Writes to ``--out`` (default ``<sweep dir>/report``) what ``zsharp_sweeps.report.write_report``
writes at the end of a sweep; with an MLflow parent run the files are logged to it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from zsharp_sweeps.report import PARENT_RUN_ATTR, load_study, write_report
from zsharp_sweeps.tracking import Tracker
from zsharp_sweeps.tracking.uris import sqlite_path


def _tracker(uri: str | None, experiment: str) -> Tracker | None:
    """A Tracker on the MLflow store, or None when a local SQLite store does not exist."""
    from zsharp_sweeps.config import TrackingConfig
    from zsharp_sweeps.tracking import default_tracking_uri

    uri = uri or default_tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        print(f"note: no MLflow store at {uri}: report without MLflow parts", file=sys.stderr)
        return None
    return Tracker(TrackingConfig(uri=uri, experiment=experiment))


#: What ``--help`` says: plain text (the module docstring is reStructuredText, whose
#: double backticks and roles read as noise in a terminal).
DESCRIPTION = """\
Write a sweep's report again: summary.txt and report.md (best settings, every trial with
its state, why failed trials failed, test accuracy per configuration over seeds, the
optional paired test), best_settings.csv, trials.csv, seeds.csv and the plots, as a sweep
writes them when it ends. With the study's MLflow parent run, the files are logged to it.

examples:
  python -m zsharp_sweeps.report multirun/zsharp_rho_qp_lr-resnet56-cifar10
  python -m zsharp_sweeps.report multirun/compare_optimizers-resnet20-cifar10 --compare zsharp,sam
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zsharp_sweeps.report", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", help="sweep directory, its optuna.db, or an Optuna storage URL")
    parser.add_argument("--study", help="study name (needed when the storage holds several)")
    parser.add_argument("--out", help="output directory (default: <sweep dir>/report or ./report)")
    parser.add_argument("--compare", help="two optimizers for a paired test, e.g. zsharp,sam")
    parser.add_argument("--tracking-uri",
                        help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlruns/mlflow.db)")
    parser.add_argument("--experiment", default="zsharp-sweeps", help="MLflow experiment")
    parser.add_argument("--no-mlflow", action="store_true", help="do not read or log to MLflow")
    args = parser.parse_args(argv)
    pair = None
    if args.compare:
        pair = tuple(p.strip() for p in args.compare.split(","))
        if len(pair) != 2 or not all(pair):
            print(f"error: --compare={args.compare!r}: give two optimizers, e.g. zsharp,sam",
                  file=sys.stderr)
            return 2
    try:
        study = load_study(args.target, args.study)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    default_out = Path(args.target) / "report" if Path(args.target).is_dir() else Path("report")
    out = Path(args.out) if args.out else default_out
    tracker = None if args.no_mlflow else _tracker(args.tracking_uri, args.experiment)
    try:
        files = write_report(study, out, tracker=tracker, compare_pair=pair, echo=True)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if tracker is not None and tracker.enabled and parent:
        tracker.run_id = parent
        for path in files:
            tracker.log_artifact(path, "report")
    print(f"\nwrote {len(files)} files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
