"""`kcpt tune`: Ray Tune + Optuna over stage 3 with the gate as objective. ``jobs/tune_stage3.py`` calls
:func:`main` too.

With no flags: start a local Ray, make (or reuse, keyed by config hash) the CPT / stage-1 / stage-2
checkpoints of the demo plan, tune stage 3 on the embedded demo, print the trial table and where results are.
"""

from __future__ import annotations

import argparse


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: the embedded demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (YAML), e.g. --set tune.stage_overrides.max_steps=40 (repeatable)")
    p.add_argument("--num-samples", type=int, help="trials to run (tune.num_samples)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (tune.max_concurrent)")
    p.add_argument("--storage", help="Optuna storage: sqlite (default: <experiment dir>/optuna.db), journal "
                   "(<experiment dir>/optuna.journal), journal:///shared/file.journal, or an SQLAlchemy URL "
                   "(postgresql+psycopg2://user:pw@host/db)")
    p.add_argument("--study-name", help="Optuna study name (tune.study_name)")
    p.add_argument("--experiment-dir", help="where results go (default: <tune.experiment_dir>/<study>-<hash8>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment in the experiment dir (Tune's saved state and the study; trials "
                        "that were running re-run from their latest checkpoints); starts it if there is none")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing experiment (its files and its Optuna study) and start again")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--sampler", choices=["tpe", "gp", "random"], default="tpe",
                   help="Optuna sampler: tpe (default), gp (Gaussian process; docs/tuning.md), random")
    from kcpt.train.commands import add_verbose_argument

    add_verbose_argument(p)


def tune_from_args(args: argparse.Namespace) -> int:
    from kcpt.config import load_config

    overrides = list(args.overrides)
    if args.verbose:
        overrides.append("logging.verbose=true")
    for flag, key in (("num_samples", "tune.num_samples"), ("max_concurrent", "tune.max_concurrent"),
                      ("storage", "tune.storage"), ("study_name", "tune.study_name")):
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"{key}={v}")
    cfg = load_config(args.config, overrides or None)
    from kcpt.train.commands import preflight

    cfg.check_tuned_stage()
    preflight(cfg, None, check_run_dir=False)  # the inputs of every stage, before Ray and torch are imported
    from kcpt import storage as store_lib
    from kcpt.tune.experiment import check_experiment, experiment_uri, resolve_experiment

    if args.experiment_dir and store_lib.is_uri(str(args.experiment_dir)):
        store_lib.check_bucket(str(args.experiment_dir), "--experiment-dir")
    abs_cfg, exp_dir, storage = resolve_experiment(cfg, args.experiment_dir)
    mode = check_experiment(exp_dir, storage_url=storage, study_name=cfg.tune.study_name, resume=args.resume,
                            overwrite=args.overwrite, config_sha256=abs_cfg.sha256(),
                            owner=experiment_uri(abs_cfg, args.experiment_dir) or str(exp_dir), config=abs_cfg)
    print(f"tune experiment {experiment_uri(abs_cfg, args.experiment_dir) or exp_dir}: {mode}", flush=True)
    from kcpt.tune.launch import tune_stage3  # imports Ray and torch: only after the config was validated

    res = tune_stage3(cfg, experiment_dir=args.experiment_dir, resume=args.resume, overwrite=args.overwrite,
                      address=args.address, sampler=args.sampler)
    if res.extra.get("interrupted_trials"):
        print(f"trials marked FAIL (interrupted, no Tune trial owned them): {res.extra['interrupted_trials']}")
    from kcpt.analysis.trials import format_trials_report

    print("\n" + format_trials_report(res.experiment_dir))  # what `kcpt report` prints: table, best, re-evaluation
    pre = res.prerequisites
    print(f"\nstarted every trial from {pre.init_checkpoint} (baseline_raw_best={pre.baseline_raw_best}; "
          f"{'reused' if pre.reused else 'made'} in {pre.run_dir})")
    where = res.extra.get("experiment_uri") or res.experiment_dir
    print(f"experiment: {where}")
    if res.extra.get("experiment_uri"):
        print(f"  (local mirror: {res.experiment_dir})")
    print(f"  trials:      {where}/trials.parquet")
    print(f"  best config: {f'{where}/best_config.yaml' if res.best_config_path else 'none (no feasible trial)'}")
    from kcpt.tune.study_storage import JOURNAL_SCHEME, journal_path, redact

    dashboard = journal_path(res.storage) if res.storage.startswith(JOURNAL_SCHEME) else redact(res.storage)
    print(f"  optuna:      {redact(res.storage)}  (study '{res.study_name}'; optuna-dashboard {dashboard})")
    runs = res.extra.get("tune_runs") or ["tune"]
    print(f"  tensorboard: tensorboard --logdir {where}/tune" if runs == ["tune"] else
          f"  tensorboard: tensorboard --logdir {where}  (Tune's runs {', '.join(runs)})")
    print(f"  report:      kcpt report {where}")
    return 0


def main(argv: list[str] | None = None, *, description: str | None = None) -> int:
    """Entry of ``jobs/tune_stage3.py``: KcptError → one-line message, exit 2."""
    from kcpt.cli import run_job

    return run_job(argv, description or __doc__, add_tune_arguments, tune_from_args)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tune", help="tune stage 3 (mixture, LR, KL β) with Ray Tune + Optuna",
                              description=__doc__)
    add_tune_arguments(p)
    p.set_defaults(func=tune_from_args)
