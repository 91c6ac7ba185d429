"""Re-evaluation records and the best-trial choice they drive (kcpt.tune.reeval, kcpt.tune.export), on a real
Optuna study in SQLite; the re-evaluation runs themselves are tested on the real tune job (test_tune_stage3)."""

from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest
from conftest import stage3_study

from kcpt.analysis.trials import format_trials_report
from kcpt.config import load_config
from kcpt.tune import reeval
from kcpt.tune.export import export_results
from kcpt.tune.searcher import CONSTRAINT_NAME


def _study(tmp_path):
    """Trials #0 (value .30), #1 (.35), #2 (.20 but infeasible), #3 (.25 pruned), fixed params per trial, in an
    experiment directory (tmp_path)."""
    study, dist = stage3_study(tmp_path)
    for i, (value, constraint, state) in enumerate([(0.30, -0.01, "COMPLETE"), (0.35, -0.02, "COMPLETE"),
                                                    (0.20, 0.05, "COMPLETE"), (None, -0.01, "PRUNED")]):
        t = study.ask(dist)
        t.set_user_attr("gate_passed", value is not None and value < 1)
        t.set_user_attr("tokens_to_gate", 1000 * (i + 1))
        t.set_constraint(CONSTRAINT_NAME, constraint)
        study.tell(t, value, state=getattr(optuna.trial.TrialState, state))
    return study


def _record(n: int, seed: int, score: float, passed: bool = True) -> reeval.ReevalRecord:
    return reeval.ReevalRecord(n, seed, score, score, -0.01, passed, 2000 if passed else None, f"/runs/{n}-{seed}")


def test_candidates_are_the_best_complete_feasible_trials(tmp_path):
    study = _study(tmp_path)
    assert [t.number for t in reeval.candidates(study, 2)] == [0, 1]  # #2 infeasible, #3 pruned
    assert [t.number for t in reeval.candidates(study, 5)] == [0, 1]


def test_the_best_trial_is_the_lowest_mean_over_its_runs(tmp_path):
    study = _study(tmp_path)
    best, summary = reeval.best_trial(study)
    assert best.number == 0 and summary is None           # no re-evaluation: the study's best feasible trial
    reeval.save_record(study, _record(0, 1, 1.40, passed=False))   # #0 was lucky: its re-run never held
    reeval.save_record(study, _record(1, 1, 0.33))
    reeval.save_record(study, _record(1, 2, 0.34))
    reeval.save_record(study, _record(0, 2, 0.31))
    recs = reeval.records(study)
    assert [r.seed for r in recs[0]] == [1, 2] and len(recs[1]) == 2
    best, summary = reeval.best_trial(study)
    assert best.number == 1
    assert summary["mean_score"] == pytest.approx((0.35 + 0.33 + 0.34) / 3)
    assert summary["gate_passes"] == 3 and summary["seeds"] == [None, 1, 2]
    assert summary["tokens_to_gate"] == [2000, 2000, 2000]


def test_export_writes_the_reevaluated_choice(tmp_path):
    study = _study(tmp_path)
    reeval.save_record(study, _record(0, 1, 1.40, passed=False))
    reeval.save_record(study, _record(1, 1, 0.33))
    paths = export_results(tmp_path)
    df = pd.read_parquet(paths.trials).set_index("trial_number")
    assert df.loc[0, "reeval_runs"] == 2 and df.loc[0, "reeval_gate_passes"] == 1
    assert df.loc[0, "reeval_mean_score"] == pytest.approx((0.30 + 1.40) / 2)
    assert df.loc[2, "reeval_runs"] == 0 and pd.isna(df.loc[2, "reeval_mean_score"])
    best = json.loads((tmp_path / "best_trial.json").read_text())
    assert best["trial_number"] == 1 and "tune.reeval" in best["chosen_by"]
    cfg = load_config(paths.best_config)
    assert cfg.stage("stage3").lr.peak == pytest.approx(study.trials[1].params["lr"])
    report = format_trials_report(tmp_path)                 # `kcpt report`: the runs and why #1 was chosen
    assert "mean_score" in report and "best feasible trial: #1" in report
    assert "gate held in 2/2 runs; tokens_to_gate per run (own, then seeds 1): 2000, 2000" in report


def test_a_failed_rerun_is_reported_and_left_out_and_a_resume_skips_recorded_runs(tmp_path):
    """reevaluate's plumbing: runs go to ``runs/reeval-<n>-seed<s>`` at train.seed + 1 …, a run that raises (the
    injected failure) is logged and not recorded, and a second call (a resumed experiment) runs only what is
    missing. The runs themselves are the real stage loop in test_benches' tokens_to_gate test."""
    from kcpt.tune.launch import TrialContext, reevaluate

    study = _study(tmp_path)
    cfg = load_config(None, ["train.seed=7"])
    calls, lines = [], []

    def runner(c, *, stage, run_dir, **_):
        calls.append((run_dir.name, c.train.seed, c.stage(stage).lr.peak))
        if c.train.seed == 9 and len(calls) < 5:
            raise RuntimeError("worker lost")
        run_dir.mkdir(parents=True)
        evals = [{"stage": stage, "step": s, "tokens_seen": 100 * s, "raw_ratio": 1.0, "exam_val_loss": 2.0,
                  "gate_streak": s} for s in (0, 1, 2, 3)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))

    ctx = TrialContext(cfg.model_dump(mode="json"), "stage3", None, 7.0, str(tmp_path / "runs"), runner=runner)
    new = reevaluate(study, ctx, top_k=2, seeds=2, log=lines.append)
    assert [c[:2] for c in calls] == [("reeval-0-seed8", 8), ("reeval-0-seed9", 9), ("reeval-1-seed8", 8),
                                      ("reeval-1-seed9", 9)]
    assert calls[0][2] == pytest.approx(study.trials[0].params["lr"])    # the trial's own settings
    assert [(r.trial_number, r.seed) for r in new] == [(0, 8), (1, 8)]
    assert sum("failed (RuntimeError: worker lost)" in ln for ln in lines) == 2
    assert all(r.gate_passed and r.tokens_to_gate == 300 for r in new)   # consecutive 3: the 3rd eval
    again = reevaluate(study, ctx, top_k=2, seeds=2, log=lines.append)
    assert [c[0] for c in calls[4:]] == ["reeval-0-seed9", "reeval-1-seed9"]  # only the missing runs
    assert [(r.trial_number, r.seed) for r in again] == [(0, 9), (1, 9)]
    assert {(n, r.seed) for n, rs in reeval.records(study).items() for r in rs} == {(0, 8), (0, 9), (1, 8), (1, 9)}


def test_an_experiment_without_a_feasible_trial_is_reported_and_plotted(tmp_path):
    """No feasible trial: best_trial.json holds null, and `kcpt report` refused it as damaged; the objective plot
    failed on the trials without values (FAIL)."""
    import matplotlib

    matplotlib.use("Agg")
    from kcpt.analysis.plots import plot_objective_vs_constraint
    from kcpt.analysis.trials import best_trial_info, load_trials

    study, dist = stage3_study(tmp_path)
    t = study.ask(dist)
    t.set_constraint(CONSTRAINT_NAME, 0.05)
    study.tell(t, 1.7)                                      # infeasible
    study.tell(study.ask(dist), state=optuna.trial.TrialState.FAIL)  # no value, no constraint
    paths = export_results(tmp_path)
    assert paths.best is None and paths.best_config is None
    assert json.loads((tmp_path / "best_trial.json").read_text()) is None
    assert best_trial_info(tmp_path) is None
    report = format_trials_report(tmp_path)
    assert "best feasible trial: none" in report and "FAIL" in report
    fig = plot_objective_vs_constraint(load_trials(tmp_path))
    assert [c.get_label() for c in fig.axes[0].collections] == ["infeasible"]  # the FAIL trial has nothing to plot
