"""Constrained TPE vs random search on the stage-3 gate objective, same trial budget, several seeds.

Running the real stage-3 loop for 2 samplers × several seeds × tens of trials takes hours on 2 CPU cores, so
this bench uses a documented cheap proxy whose landscape comes from MEASURED stage-3 runs:

1. Measure: the evals (raw_ratio, exam_val_loss per eval step) of real stage-3 trials — from the experiment
   dirs given with ``--measured`` (e.g. the demo tune), plus, unless ``--no-measure``, a fresh experiment of
   ``--measure-trials`` random-search trials run by :func:`kcpt.tune.launch.tune_stage3` (ASHA off, so every
   curve is complete; stage 3 shortened via ``--set``).
2. Fit: per eval index, an RBF interpolator (scipy, thin-plate, smoothed) from the normalised parameters
   (exam_fraction, qa_fraction, log lr, KL: log β or "off", and log2 micro-batch when ``--set
   "tune.space.micro_batch_sizes=[…]"`` makes it searchable) to raw_ratio and exam loss. The search space is the
   config's (``tune.space`` after ``--set``): the one the measurement's tune searched and the proxy's searches
   sample.
3. Proxy gate: the tiny demo model never reaches the demo's exam target, so the proxy re-centres the gate
   on the measured landscape: eps_proxy puts the raw bound at the ``--raw-quantile`` of the predicted selected
   raw ratios under uniform sampling, and the exam target at the exam quantile for which a uniformly sampled
   config passes the gate with probability ``--pass-rate`` (both reported). Objective / constraint / gate use
   the same code as the real job (:func:`kcpt.tune.objective.gate_outcome`), and the job's default objective
   (``tokens_to_gate``; each proxy eval counts as one token unit) unless ``--objective exam``.
4. Search: for each seed, Optuna TPE (constraint via ``trial.set_constraint``, exactly as the tune job's
   searcher does) and random search — plus Optuna's ``GPSampler`` with ``--samplers tpe,gp,random`` (the job's
   ``--sampler gp``, on the static space it samples then) — each run ``--trials`` trials of the proxy with the
   job's search space.

Prints, in one run: trials until the first gate-passing config (mean over seeds; a seed that never passes
counts as budget+1) and the best feasible objective after K trials, with TPE/random ratios.

Real-loop mode (``--real-seeds N``, run in the same invocation after the proxy unless ``--no-proxy``): for each
of N sampler seeds, the real tune job (:func:`kcpt.tune.launch.tune_stage3`: Ray Tune, Optuna on SQLite, the
demo stage loop, ASHA on training tokens, the recipe's settings enqueued first — the job as users run it) with
TPE and with random search, ``--real-trials`` trials each, on the config given by ``--real-set`` (default: the
demo's stage 3 at its eval cadence with a budget of 60 steps at micro-batch 8 and the micro-batch searched: the
fastest settings hold the gate there, the recipe does not). Prints the same two figures from each experiment's
``trials.parquet``: trials until the first trial whose gate held, and the best feasible objective
(``tune.objective``; lower is better).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import optuna
from scipy.interpolate import RBFInterpolator

from kcpt.analysis.trials import load_curves, load_manifest, load_trials
from kcpt.config import SearchSpace, load_config
from kcpt.tune.objective import GateSpec, gate_outcome
from kcpt.tune.searcher import CONSTRAINT_NAME, make_sampler, static_space
from kcpt.tune.space import suggest_params


def features(params: dict, space: SearchSpace) -> np.ndarray:
    """Parameters scaled to [0, 1]; KL off maps to −0.25 on the log-β axis (below its lowest value); with
    ``space.micro_batch_sizes``, a fifth axis: log2 of the micro-batch over the listed sizes' span."""
    def unit(v: float, r) -> float:
        if r.log:
            return (math.log(v) - math.log(r.low)) / (math.log(r.high) - math.log(r.low))
        return (v - r.low) / (r.high - r.low)
    beta = 0.0 if params.get("kl_on") is False else float(params.get("kl_beta") or 0.0)
    kl = unit(beta, space.kl_beta) if beta > 0 else -0.25
    x = [unit(params["exam_fraction"], space.exam_fraction), unit(params["qa_fraction"], space.qa_fraction),
         unit(params["lr"], space.lr), kl]
    sizes = space.micro_batch_sizes
    if sizes:
        lo, hi = math.log2(min(sizes)), math.log2(max(sizes))
        x.append((math.log2(params["micro_batch_size"]) - lo) / (hi - lo) if hi > lo else 0.0)
    return np.array(x)


class MeasuredLandscape:
    """raw_ratio and exam loss per eval index, interpolated from measured stage-3 trials."""

    def __init__(self, exp_dirs: list[Path], space: SearchSpace):
        xs, curves = [], []
        for exp in exp_dirs:
            trials, man = load_trials(exp), load_manifest(exp)
            cur = load_curves(exp, trials)
            for _, t in trials.iterrows():
                c = cur[(cur["trial_number"] == t["trial_number"]) & (cur["step"] > 0)].sort_values("step")
                if c.empty:
                    continue
                params = {k.removeprefix("param_"): v for k, v in t.items() if k.startswith("param_")
                          and not (isinstance(v, float) and math.isnan(v))}
                xs.append(features(params, space))
                curves.append((c["raw_ratio"].to_numpy(), c["exam_val_loss"].to_numpy()))
            self.steps_source = man
        self.n_trials = len(xs)
        self.n_evals = max(len(r) for r, _ in curves)
        self.models = []
        for k in range(self.n_evals):
            idx = [i for i, (r, _) in enumerate(curves) if len(r) > k]
            x = np.stack([xs[i] for i in idx])
            y = np.stack([[curves[i][0][k], curves[i][1][k]] for i in idx])
            self.models.append(RBFInterpolator(x, y, kernel="thin_plate_spline", smoothing=1e-3)
                               if len(idx) >= 6 else None)
        self.space = space

    def evals(self, params: dict) -> list[dict]:
        x = features(params, self.space)[None, :]
        out = []
        for k, m in enumerate(self.models):
            if m is None:
                break
            raw_ratio, exam = m(x)[0]
            out.append({"step": k + 1, "tokens_seen": k + 1, "raw_ratio": float(raw_ratio),
                        "exam_val_loss": float(exam)})
        return out


def uniform_params(rng: np.random.Generator, space: SearchSpace) -> dict:
    def draw(r):
        return float(math.exp(rng.uniform(math.log(r.low), math.log(r.high))) if r.log else rng.uniform(r.low, r.high))
    p = {"exam_fraction": draw(space.exam_fraction), "qa_fraction": draw(space.qa_fraction), "lr": draw(space.lr)}
    p["kl_beta"] = draw(space.kl_beta) if (not space.kl_allow_off or rng.random() < 0.5) else 0.0
    if space.micro_batch_sizes:
        p["micro_batch_size"] = int(rng.choice(space.micro_batch_sizes))
    return p


def calibrate(land: MeasuredLandscape, space: SearchSpace, raw_q: float, pass_rate: float, consecutive: int,
              n: int = 4000, objective: str = "tokens_to_gate") -> GateSpec:
    """eps from the raw quantile; exam target by bisection so that P(gate passes | uniform) ≈ pass_rate."""
    rng = np.random.default_rng(12345)
    samples = [land.evals(uniform_params(rng, space)) for _ in range(n)]
    sel_ratio = [min(e["raw_ratio"] for e in ev) for ev in samples]
    eps = float(np.quantile(sel_ratio, raw_q)) - 1.0
    exams = [e["exam_val_loss"] for ev in samples for e in ev]
    lo, hi = min(exams), max(exams)
    for _ in range(40):
        mid = (lo + hi) / 2
        spec = GateSpec(None, eps, mid, consecutive, 100.0)
        rate = np.mean([gate_outcome(ev, spec).gate_passed for ev in samples])
        lo, hi = (mid, hi) if rate < pass_rate else (lo, mid)
    spec = GateSpec(None, eps, hi, consecutive, 100.0, objective, token_scale=float(len(land.models)))
    spec_rate = float(np.mean([gate_outcome(ev, spec).gate_passed for ev in samples]))
    print(f"proxy gate: eps={eps:+.4f} (raw quantile {raw_q}), exam_target={hi:.4f}, "
          f"P(pass | uniform)={spec_rate:.3f} over {n} samples")
    return spec


def search(kind: str, seed: int, budget: int, land: MeasuredLandscape, spec: GateSpec, space: SearchSpace,
           n_startup: int) -> tuple[int | None, float | None]:
    study = optuna.create_study(direction="minimize",
                                sampler=make_sampler(kind, seed=seed, n_startup_trials=n_startup))
    first_pass, best = None, None
    for i in range(budget):
        trial = study.ask()
        params = suggest_params(trial, space, static=static_space(kind))  # as the tune job samples for it
        o = gate_outcome(land.evals(params), spec)
        trial.set_constraint(CONSTRAINT_NAME, o.gate_constraint)
        study.tell(trial, o.gate_objective)
        if o.gate_passed and first_pass is None:
            first_pass = i + 1
        if o.gate_feasible and (best is None or o.gate_objective < best):
            best = o.gate_objective
    return first_pass, best


def measure(n_trials: int, overrides: list[str], exp_dir: Path) -> Path:
    import shutil

    from kcpt.tune.launch import tune_stage3

    shutil.rmtree(exp_dir, ignore_errors=True)  # a scratch experiment: always measured afresh
    cfg = load_config(None, [*overrides, f"tune.num_samples={n_trials}", "tune.asha.enabled=false",
                             "tune.study_name=bench-measure", "logging.progress=false"])
    tune_stage3(cfg, experiment_dir=exp_dir, sampler="random", verbose=0)
    return exp_dir


def real_search(kind: str, seed: int, trials: int, overrides: list[str], out: Path) -> tuple[int | None,
                                                                                         float | None]:
    """One real tune experiment; (trials to the first gate pass or None, best feasible objective or None)."""
    from kcpt.analysis.trials import load_trials
    from kcpt.tune.launch import tune_stage3

    cfg = load_config(None, [*overrides, f"tune.num_samples={trials}", f"tune.sampler_seed={seed}",
                             f"tune.study_name=eff-{kind}-{seed}", "logging.progress=false"])
    res = tune_stage3(cfg, experiment_dir=out / f"{kind}-{seed}", overwrite=True, sampler=kind, verbose=0)
    df = load_trials(res.experiment_dir).sort_values("trial_number")
    passed = [i + 1 for i, p in enumerate(df["gate_passed"].tolist()) if p]
    feas = df[df["feasible"]]["objective"]
    return (passed[0] if passed else None), (float(feas.min()) if len(feas) else None)


def real_loop(args: argparse.Namespace) -> dict:
    """TPE vs random on the real tune job (see the module docstring); prints and returns the figures."""
    out = Path(args.real_dir).resolve()
    overrides = [f"train.output_dir={out / 'runs'}", *args.real_set]
    res: dict[str, dict[str, list]] = {k: {"first": [], "best": []} for k in ("tpe", "random")}
    t0 = time.perf_counter()
    import ray

    from kcpt.tune.launch import init_ray

    started = init_ray(load_config(None, overrides))  # one Ray for every search (each would start and stop its own)
    try:
        for seed in range(args.real_seeds):
            for kind in ("tpe", "random"):
                first, best = real_search(kind, seed, args.real_trials, overrides, out)
                res[kind]["first"].append(first)
                res[kind]["best"].append(best)
    finally:
        if started:
            ray.shutdown()
    K = args.real_trials
    print(f"\nreal loop: {args.real_seeds} seeds × {K} trials per sampler, {time.perf_counter() - t0:.0f} s "
          f"(overrides: {' '.join(args.real_set)})")
    print(f"{'sampler':8} {'trials→first gate pass (mean)':>30} {'seeds passing':>14} {'best feasible objective':>24}")
    rows = {}
    for kind in ("tpe", "random"):
        f, b = res[kind]["first"], [x for x in res[kind]["best"] if x is not None]
        fm = float(np.mean([x if x is not None else K + 1 for x in f]))
        bm = float(np.mean(b)) if b else math.nan
        rows[kind] = {"first_mean": fm, "passing": sum(x is not None for x in f), "best_mean": bm}
        print(f"{kind:8} {fm:30.2f} {rows[kind]['passing']:>10}/{args.real_seeds:<3} {bm:24.4f}")
    ratio = rows["tpe"]["first_mean"] / rows["random"]["first_mean"]
    print(f"real loop, ratio TPE/random, trials to first gate pass: {ratio:.3f} (a seed never passing counts K+1)")
    return {"rows": rows, "raw": res, "ratio_first": ratio}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", action="append", default=[], help="experiment dir(s) of real stage-3 trials")
    ap.add_argument("--no-measure", action="store_true", help="use only --measured experiments")
    ap.add_argument("--measure-trials", type=int, default=8,
                    help="real stage-3 trials the measurement runs (the landscape's curves)")
    ap.add_argument("--measure-dir", default="experiments/bench-measure", help="where the measurement's tune goes")
    ap.add_argument("--set", dest="overrides", action="append",
                    default=["tune.stage_overrides.max_steps=30", "tune.stage_overrides.eval_every=5",
                             "tune.stage_overrides.stop.rule=max_steps",
                             "tune.num_workers=1"],  # as measured (trials then defaulted to 1 worker)
                    help="config overrides of the measurement (default: stage 3 of 30 steps, eval every 5, "
                         "no early stop so every curve is complete)")
    ap.add_argument("--seeds", type=int, default=10, help="proxy mode: sampler seeds per sampler")
    ap.add_argument("--trials", type=int, default=30, help="trial budget K per search")
    ap.add_argument("--n-startup", type=int, default=3, help="n_startup_trials of TPE / GP")
    ap.add_argument("--samplers", default="tpe,random",
                    help="proxy mode: samplers to compare with random search (tpe | gp), comma-separated")
    ap.add_argument("--pass-rate", type=float, default=0.05,
                    help="proxy gate calibration: the share of uniformly sampled points that pass it")
    ap.add_argument("--raw-quantile", type=float, default=0.5,
                    help="proxy gate calibration: the quantile of the measured raw ratios its raw bound sits at")
    ap.add_argument("--consecutive", type=int, default=2, help="proxy gate: evals in a row")
    ap.add_argument("--objective", choices=("tokens_to_gate", "exam"), default="tokens_to_gate",
                    help="the objective the searches minimise (default: the tune job's default, tune.objective)")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--no-proxy", action="store_true", help="skip the proxy mode")
    ap.add_argument("--real-seeds", type=int, default=0, help="seeds of the real-loop mode (0: off)")
    ap.add_argument("--real-trials", type=int, default=4, help="trials per real-loop search")
    ap.add_argument("--real-dir", default="experiments/bench-efficiency-real")
    ap.add_argument("--real-set", action="append",
                    default=["tune.stage_overrides.max_steps=60", "tune.stage_overrides.eval_every=10",
                             "tune.num_workers=1", "tune.space.micro_batch_sizes=[2,4,8]"],
                    help="config overrides of the real-loop mode (default: stage 3 at the demo's eval cadence with "
                         "a budget of 122,880 tokens, where the fastest settings hold the gate and the recipe "
                         "does not; docs/tuning.md finding 25)")
    args = ap.parse_args(argv)
    if not args.no_proxy and args.no_measure and not args.measured:
        ap.error("--no-measure needs --measured EXPERIMENT_DIR (the landscape's trials)")
    if not args.no_proxy and not [k for k in args.samplers.split(",") if k != "random"]:
        ap.error("--samplers: name a sampler to compare with random search (tpe, gp)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out: dict = {}
    if not args.no_proxy:
        out["proxy"] = proxy(args)
    if args.real_seeds:
        out["real"] = real_loop(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


def proxy(args: argparse.Namespace) -> dict:
    """The proxy mode (see the module docstring); prints and returns the figures."""
    space = load_config(None, args.overrides).tune.space  # the space the measurement's tune job searched
    exps = [Path(p) for p in args.measured]
    if not args.no_measure:
        t0 = time.perf_counter()
        exps.append(measure(args.measure_trials, args.overrides, Path(args.measure_dir).resolve()))
        print(f"measured {args.measure_trials} real stage-3 trials in {time.perf_counter() - t0:.0f} s")
    land = MeasuredLandscape(exps, space)
    print(f"landscape: {land.n_trials} measured trials, {len(land.models)} evals each, from {[str(e) for e in exps]}")
    spec = calibrate(land, space, args.raw_quantile, args.pass_rate, args.consecutive, objective=args.objective)
    kinds = [k for k in args.samplers.split(",") if k != "random"] + ["random"]
    res: dict[str, dict[str, list]] = {k: {"first": [], "best": []} for k in kinds}
    for seed in range(args.seeds):
        for kind in kinds:
            first, best = search(kind, seed, args.trials, land, spec, space, args.n_startup)
            res[kind]["first"].append(first)
            res[kind]["best"].append(best)
    K = args.trials

    def first_mean(v: list) -> float:
        return float(np.mean([x if x is not None else K + 1 for x in v]))

    def best_mean(v: list) -> float:
        vals = [x for x in v if x is not None]
        return float(np.mean(vals)) if vals else math.nan

    rows = []
    for kind in kinds:
        f = res[kind]["first"]
        rows.append((kind, first_mean(f), float(np.median([x or K + 1 for x in f])),
                     sum(x is not None for x in f), best_mean(res[kind]["best"])))
    print(f"\n{args.seeds} seeds, budget K={K} trials, n_startup_trials={args.n_startup}")
    print(f"{'sampler':8} {'trials→first gate pass (mean)':>30} {'(median)':>9} {'seeds passing':>14} "
          f"{'best feasible objective @K (mean)':>34}")
    for kind, fm, fmed, npass, bm in rows:
        print(f"{kind:8} {fm:30.2f} {fmed:9.1f} {npass:>10}/{args.seeds:<3} {bm:34.4f}")
    rnd = rows[-1]
    ratios = {kind: {"first": fm / rnd[1], "best": bm / rnd[4]} for kind, fm, _, _, bm in rows[:-1]}
    print()
    for kind, r in ratios.items():
        print(f"ratio {kind}/random, trials to first gate pass: {r['first']:.3f}  (goal ≤ 0.333); "
              f"best feasible objective after K: {r['best']:.4f}  (< 1: better)")
    ratio_first, ratio_best = ratios[kinds[0]]["first"], ratios[kinds[0]]["best"]
    return {"rows": rows, "ratio_first": ratio_first, "ratio_best": ratio_best, "ratios": ratios,
            "spec": spec.__dict__, "raw": res}


if __name__ == "__main__":
    sys.exit(main())
