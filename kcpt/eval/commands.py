"""`kcpt eval CHECKPOINT`: lm-evaluation-harness on a checkpoint, offline, with the run's exam set as a task
(:mod:`kcpt.eval.harness`; needs ``pip install 'kcpt[eval]'``)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="run lm-evaluation-harness on a checkpoint (exam set + named tasks)",
                              description=__doc__)
    p.add_argument("checkpoint", help="kcpt checkpoint directory or URI (s3://…), or a plain HF model directory")
    p.add_argument("--tasks", default="kcpt_exam",
                   help="comma-separated lm-eval tasks/groups (default: kcpt_exam = the exam set, i.e. kcpt_exam_mc "
                        "+ kcpt_exam_gen); standard ones such as kobest_boolq, kmmlu, haerae run when their data is "
                        "in the local HF cache")
    p.add_argument("--limit", type=int, help="at most N documents per task")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    p.add_argument("--output-dir", help="where the results JSON goes (default: <run>/eval/ of the checkpoint's run)")
    p.add_argument("--exam-set", help="exam dataset of data.datasets to export (default: the checkpoint's stage's "
                                      "eval_exam)")
    p.add_argument("--config", help="config defining the exam set (default: the run's config.yaml, else the demo)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--task-dir", help="keep the exported exam task here (usable with lm_eval --include_path)")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from kcpt.errors import ConfigError

    try:
        import lm_eval  # noqa: F401
    except ModuleNotFoundError:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'kcpt[eval]'") from None
    from kcpt.eval.harness import format_lm_eval_results, run_lm_eval

    tasks = [t.strip() for t in args.tasks.split(",")]
    out = run_lm_eval(args.checkpoint, tasks=tasks, limit=args.limit, batch_size=args.batch_size,
                      output_dir=args.output_dir, exam_set=args.exam_set, config=args.config, device=args.device,
                      task_dir=args.task_dir)
    print(format_lm_eval_results([(out.path, out.results)]))
    print(f"\nwritten: {out.path} ({out.results['kcpt']['seconds']:.1f} s)")
    return 0
