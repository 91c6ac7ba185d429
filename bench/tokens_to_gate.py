"""Training tokens until the stage-3 gate holds: recipe default vs the recipe's step schedule vs a tuned best.

In one invocation, on the demo config (plus ``--set`` overrides):

1. the stages before stage 3 run once (or are reused): every stage-3 run starts from the same stage-2 best
   checkpoint with the same baseline (:func:`kcpt.tune.launch.ensure_prerequisites`);
2. ``--trials`` K trials of the real tune job (:func:`kcpt.tune.launch.tune_stage3`: Ray Tune + Optuna TPE,
   objective ``tokens_to_gate``, the recipe's settings enqueued first, ASHA on training tokens) with
   ``train.seed = --tune-seed`` (not one of the evaluation seeds) give the tuned best (``best_config.yaml``);
   the trials train at the world size the evaluation runs use (one worker in-process, ``train.num_workers``
   with ``--ray``), so the tuned LR and mixture are chosen at the batch they are measured at; the
   ``--reeval-top-k`` best feasible trials then run at ``--reeval-seeds`` more seeds (``tune.reeval``: seeds
   ``--tune-seed`` + 1 …, still not evaluation seeds) and the best mean over each one's runs is the tuned best;
3. three stage-3 configurations, each run with ``--seeds`` seeds (``train.seed`` 0..n−1) on the real stage loop:
   ``default`` — the recipe's default stage 3 as the issue defines it: the stage's mixture as configured (the
   demo: 70:30 exam:raw), its LR, and no KL (``kl_beta`` = 0, whatever the config sets);
   ``recipe_step`` — the same with the recipe's 70:30 → 50:50 → 60:40 step schedule;
   ``tuned`` — the tuned best (absent when no trial was feasible).

Prints per configuration: seeds whose gate held (``stop.consecutive`` evals in a row on the held-out val sets),
tokens-to-gate mean/min/max over those seeds, the censored mean (a seed that never passes counts as the stage's
whole token budget: a lower bound), plan tokens from the base model, and the final exam / raw val loss and raw
ratio; then the tuned/default ratio of censored means (goal ≤ 0.5).

``--set "tune.space.micro_batch_sizes=[2,4,8]"`` lets the tune choose the stage's micro-batch (token-fair: the
same token budget and eval points, see docs/tuning.md); the ``tuned`` row then runs at that micro-batch.

The stage runs in-process by default (the same StageRunner as under Ray Train, one worker, no per-run Ray
start-up); ``--ray`` runs each under Ray Train at the config's world size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kcpt.config import KcptConfig, config_from_dict, load_config
from kcpt.tune.launch import ensure_prerequisites, tune_stage3
from kcpt.tune.space import apply_params, recipe_points

VARIANTS = ("default", "recipe_step", "tuned")


def variant_configs(cfg: KcptConfig, best_config: Path | None) -> dict[str, KcptConfig]:
    """Stage-3 configurations to compare (``tune.stage_overrides`` applied to each)."""
    stage = cfg.tune.stage
    no_kl = {"kl_on": False, "kl_beta": 0.0}  # the issue's default: no KL
    out = {"default": apply_params(cfg, no_kl, stage)}
    data = cfg.model_dump(mode="json")
    data["tune"]["space"]["mixture_shapes"] = ["fixed", "recipe_step"]
    step_point = recipe_points(config_from_dict(data, "<bench>"), stage)[-1]
    out["recipe_step"] = apply_params(cfg, {**step_point, **no_kl}, stage)
    if best_config is not None:
        out["tuned"] = load_config(best_config)
    return out


def stage_budget(cfg: KcptConfig, *, ray: bool) -> int:
    """Tokens of the stage run to ``max_steps`` as this bench runs it (in-process: one worker)."""
    t = cfg.train
    world = cfg.train.num_workers if ray else 1
    st = cfg.stage(cfg.tune.stage)
    return st.max_steps * cfg.micro_batch(st) * cfg.data.seq_len * t.grad_accum * world


def run_variant(cfg: KcptConfig, seed: int, run_dir: Path, pre: Any, *, ray: bool) -> dict[str, Any]:
    from kcpt.train.launch import run_plan

    data = cfg.model_dump(mode="json")
    data["train"]["seed"] = seed
    c = config_from_dict(data, "<bench seed>")
    stage = c.tune.stage
    res = run_plan(c, stages=[stage], run_dir=run_dir, init_checkpoint=pre.init_checkpoint,
                   baseline_raw_best=pre.baseline_raw_best, reference_checkpoint=pre.reference_checkpoint,
                   resume="overwrite", in_process=not ray)
    s = res.summaries[stage]
    base = s.get("baseline_raw_best") or pre.baseline_raw_best
    raw = s.get("final_raw_val_loss")
    return {"seed": seed, "tokens_to_gate": s.get("tokens_to_gate"), "tokens_seen": s.get("tokens_seen"),
            "passed_gate": s.get("tokens_to_gate") is not None, "final_exam_val_loss": s.get("final_exam_val_loss"),
            "final_raw_val_loss": raw, "final_raw_ratio": raw / base if raw is not None and base else None,
            "stop_reason": s.get("stop_reason")}


def stats(runs: list[dict[str, Any]], budget: int, tokens_before: int) -> dict[str, Any]:
    toks = [r["tokens_to_gate"] for r in runs if r["tokens_to_gate"] is not None]
    cens = [r["tokens_to_gate"] if r["tokens_to_gate"] is not None else budget for r in runs]

    def mean(key: str) -> float | None:
        v = [r[key] for r in runs if r[key] is not None]
        return float(np.mean(v)) if v else None
    return {"passed": len(toks), "seeds": len(runs),
            "mean": float(np.mean(toks)) if toks else None, "min": min(toks) if toks else None,
            "max": max(toks) if toks else None, "censored_mean": float(np.mean(cens)),
            "plan_mean": float(np.mean(toks)) + tokens_before if toks else None,
            "final_exam": mean("final_exam_val_loss"), "final_raw": mean("final_raw_val_loss"),
            "final_raw_ratio": mean("final_raw_ratio")}


def _f(v: Any, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="config file (default: the demo defaults)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--seeds", type=int, default=3, help="evaluation seeds (0..n-1) of every stage-3 row")
    ap.add_argument("--trials", type=int, default=6, help="K: trials of the tune that gives the tuned best")
    ap.add_argument("--tune-seed", type=int, default=1000, help="train.seed of the tune trials")
    ap.add_argument("--sampler", choices=("tpe", "gp", "random"), default="tpe", help="the tune's Optuna sampler")
    ap.add_argument("--reeval-top-k", type=int, default=3, help="tune.reeval.top_k (0: the single-run best)")
    ap.add_argument("--reeval-seeds", type=int, default=2, help="tune.reeval.seeds")
    ap.add_argument("--out", default="experiments/bench-tokens-to-gate",
                    help="where the prerequisites, the tune and the rows' runs go")
    ap.add_argument("--ray", action="store_true", help="run each stage-3 run under Ray Train")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    cfg = load_config(args.config, [f"train.output_dir={out / 'runs'}", "logging.progress=false",
                                    *args.overrides])
    t0 = time.perf_counter()
    pre = ensure_prerequisites(cfg)
    print(f"prerequisites ({'reused' if pre.reused else 'trained'}): baseline_raw_best={pre.baseline_raw_best:.4f}, "
          f"{pre.tokens_before} tokens before stage 3, {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    tcfg = load_config(args.config, [f"train.output_dir={out / 'runs'}", "logging.progress=false",
                                     *args.overrides, f"tune.num_samples={args.trials}",
                                     "tune.objective=tokens_to_gate", f"train.seed={args.tune_seed}",
                                     "tune.study_name=bench-tokens-to-gate",
                                     f"tune.reeval.top_k={args.reeval_top_k}", f"tune.reeval.seeds={args.reeval_seeds}",
                                     *([] if args.ray else ["tune.num_workers=1"])])
    tuned = tune_stage3(tcfg, experiment_dir=out / "tune", overwrite=True, prerequisites=pre, verbose=0,
                        sampler=args.sampler)
    print(f"tune: {args.trials} trials + re-evaluation of the best {args.reeval_top_k} at {args.reeval_seeds} more "
          f"seeds in {time.perf_counter() - t0:.0f} s; best: {json.dumps(tuned.best and tuned.best['params'])} "
          f"({tuned.best and tuned.best.get('chosen_by')})")
    variants = variant_configs(cfg, tuned.best_config_path)
    budget = stage_budget(variants["default"], ray=args.ray)
    results: dict[str, Any] = {"budget_tokens": budget, "tokens_before": pre.tokens_before, "trials": args.trials,
                               "sampler": args.sampler,
                               "reeval": {"top_k": args.reeval_top_k, "seeds": args.reeval_seeds},
                               "tuned_params": tuned.best and tuned.best["params"],
                               "tuned_reeval": tuned.best and tuned.best.get("reeval"), "variants": {}}
    for name, vcfg in variants.items():
        runs = [run_variant(vcfg, seed, out / "runs" / f"{name}-seed{seed}", pre, ray=args.ray)
                for seed in range(args.seeds)]
        results["variants"][name] = {"runs": runs, **stats(runs, stage_budget(vcfg, ray=args.ray),
                                                           pre.tokens_before)}
    print(f"\nstage-3 tokens to gate, {args.seeds} seeds, {'Ray Train' if args.ray else 'in-process, 1 worker'} "
          f"(stage budget {budget} tokens; tuned from K={args.trials} trials)")
    print(f"{'config':12} {'passed':>7} {'mean':>9} {'min':>9} {'max':>9} {'censored':>9} {'plan mean':>10} "
          f"{'exam':>7} {'raw':>7} {'raw/base':>8}")
    for name in VARIANTS:
        r = results["variants"].get(name)
        if r is None:
            print(f"{name:12} (no feasible trial)")
            continue
        print(f"{name:12} {r['passed']:>3}/{r['seeds']:<3} {_f(r['mean'], '9.0f')} {_f(r['min'], '9d')} "
              f"{_f(r['max'], '9d')} {r['censored_mean']:9.0f} {_f(r['plan_mean'], '10.0f')} "
              f"{_f(r['final_exam'], '7.4f')} {_f(r['final_raw'], '7.4f')} {_f(r['final_raw_ratio'], '8.4f')}")
    d, t = results["variants"]["default"], results["variants"].get("tuned")
    ratio = t["censored_mean"] / d["censored_mean"] if t else None
    results["ratio_tuned_default"] = ratio
    print(f"\nratio tuned/default, censored mean tokens to gate: {_f(ratio, '.3f')}  (goal ≤ 0.5)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
