"""False-positive rate of the anomaly rule on ordinary runs (no fault injected): rollbacks per stage.

Three kinds of run, each on real Korean text and with the default anomaly rule (``train.anomaly`` defaults):

1. the embedded demo plan as ``python jobs/train_stages.py`` runs it;
2. an *uneven-answer* exam set built here from the same real text but unlike the demo's: the answer of each
   item is a whole constitution article (20 to 600+ characters) or a whole bill's stated reason, mixed with
   one-word answers ("제10조"), at 2 rows per micro-batch — answer-only gradients from 1 to ~250 target tokens,
   the noisy regime in which the old mean/std rule aborted a user's stage 1;
3. the demo's stage 3 at *one row per step* (micro-batch 1, token-fair: 800 steps of 256 tokens; LR 1e-3, KL β 1.0,
   exam share 0.40 — the fast region of a stage-3 tune), from the demo's stage-2 checkpoint, at ``--mb1-seeds``
   (default 4 and 1000: the seeds at which the rule with its ratio against the window's median rolled back 5
   and 1 times): a single row the model has not fit yet gives a norm 12-18× the window's median.

Prints rollbacks per stage (goal: 0 everywhere) and the grad-norm spread each stage saw (max / mean of the
interval means), and exits 1 if any stage rolled back. Run: ``python bench/anomaly_false_positives.py``
(about 9 min on 2 cores; ``--quick`` for the uneven run only, ``--mb1-seeds ""`` without run 3).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from kcpt.config import load_config
from kcpt.data.demo import build_uneven_exam
from kcpt.train.launch import run_plan
from kcpt.train.rundir import read_metrics


def uneven_overrides(data_dir: Path, root: Path, steps: int = 120) -> list[str]:
    paths = build_uneven_exam(data_dir)
    datasets = ("{raw_train: {kind: raw, inputs: ['demo:raw_train']}, raw_val: {kind: raw, inputs: ['demo:raw_val']},"
                f" qa_long_train: {{kind: exam, inputs: ['{paths['qa_long_train']}']}},"
                f" qa_long_val: {{kind: exam, inputs: ['{paths['qa_long_val']}']}}}}")
    plan = ("[{name: cpt, sources: {raw_train: 1.0}, max_steps: 60, eval_every: 10, sets_baseline: true, "
            "lr: {peak: 2.0e-3, warmup_steps: 10}, stop: {rule: max_steps}}, "
            f"{{name: stage1, sources: {{qa_long_train: 0.8, raw_train: 0.2}}, max_steps: {steps}, eval_every: 20, "
            "eval_exam: qa_long_val, kl_beta: 0.1, lr: {peak: 1.0e-3, warmup_steps: 5}, "
            "stop: {rule: max_steps}}]")
    return [f"data.datasets={datasets}", f"plan={plan}", "tune.stage=stage1", "train.micro_batch_size=2",
            "data.seq_len=256", f"data.prepared_root={root / 'prepared'}", f"train.output_dir={root / 'runs'}",
            "train.run_name=uneven", "logging.progress=false"]


def _stage_table(run_dir: Path) -> list[dict]:
    rows = []
    recs = [r for r in read_metrics(run_dir) if r["step"] > 0]
    for stage in dict.fromkeys(r["stage"] for r in recs):
        rs = [r for r in recs if r["stage"] == stage]
        norms = [r["grad_norm"] for r in rs if r.get("grad_norm") is not None]
        maxes = [r["grad_norm_max"] for r in rs if r.get("grad_norm_max") is not None]
        rows.append({"stage": stage, "steps": rs[-1]["step"], "rollbacks": rs[-1]["rollbacks"],
                     "norm_mean": sum(norms) / len(norms), "norm_max": max(maxes),
                     "norm_min_interval": min(norms)})
    return rows


def micro_batch_1_runs(root: Path, seeds: list[int]) -> list[tuple[str, Path, float]]:
    """Run 3: the demo's stage 3 at micro-batch 1 from the demo's stage-2 checkpoint (trained here as a stage-3
    tune's prerequisites), in-process, one run per seed (the tokens-to-gate bench's :func:`run_variant`)."""
    from tokens_to_gate import run_variant  # bench/ is sys.path[0] when this bench runs as a script

    from kcpt.tune.launch import ensure_prerequisites
    from kcpt.tune.space import apply_params

    cfg = load_config(None, [f"train.output_dir={root / 'runs'}", f"data.prepared_root={root / 'prepared'}",
                             "logging.progress=false", "tune.space.micro_batch_sizes=[1,8]",
                             "tune.space.kl_allow_off=false"])
    pre = ensure_prerequisites(cfg)
    small = apply_params(cfg, {"micro_batch_size": 1, "lr": 1e-3, "kl_beta": 1.0, "exam_fraction": 0.4,
                               "qa_fraction": 0.8}, "stage3")
    runs = []
    for seed in seeds:
        run_dir = root / "runs" / f"stage3-mb1-seed{seed}"
        t0 = time.perf_counter()
        run_variant(small, seed, run_dir, pre, ray=False)
        runs.append((f"demo stage 3, mb 1, seed {seed}", run_dir, time.perf_counter() - t0))
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the uneven-answer run")
    ap.add_argument("--steps", type=int, default=120, help="steps of the uneven exam stage")
    ap.add_argument("--mb1-seeds", default="4,1000", help="train.seed of each micro-batch-1 stage-3 run ('' none)")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="kcpt-anomaly-fp-"))
    runs = []
    if not args.quick:
        cfg = load_config(None, [f"train.output_dir={root / 'runs'}", f"data.prepared_root={root / 'prepared'}",
                                 "logging.progress=false", "train.run_name=demo"])
        t0 = time.perf_counter()
        res = run_plan(cfg, resume="overwrite")
        runs.append(("demo plan", res.run_dir, time.perf_counter() - t0))
    cfg = load_config(None, uneven_overrides(root / "uneven-data", root, args.steps))
    t0 = time.perf_counter()
    res = run_plan(cfg, resume="overwrite")
    runs.append(("uneven answers (mb 2)", res.run_dir, time.perf_counter() - t0))
    if not args.quick and args.mb1_seeds:
        runs += micro_batch_1_runs(root, [int(x) for x in args.mb1_seeds.split(",")])
    print("| run | stage | steps | rollbacks | grad norm: mean of intervals | max step | max/mean |")
    print("|---|---|---|---|---|---|---|")
    bad = 0
    for name, run_dir, wall in runs:
        for r in _stage_table(run_dir):
            bad += r["rollbacks"]
            print(f"| {name} ({wall:.0f} s) | {r['stage']} | {r['steps']} | {r['rollbacks']} | "
                  f"{r['norm_mean']:.3f} | {r['norm_max']:.3f} | {r['norm_max'] / r['norm_mean']:.2f} |")
    print(f"rollbacks without any injected fault: {bad} (goal 0); results under {root}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
