"""`kcpt train`: run the plan (or some stages) on Ray Train. The jobs in ``jobs/`` call :func:`main` too."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_train_arguments(p: argparse.ArgumentParser, *, with_stages: bool = True) -> None:
    p.add_argument("--config", help="YAML config (default: the embedded demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (YAML), e.g. --set train.num_workers=1 (repeatable)")
    p.add_argument("--run-name", help="run directory name under train.output_dir")
    p.add_argument("--run-dir", help="explicit run directory (overrides output_dir/run_name)")
    if with_stages:
        p.add_argument("--stages", help="comma-separated stage names to run (default: the whole plan)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue from the run directory's latest checkpoint (default: a new run; a run name "
                            "that already has results is refused)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run directory's previous results (checkpoints, metrics, summary)")
    p.add_argument("--force", action="store_true", help="resume/load even if tokenizer or data hashes differ")
    p.add_argument("--address",
                   help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray with explicit num_cpus)")
    p.add_argument("--init-checkpoint", help="the first stage starts from this kcpt checkpoint")
    p.add_argument("--reference-checkpoint",
                   help="the KL reference of stages with kl_reference cpt_best when no stage of this run sets the "
                        "baseline (default: --init-checkpoint)")
    p.add_argument("--baseline-raw-best", type=float, help="raw val baseline when no stage of the run sets it")
    add_verbose_argument(p)


def add_verbose_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output on the console (default: only kcpt's lines; Ray's go to its log "
                        "files, named when Ray starts) — the same as --set logging.verbose=true")


def cpt_stages(cfg) -> list[str]:
    """The CPT part of a plan: its first stage that ``sets_baseline`` (ConfigError if none)."""
    from kcpt.errors import ConfigError

    names = [s.name for s in cfg.plan if s.sets_baseline][:1]
    if not names:
        raise ConfigError("plan: no stage sets_baseline (the CPT stage); nothing for the CPT job to run")
    return names


def preflight(cfg, stages: list[str] | None, *, run_dir: str | None = None, init_checkpoint: str | None = None,
              check_run_dir: bool = True, new_run: bool = False, reference_checkpoint: str | None = None) -> None:
    """Checks that need neither Ray nor torch, run before either is imported (a typo is reported in well under
    a second): the stages exist, the inputs of the datasets they use exist, the run directory is kcpt's own
    (and, with ``new_run``, holds no results yet), the init and reference checkpoints are directories. Raises
    ConfigError / InputError / CheckpointError."""
    from kcpt import storage
    from kcpt.data.sources import check_inputs_exist
    from kcpt.errors import CheckpointError, ConfigError
    from kcpt.train.rundir import RunDir, run_dir_for

    roots = [("train.output_dir", cfg.train.output_dir), ("data.prepared_root", cfg.data.prepared_root),
             ("--run-dir", run_dir), ("tune.experiment_dir", cfg.tune.experiment_dir if not check_run_dir else None)]
    for key, value in roots:
        if value is not None and storage.is_uri(str(value)):
            storage.check_bucket(str(value), key)
    names = [s.name for s in cfg.plan]
    for s in stages if stages is not None else names:
        if s not in names:
            raise ConfigError(f"stages: no stage named '{s}' in plan ({names})")
    needed: list[str] = []
    for st in cfg.plan:
        if stages is None or st.name in stages:
            needed += [*st.sources, *(k for ph in st.mixture_schedule for k in ph.weights), st.eval_raw,
                       *([st.eval_exam] if st.eval_exam else [])]
    for name in dict.fromkeys(needed):
        check_inputs_exist(cfg.data.datasets[name].inputs, where=f"data.datasets.{name}.inputs")
    for key, value in (("model.name_or_path", cfg.model.name_or_path), ("tokenizer.path", cfg.tokenizer.path)):
        local = value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()
        if value not in ("tiny", "demo") and local and not Path(value).expanduser().is_dir():
            raise ConfigError(f"{key}: '{value}' is not a directory (a local model/tokenizer directory, or a hub "
                              "name)")
    ds = cfg.train.deepspeed
    if ds is not None and ds.config is not None and not Path(ds.config).expanduser().is_file():
        raise ConfigError(f"train.deepspeed.config: {ds.config}: no such file")
    model_dir = Path(cfg.model.name_or_path).expanduser()
    if cfg.model.name_or_path != "tiny" and model_dir.is_dir() and not (model_dir / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: {model_dir} has no config.json (not a Hugging Face model directory)")
    if check_run_dir:
        rd = RunDir(run_dir if run_dir else run_dir_for(cfg))
        rd.check_owned()
        if new_run:
            rd.refuse_existing()
    for flag, ref in (("--init-checkpoint", init_checkpoint), ("--reference-checkpoint", reference_checkpoint)):
        if ref is not None and not storage.is_uri(ref) and not Path(ref).is_dir():
            raise CheckpointError(f"{flag} {ref}: no such checkpoint directory")


def run_from_args(args: argparse.Namespace, stages: list[str] | None = None, *, cpt_only: bool = False) -> int:
    from kcpt.config import load_config

    overrides = list(args.overrides)
    if args.run_name:
        overrides.append(f"train.run_name={args.run_name}")
    if args.verbose:
        overrides.append("logging.verbose=true")
    cfg = load_config(args.config, overrides)
    if cpt_only:
        stages = cpt_stages(cfg)
    if stages is None and getattr(args, "stages", None):
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    resume = "auto" if args.resume else "overwrite" if args.overwrite else "never"
    preflight(cfg, stages, run_dir=args.run_dir, init_checkpoint=args.init_checkpoint, new_run=resume == "never",
              reference_checkpoint=args.reference_checkpoint)

    from kcpt.analysis.run_report import format_stage_table
    from kcpt.train.launch import run_plan  # imports torch and Ray: only after the config was validated

    if args.resume:
        from kcpt.train.rundir import run_dir_of

        rd = run_dir_of(cfg, args.run_dir)
        if rd.latest_checkpoint(stages or [s.name for s in cfg.plan]) is None:
            print(f"--resume: {rd.location} holds no complete checkpoint of this plan (a typo in the run name?); "
                  "a new run starts there", flush=True)

    result = run_plan(cfg, stages=stages, run_dir=args.run_dir or None,  # str: a URI stays one
                      init_checkpoint=args.init_checkpoint or None,  # a URI stays one (Path() folds its //)
                      reference_checkpoint=args.reference_checkpoint or None,
                      baseline_raw_best=args.baseline_raw_best, resume=resume,
                      force=args.force, address=args.address)
    print(format_stage_table(result.summaries, result.metrics))
    print(f"\nbaseline_raw_best: {result.baseline_raw_best}")
    print(f"run directory: {result.run_dir}  ({result.wall_s:.0f} s)")
    print(f"report: kcpt report {result.run_dir}")
    return 0


def main(argv: list[str] | None = None, *, cpt_only: bool = False, description: str | None = None) -> int:
    """Entry of ``jobs/*.py``: parse arguments, run, print the table; KcptError → message, exit 2.

    ``cpt_only``: run only the plan's CPT stage (the first stage that ``sets_baseline``)."""
    from kcpt.cli import run_job

    return run_job(argv, description or __doc__, lambda p: add_train_arguments(p, with_stages=not cpt_only),
                   lambda args: run_from_args(args, cpt_only=cpt_only))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="run the training plan (CPT → stage 1 → 2 → 3) on Ray Train",
                              description=__doc__)
    add_train_arguments(p)
    p.set_defaults(func=lambda args: run_from_args(args))
