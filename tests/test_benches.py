"""The speed benches run (reduced sizes): loss memory with equal results, the option table on the CPU, and the
GPU table skipping cleanly without CUDA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_loss_memory_bench_fused_is_smaller_at_equal_results(capsys):
    rows = _load("loss_memory").main(["--seqs", "128", "--batch", "4", "--vocab", "16384", "--hidden", "32",
                                      "--chunk", "64"])
    (r,) = rows
    assert r["ratio"] > 2.0, r                      # logits path: several [N, V] float32 copies; fused: chunks
    assert r["ce_rel_diff"] < 1e-5
    # KL here (~0.02 nats/token) is the difference of two ~log(V) = 9.7-nat sums, so float32 rounding (6e-8) is
    # amplified ~500x in its relative error (seen: 1.2e-5 on one machine); a wrong or missing term shows as O(1e-1).
    assert r["kl_rel_diff"] < 1e-3
    assert r["grad_max_abs_diff"] < 1e-6
    assert "| 4x128 |" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_table_skips_without_cuda(capsys):
    assert _load("train_loop").main(["--gpu"]) == 0
    assert "skipped, no CUDA" in capsys.readouterr().out


def test_option_table_on_cpu(capsys):
    bench = _load("train_loop")
    assert bench.main(["--options", "--steps", "1", "--warmup", "0", "--batch", "1", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    for v in ("today", "+fused_loss", "+compile", "all"):
        assert f"| {v} |" in out


# the tune benches on the real loop, reduced: a tiny stage 3 whose gate holds at its `consecutive`-th eval
TINY_TUNE = ["plan.0.max_steps=6", "plan.0.eval_every=3", "plan.1.max_steps=6", "plan.1.eval_every=3",
             "plan.2.max_steps=6", "plan.2.eval_every=3", "tune.stage_overrides.max_steps=8",
             "tune.stage_overrides.eval_every=2", "tune.stage_overrides.stop.exam_target=100.0",
             "tune.stage_overrides.stop.raw_tolerance=1.0", "tune.stage_overrides.stop.consecutive=2",
             "tune.n_startup_trials=1", "train.num_workers=1", "tune.num_workers=1", "train.micro_batch_size=4",
             "data.seq_len=64", "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
             "model.tiny.intermediate_size=64", "train.max_eval_rows=32"]


@pytest.fixture(scope="module")
def tiny_tune_roots(tmp_path_factory) -> list[str]:
    """Overrides that put both tune benches' prepared data and runs under one directory: the benches' stage-3
    runs start from the same prerequisites (same TINY_TUNE, same prerequisite key), so the second bench reuses
    the first's ``prereq-<hash>`` run (kcpt.tune.launch.ensure_prerequisites) instead of training it again."""
    root = tmp_path_factory.mktemp("tiny_tune")
    return [f"data.prepared_root={root / 'prepared'}", f"train.output_dir={root / 'runs'}"]


@pytest.mark.machine
@pytest.mark.slow
def test_tokens_to_gate_bench_compares_default_recipe_step_and_tuned(tmp_path, capsys, tiny_tune_roots):
    sets = [x for o in [*TINY_TUNE, *tiny_tune_roots] for x in ("--set", o)]
    res = _load("tokens_to_gate").main([*sets, "--seeds", "1", "--trials", "1", "--reeval-top-k", "1",
                                        "--reeval-seeds", "1", "--out", str(tmp_path / "b")])
    per_step = 4 * 64
    assert res["budget_tokens"] == 8 * per_step and res["tokens_before"] >= 3 * 3 * per_step  # ≥ 1 eval/stage
    assert set(res["variants"]) == {"default", "recipe_step", "tuned"}
    for name, v in res["variants"].items():
        assert [r["seed"] for r in v["runs"]] == [0]
        # every run records its tokens to gate: this gate holds at the 2nd eval (step 4), whatever the config
        assert [r["tokens_to_gate"] for r in v["runs"]] == [4 * per_step], name
        assert v["mean"] == v["min"] == v["max"] == v["censored_mean"] == 4 * per_step
        assert v["plan_mean"] == res["tokens_before"] + 4 * per_step and v["final_exam"] is not None
    v = res["variants"]
    assert res["ratio_tuned_default"] == v["tuned"]["censored_mean"] / v["default"]["censored_mean"] == 1.0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in
            (["default"], ["recipe_step"], ["tuned"])}
    assert set(rows) == {"default", "recipe_step", "tuned"}                 # the table has every row
    assert rows["tuned"][1] == "1/1" and rows["tuned"][2] == str(4 * per_step)
    assert "ratio tuned/default, censored mean tokens to gate: 1.000" in out
    check_reevaluation(tmp_path / "b" / "tune", res, seed=1001)


def check_reevaluation(exp, res, *, seed):
    """tune.reeval (top_k 1, 1 seed) in the bench's real tune: the best feasible trial ran once more at the tune's
    train.seed + 1, through the trials' own runner from the same start checkpoint; its record is what that run's
    metrics give; trials.parquet, best_trial.json and `kcpt report` say the choice was made on both runs."""
    import json

    import optuna

    from kcpt.analysis.trials import format_trials_report, load_manifest, load_trials
    from kcpt.config import load_config
    from kcpt.train.rundir import read_metrics
    from kcpt.tune import reeval
    from kcpt.tune.launch import gate_spec
    from kcpt.tune.objective import gate_outcome

    assert res["tuned_reeval"]["runs"] == 2 and res["tuned_reeval"]["seeds"] == [None, seed]
    m = load_manifest(exp)
    assert m["reeval"] == {"top_k": 1, "seeds": 1}
    study = optuna.load_study(study_name=m["study_name"], storage=m["storage"])
    recs = reeval.records(study)
    assert list(recs) == [study.best_trial.number]
    (rec,) = recs[study.best_trial.number]
    assert rec.seed == seed
    evals = [r for r in read_metrics(rec.run_dir) if r["stage"] == m["stage"]]
    own = [r for r in read_metrics(study.best_trial.user_attrs["run_dir"]) if r["stage"] == m["stage"]]
    assert evals[0]["raw_val_loss"] == pytest.approx(own[0]["raw_val_loss"])  # the same start checkpoint
    # one worker: the trial ran its loop in its Tune actor and the re-run in a Ray task, the same in-process path
    # (neither made a TorchTrainer, whose storage would be the run dir's ray/)
    assert m["trial_in_actor"] and not [d for d in (rec.run_dir, study.best_trial.user_attrs["run_dir"])
                                        if (Path(d) / "ray").exists()]
    assert [r["train_loss"] for r in evals[1:]] != [r["train_loss"] for r in own[1:]]  # another data order
    spec = gate_spec(load_config(exp / "config.yaml"), m["stage"], m["baseline_raw_best"], m["tokens_before"])
    o = gate_outcome(evals, spec)
    assert rec.score == pytest.approx(o.gate_score) and rec.gate_passed == o.gate_passed
    df = load_trials(exp)
    row = df[df["trial_number"] == rec.trial_number].iloc[0]
    assert row["reeval_runs"] == 2
    assert row["reeval_mean_score"] == pytest.approx((study.best_trial.value + rec.score) / 2)
    assert (df[df["trial_number"] != rec.trial_number]["reeval_runs"] == 0).all()
    best = json.loads((exp / "best_trial.json").read_text())
    assert best["trial_number"] == rec.trial_number and "tune.reeval" in best["chosen_by"]
    report = format_trials_report(exp)
    assert "mean_score" in report and "chosen by: lowest mean score over 2 runs (tune.reeval)" in report


def test_tokens_to_gate_default_is_the_issues_recipe_default():
    """default = 70:30 exam:raw at the stage's LR with no KL (the demo config sets β 0.1); recipe_step = the same
    LR, no KL, with the 70:30 → 50:50 → 60:40 steps."""
    from kcpt.config import load_config

    cfg = load_config(None, [])
    v = _load("tokens_to_gate").variant_configs(cfg, None)
    d, s = v["default"].stage("stage3"), v["recipe_step"].stage("stage3")
    assert cfg.stage("stage3").kl_beta == 0.1 and d.kl_beta == 0.0 == s.kl_beta
    assert d.sources == {"qa_train": 0.35, "example_train": 0.35, "raw_train": 0.30} and not d.mixture_schedule
    assert d.lr.peak == s.lr.peak == cfg.stage("stage3").lr.peak
    assert [round(1 - p.weights["raw_train"], 6) for p in s.mixture_schedule] == [0.7, 0.5, 0.6]
    assert set(v) == {"default", "recipe_step"}                             # no tuned best given: no tuned row


@pytest.mark.machine
@pytest.mark.slow
def test_tune_efficiency_real_loop_mode(tmp_path, capsys, tiny_tune_roots):
    real = [x for o in [*TINY_TUNE, *tiny_tune_roots] for x in ("--real-set", o)]
    assert _load("tune_efficiency").main(["--no-proxy", "--real-seeds", "1", "--real-trials", "1", *real,
                                          "--real-dir", str(tmp_path / "e"), "--json", str(tmp_path / "r.json")]) == 0
    import json

    r = json.loads((tmp_path / "r.json").read_text())["real"]
    for kind in ("tpe", "random"):
        # the recipe's trial is enqueued first and its gate holds: the first trial passes for both samplers
        assert r["raw"][kind]["first"] == [1] and r["rows"][kind]["passing"] == 1
        assert r["raw"][kind]["best"][0] is not None and r["raw"][kind]["best"][0] < 1.0   # passed: value < 1
    assert "real loop, ratio TPE/random" in capsys.readouterr().out


@pytest.mark.machine
@pytest.mark.slow
def test_data_memory_bench_prints_the_stream_loader_at_two_sizes(capsys, tmp_path):
    """The in-process stream loader at two corpus sizes, each row a fresh child process. The bench's ray_data rows
    (one Ray Train worker, peak from its eval records' ``host_peak_rss_mb``, which ``tests/test_train_ray.py``'s Ray
    Data test checks) cost a Ray start and a worker group each (29 s of this test's 41 s): they run by hand."""
    bench = _load("data_memory")
    rows = bench.main(["--scales", "1,2", "--steps", "1", "--work", str(tmp_path), "--loaders", "stream"])
    assert [(r["loader"], r["scale"]) for r in rows] == [("stream", 1), ("stream", 2)]
    by = {(r["loader"], r["scale"]): r for r in rows}
    assert by["stream", 2]["rows"] > by["stream", 1]["rows"]  # the repeated corpus is really larger (dedup off)
    assert all(r["peak_rss_mb"] > 100 for r in rows) and by["stream", 1]["ratio"] == 1.0
    out = capsys.readouterr().out
    assert "| stream | ×1 |" in out and "| stream | ×2 |" in out


@pytest.mark.machine
@pytest.mark.slow
def test_train_loop_bench_has_a_loader_column(capsys):
    assert _load("train_loop").main(["--workers", "1", "--steps", "4", "--batch", "2", "--seq-len", "64",
                                     "--loaders", "ray_data,memory"]) == 0
    out = capsys.readouterr().out
    assert "workers | loader | " in out and "\n1 | ray_data | " in out and "\n1 | memory | " in out
    ratio = out.split("\n1 | ray_data | ")[1].split(" | ")[3]  # the "vs memory" cell, measured in this run
    assert float(ratio) > 0


def test_tune_efficiency_proxy_counts_trials_to_the_first_gate_pass():
    """The proxy's search on a scripted landscape (real Optuna): trials to the first pass and the best feasible
    objective are those of the very trials the sampler drew (recomputed here from the same seed)."""
    import optuna

    from kcpt.config import SearchSpace
    from kcpt.tune.objective import GateSpec, gate_outcome
    from kcpt.tune.space import suggest_params

    te = _load("tune_efficiency")

    class Landscape:  # a higher LR lowers the exam loss faster and lifts the raw loss
        models = [None] * 4

        def evals(self, p):
            return [{"step": k, "tokens_seen": k, "raw_ratio": 1.0 + 3.0 * p["lr"] * k,
                     "exam_val_loss": 3.0 - 150.0 * p["lr"] * k * p["exam_fraction"]} for k in range(1, 5)]

    space, land = SearchSpace(), Landscape()
    spec = GateSpec(None, 0.02, 2.8, 2, objective="tokens_to_gate", token_scale=4.0)
    first, best = te.search("random", 3, 25, land, spec, space, 3)
    sampler = optuna.samplers.RandomSampler(seed=3)
    study = optuna.create_study(sampler=sampler)
    outcomes = [gate_outcome(land.evals(suggest_params(study.ask(), space)), spec) for _ in range(25)]
    passed = [i + 1 for i, o in enumerate(outcomes) if o.gate_passed]
    assert passed and isinstance(first, int) and first == passed[0] and 1 < first <= 25  # not trivially trial 1
    assert best == min(o.gate_objective for o in outcomes if o.gate_feasible) < 1.0        # a pass: value < 1
    # the GP searches the static space the job gives it (--sampler gp) and finds the pass region too
    gp_first, gp_best = te.search("gp", 3, 12, land, spec, space, 3)
    assert isinstance(gp_first, int) and gp_first <= 12 and gp_best < 1.0


def test_tune_efficiency_proxy_has_a_micro_batch_axis_when_the_space_searches_it():
    """A searched micro-batch is the landscape's fifth axis (log2 over the listed sizes), so curves measured at
    micro-batch 2 and 8 are not averaged into one point; without it the axes are the four of the old proxy."""
    import numpy as np

    from kcpt.config import load_config

    te = _load("tune_efficiency")
    p = {"exam_fraction": 0.4, "qa_fraction": 0.8, "lr": 1e-4, "kl_beta": 0.0}
    space = load_config(None, ["tune.space.micro_batch_sizes=[2,4,8]"]).tune.space
    assert [te.features({**p, "micro_batch_size": m}, space)[4] for m in (2, 4, 8)] == [0.0, 0.5, 1.0]
    assert te.features({**p, "micro_batch_size": 2}, space)[:4] == pytest.approx([0.0, 1.0, 0.0, -0.25])
    assert len(te.features(p, load_config(None, []).tune.space)) == 4
    draws = {te.uniform_params(np.random.default_rng(s), space)["micro_batch_size"] for s in range(30)}
    assert draws == {2, 4, 8}


@pytest.mark.machine
def test_bucket_footprint_bench_leaves_no_checkpoint_copies_and_the_driver_downloads_less(s3_server, capsys,
                                                                                          tmp_path):
    """Two tiny runs at the (test session's moto) bucket: each keeps checkpoints in the bucket and none in the
    node scratch; the driver's check downloads a fraction of what a whole-checkpoint fetch does; a fresh node
    resuming a stopped run downloads less than the checkpoints it reads."""
    tiny = ["data.seq_len=64", "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
            "model.tiny.intermediate_size=64"]
    rows = _load("bucket_footprint").main(["--runs", "2", "--steps", "2", "--bucket", f"{s3_server}/bench",
                                            "--work", str(tmp_path),
                                            *(a for s in tiny for a in ("--set", s))])
    scratch = [r for r in rows if r["table"] == "scratch"]
    assert len(scratch) == 2 and all(r["kept_in_bucket"] > 0 and r["scratch_now"] == 0 for r in scratch)
    assert scratch[1]["scratch_before"] == scratch[0]["kept_in_bucket"] + scratch[1]["kept_in_bucket"]
    fetched, inspected = (r["bytes"] for r in rows if r["table"] == "driver")
    assert 0 < inspected < fetched
    resume = next(r for r in rows if r["table"] == "resume")  # a fresh node leaves the CPT best's optimizer state
    assert 0 < resume["downloaded"] < resume["whole"]
    out = capsys.readouterr().out
    assert "| inspect (the driver's check: now) |" in out and "| the parts read (now) |" in out


@pytest.mark.parametrize(("args", "needle"), [
    (["--no-measure"], "--no-measure needs --measured EXPERIMENT_DIR"),
    (["--samplers", "random"], "--samplers: name a sampler to compare with random search"),
])
def test_tune_efficiency_usage_errors_are_one_line(args, needle, capsys):
    """Both ended in a traceback (max() of an empty landscape; a KeyError after the whole search)."""
    with pytest.raises(SystemExit) as e:
        _load("tune_efficiency").main(args)
    assert e.value.code == 2 and needle in capsys.readouterr().err
