"""`kcpt report PATH`: a training run directory (stage table + Pareto checkpoints) or a tuning experiment
(a directory holding ``trials.parquet``). ``--forgetting``: the run's forgetting / drift table per checkpoint and
evaluation bucket (:mod:`kcpt.eval.forgetting`), written into the run directory as ``forgetting.json`` /
``forgetting.parquet``."""

from __future__ import annotations

import argparse
from pathlib import Path


def _forgetting(args: argparse.Namespace) -> int:
    from kcpt.eval.forgetting import forgetting_report

    which = args.checkpoint or "best"
    if isinstance(which, list) and which in (["best"], ["all"]):
        which = which[0]
    report = forgetting_report(args.path, checkpoints=which, probe_tokens=args.probe_tokens, base=args.base,
                               cpt_best=args.cpt_best, overrides=args.overrides, device=args.device)
    print(report.format())
    print(f"\nwritten: forgetting.json, forgetting.parquet in {report.meta['run']} ({report.meta['seconds']:.1f} s)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from kcpt import storage

    if args.forgetting:
        return _forgetting(args)
    given = [flag for flag, v in (("--checkpoint", args.checkpoint), ("--probe-tokens", args.probe_tokens),
                                  ("--base", args.base), ("--cpt-best", args.cpt_best), ("--set", args.overrides),
                                  ("--device", args.device)) if v]
    if given:
        from kcpt.errors import ConfigError

        raise ConfigError(f"{', '.join(given)}: only with --forgetting")

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
    f = p.add_argument_group("forgetting / drift (a run directory)")
    f.add_argument("--forgetting", action="store_true",
                   help="compute the forgetting / drift table (raw loss deltas and KL to the base model and the CPT "
                        "best, per evaluation bucket) and write forgetting.json / forgetting.parquet into the run")
    f.add_argument("--checkpoint", action="append", metavar="REF",
                   help="checkpoint to report: a name under checkpoints/, a path or URI; 'best' (default: each "
                        "stage's best) or 'all' (repeatable)")
    f.add_argument("--probe-tokens", type=int, metavar="N", help="probe tokens per probe dataset (default: "
                   "eval.forgetting.probe_tokens of the run's config)")
    f.add_argument("--base", metavar="REF", help="base model (default: the run's initial model); 'model' = the "
                   "configured model.name_or_path")
    f.add_argument("--cpt-best", metavar="REF", help="CPT best checkpoint (default: the run's cpt_best)")
    f.add_argument("--set", dest="overrides", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="override an eval.* setting of the run's config, e.g. --set "
                        "eval.buckets.length_bands=[128,512] (repeatable)")
    f.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_report)
