"""`kcpt report PATH`: a training run directory (stage table + Pareto checkpoints) or a tuning experiment
(a directory holding ``trials.parquet``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _report(args: argparse.Namespace) -> int:
    from kcpt import storage

    if storage.is_uri(args.path):
        storage.check_uri(args.path, "path")
        store = storage.Store(args.path)
        if store.is_file("trials.parquet") or args.path.endswith("/trials.parquet"):
            from kcpt.analysis.trials import format_trials_report

            print(format_trials_report(args.path))
        else:
            from kcpt.analysis.run_report import format_run_report

            print(format_run_report(args.path))
        return 0
    path = Path(args.path)
    if (path / "trials.parquet").is_file() or path.name == "trials.parquet":
        from kcpt.analysis.trials import format_trials_report

        print(format_trials_report(path))
    else:
        from kcpt.analysis.run_report import format_run_report

        print(format_run_report(path))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="summarise a run directory or a tuning experiment",
                              description=__doc__)
    p.add_argument("path", help="run directory (runs/<name>) or experiment directory with trials.parquet")
    p.set_defaults(func=_report)
