"""A best trial at a bound of its search range is reported (kcpt.tune.space.range_edges), in best_trial.json and
`kcpt report`, on a real Optuna study in SQLite."""

from __future__ import annotations

import json

from conftest import stage3_study

from kcpt.analysis.trials import format_trials_report
from kcpt.config import load_config
from kcpt.tune.export import export_results
from kcpt.tune.searcher import CONSTRAINT_NAME
from kcpt.tune.space import range_edges

SPACE = load_config(None, ["tune.space.extra={lr.min_ratio: {low: 0.05, high: 0.3}}"]).tune.space


def test_params_within_two_percent_of_a_bound_are_at_the_edge():
    inside = {"exam_fraction": 0.6, "qa_fraction": 0.5, "lr": 5e-4, "kl_beta": 0.1, "lr.min_ratio": 0.1}
    assert range_edges(inside, SPACE) == []
    # log ranges are measured in log space: 2.9e-3 is 1 % of log(3e-3/1e-4) below the top, 2.5e-3 is 5 %
    edges = range_edges({**inside, "lr": 2.9e-3, "exam_fraction": 0.405, "lr.min_ratio": 0.3}, SPACE)
    assert {(e["param"], e["bound"], e["edge"]) for e in edges} == {
        ("lr", "high", 3e-3), ("exam_fraction", "low", 0.4), ("lr.min_ratio", "high", 0.3)}
    assert range_edges({**inside, "lr": 2.5e-3, "exam_fraction": 0.42}, SPACE) == []
    # a β that is not used (KL off) is no finding; a used one at the top is
    assert range_edges({**inside, "kl_on": False, "kl_beta": 3.0}, SPACE) == []
    assert [e["param"] for e in range_edges({**inside, "kl_beta": 3.0}, SPACE)] == ["kl_beta"]


def test_export_and_report_name_the_parameters_at_a_bound(tmp_path):
    study, dist = stage3_study(tmp_path)
    for value, lr in ((0.3, 3e-3), (0.4, 5e-4)):  # the best trial (#0) trains at the top of the LR range
        study.enqueue_trial({"exam_fraction": 0.6, "qa_fraction": 0.5, "lr": lr})
        t = study.ask(dist)
        t.set_constraint(CONSTRAINT_NAME, -0.01)
        study.tell(t, value)
    export_results(tmp_path)
    best = json.loads((tmp_path / "best_trial.json").read_text())
    assert best["trial_number"] == 0
    assert best["at_range_edge"] == [{"param": "lr", "value": 3e-3, "bound": "high", "range": [1e-4, 3e-3],
                                      "edge": 3e-3}]
    note = next(ln for ln in format_trials_report(tmp_path).splitlines() if ln.strip().startswith("note:"))
    assert "lr 0.003 at its high bound 0.003" in note and "widen tune.space.<param>" in note
    assert "tune.space.lr=" in note
