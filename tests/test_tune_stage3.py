"""The stage-3 tune job end to end on the real stage loop (shared session experiment, see conftest)."""

from __future__ import annotations

import math
import os

import optuna
import pandas as pd
import pytest
import yaml

from kcpt.analysis.trials import format_trials_report, load_curves, load_manifest, load_trials
from kcpt.cli import main as kcpt_main
from kcpt.config import load_config
from kcpt.tune.export import TRIAL_COLUMNS
from kcpt.tune.searcher import CONSTRAINT_NAME
from kcpt.tune.space import mixture_weights

pytestmark = pytest.mark.slow


def test_outputs_exist_and_agree_with_the_study(tune_experiment):
    exp = tune_experiment.exp_dir
    m = load_manifest(exp)
    assert m["storage"].startswith("sqlite:///") and (exp / "optuna.db").is_file()
    assert m["baseline_raw_best"] and m["baseline_raw_best"] > 0
    assert (exp / "tune").is_dir() and list((exp / "tune").glob("*/result.json"))
    df = load_trials(exp)
    assert len(df) == 3 and set(TRIAL_COLUMNS) <= set(df.columns)
    assert {"param_exam_fraction", "param_qa_fraction", "param_lr", "param_kl_on"} <= set(df.columns)
    study = optuna.load_study(study_name=m["study_name"], storage=m["storage"])
    trials = study.get_trials()
    assert len(trials) == 3
    for t, (_, row) in zip(trials, df.iterrows(), strict=True):
        assert row["status"] == t.state.name
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        assert CONSTRAINT_NAME in t.constraints  # the constraint reached Optuna for every trial
        assert row["feasible"] == (t.state == optuna.trial.TrialState.COMPLETE and t.constraints[CONSTRAINT_NAME] <= 0)
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert not t.user_attrs["stopped_early"] and math.isclose(t.value, row["objective"])
            # the selected eval is feasible exactly when the constraint is ≤ 0
            assert (row["selected_raw_ratio"] <= 1 + m["eps"] + 1e-12) == (row["constraint"] <= 0)
        assert row["run_dir"] and row["num_evals"] >= 1
        assert t.user_attrs["experiment"] == row["experiment"] == str(exp)  # whose trial, in a shared study
        # exam accuracy reached the trial table (exam_val has multiple-choice and short-answer items)
        assert 0 <= row["selected_exam_acc"] <= 1 and 0 <= row["selected_exam_f1"] <= 1


def test_the_console_says_what_the_study_holds(tune_experiment):
    from conftest import assert_console_agrees_with_study

    m = load_manifest(tune_experiment.exp_dir)
    study = optuna.load_study(study_name=m["study_name"], storage=m["storage"])
    assert_console_agrees_with_study(tune_experiment.console, study)


def test_trials_started_from_the_same_checkpoint_and_baseline(tune_experiment):
    exp = tune_experiment.exp_dir
    m = load_manifest(exp)
    curves = load_curves(exp)
    assert not curves.empty
    starts = curves[curves["step"] == 0]
    # every trial's step-0 eval measures the same stage-2 checkpoint: identical raw and exam losses
    assert starts["trial_number"].nunique() == 3
    assert starts["raw_val_loss"].nunique() == 1 and starts["exam_val_loss"].nunique() == 1
    assert starts["exam_acc"].nunique() == 1 and curves["exam_acc"].notna().all()  # scored at every eval
    ratio = starts["raw_ratio"].iloc[0]
    assert ratio == pytest.approx(starts["raw_val_loss"].iloc[0] / m["baseline_raw_best"], rel=1e-6)


def test_world_size_1_trials_ran_their_loop_in_the_tune_actor(tune_experiment):
    """No TorchTrainer at world size 1: neither the prerequisite run (one Ray task) nor the trials' run dirs hold
    Ray Train storage (``ray/``), and Tune still got every eval of the tuned stage, with the running gate metrics,
    then the final summary."""
    import json
    from pathlib import Path

    from kcpt.train.rundir import read_metrics

    exp = tune_experiment.exp_dir
    manifest = load_manifest(exp)
    assert manifest["trial_in_actor"] is True
    prereq = Path(manifest["prereq_run_dir"])
    assert (prereq / "summary.json").is_file() and not (prereq / "ray").exists(), sorted(os.listdir(prereq))
    pids = set()
    for _, row in load_trials(exp).iterrows():
        assert row["run_dir"] and not (Path(row["run_dir"]) / "ray").exists(), row["run_dir"]
        assert Path(row["trial_dir"]).parent == Path(exp) / "tune"  # Tune's trial dir in the experiment
        results = [json.loads(line) for line in (Path(row["trial_dir"]) / "result.json").read_text().splitlines()]
        pids |= {r["pid"] for r in results}
        evals = [r for r in read_metrics(row["run_dir"]) if r["stage"] == "stage3"]
        reported = [r for r in results if not r.get("trial_final")]
        if not row["stopped_early"]:
            assert results[-1]["trial_final"] and [r["step"] for r in reported] == [r["step"] for r in evals]
        assert reported and all("gate_score" in r and "stage_done" in r for r in reported)
    assert len(pids) == 1  # one after the other, every trial's loop ran in the same reused actor process


def test_best_config_carries_the_best_feasible_trial(tune_experiment):
    exp = tune_experiment.exp_dir
    df = load_trials(exp)
    study = optuna.load_study(study_name=load_manifest(exp)["study_name"],
                              storage=load_manifest(exp)["storage"])
    feasible = df[df["feasible"]]
    if feasible.empty:
        assert not (exp / "best_config.yaml").exists()
        pytest.skip("no feasible trial in this small experiment")
    best = study.best_trial
    assert best.number == int(feasible.sort_values("objective").iloc[0]["trial_number"])
    cfg = load_config(exp / "best_config.yaml")
    st3 = cfg.stage("stage3")
    assert st3.sources == pytest.approx(mixture_weights(best.params, cfg.tune.space))
    assert st3.lr.peak == pytest.approx(best.params["lr"])
    assert st3.kl_beta == pytest.approx(best.params.get("kl_beta", 0.0))
    assert yaml.safe_load((exp / "best_config.yaml").read_text())["plan"][0]["name"] == "cpt"  # a full config


def test_kcpt_report_prints_the_trial_table(tune_experiment, capsys):
    exp = tune_experiment.exp_dir
    assert kcpt_main(["report", str(exp)]) == 0
    out = capsys.readouterr().out
    assert out == format_trials_report(exp) + "\n"
    df = pd.read_parquet(exp / "trials.parquet")
    for status in df["status"]:
        assert status in out
    assert "exam@sel" in out and "raw_gate" in out


def test_recipe_trial_runs_first_and_every_trial_records_tokens_to_gate(tune_experiment):
    from kcpt.train.rundir import read_metrics
    from kcpt.tune.space import recipe_points

    exp = tune_experiment.exp_dir
    m = load_manifest(exp)
    assert m["objective"] == "tokens_to_gate" and m["asha_time_attr"] == "tokens_seen"
    df = load_trials(exp).sort_values("trial_number")
    (recipe,) = recipe_points(tune_experiment.cfg)
    first = df.iloc[0]
    for k, v in recipe.items():                       # trial #0 is the recipe's own stage 3, enqueued
        assert first[f"param_{k}"] == (pytest.approx(v) if isinstance(v, float) else v), k
    assert df.iloc[1]["param_lr"] != pytest.approx(recipe["lr"])
    # the micro-batch is searched token-fair: every trial evaluates at the same tokens, a micro-batch of 4 in
    # twice the steps of 8 (16 steps × 8 rows × 256 positions, 1 worker, eval every 4 steps at 8 rows)
    assert set(df["param_micro_batch_size"]) == {4, 8}
    for _, row in df.iterrows():
        evals = [r for r in read_metrics(row["run_dir"]) if r["stage"] == m["stage"] and r["step"] > 0]
        mb = int(row["param_micro_batch_size"])
        assert [r["tokens_seen"] for r in evals] == [k * 4 * 8 * 256 for k in range(1, len(evals) + 1)]
        assert [r["step"] for r in evals] == [k * 4 * 8 // mb for k in range(1, len(evals) + 1)]
        loop_tokens = evals[-1]["tokens_to_gate"]     # the stage loop's own record, in every eval
        if pd.isna(row["tokens_to_gate"]):
            assert not row["gate_passed"] and loop_tokens is None and pd.isna(row["plan_tokens_to_gate"])
        else:
            assert row["gate_passed"] and row["tokens_to_gate"] == loop_tokens
            assert row["plan_tokens_to_gate"] == m["tokens_before"] + row["tokens_to_gate"]
        assert evals[-1]["tokens_seen"] > 0
    assert m["tokens_before"] > 0

