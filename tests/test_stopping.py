"""Stop rules, table-driven from the rules of the issue. Each row: a stop config, a baseline, a sequence of
evals (raw, exam) and the expected (stop, passed, reason) after each eval; the last eval of a row is
``final`` (max_steps reached) when the row says so."""

from __future__ import annotations

import json

import pytest

from kcpt.config import StopConfig
from kcpt.errors import ConfigError
from kcpt.train.stopping import NO_GAIN, StopState, baseline_of, improved, record_start, update_stop

GO = (False, False, "")
PLATEAU = StopConfig(rule="plateau", patience=2, min_delta=0.0, min_delta_relative=0.002)
PLATEAU_ABS = StopConfig(rule="plateau", patience=2, min_delta=0.05, min_delta_relative=0.0)
EXAM = StopConfig(rule="exam", patience=2, exam_target=1.0, raw_tolerance=0.03, min_delta_relative=0.002)
EXAM_NO_BOUND = EXAM.model_copy(update={"raw_bound": False})
GATE = StopConfig(rule="gate", exam_target=1.0, raw_tolerance=0.03, consecutive=3)
# exam accuracy (a fraction, higher is better): target 0.6, plateau needs +0.05 over the reference
EXAM_ACC = StopConfig(rule="exam", exam_metric="accuracy", patience=2, exam_target=0.6, raw_tolerance=0.03,
                      min_delta=0.05, min_delta_relative=0.0)
GATE_ACC = StopConfig(rule="gate", exam_metric="accuracy", exam_target=0.6, raw_tolerance=0.03, consecutive=2)

CASES = [
    # --- plateau (CPT): patience 2, 0.2 % relative
    ("plateau_stops_after_patience", PLATEAU, None, False,
     [(3.0, None), (2.9, None), (2.899, None), (2.898, None)],
     [GO, GO, GO, (True, True, "plateau")]),                       # 2.899 / 2.898 are < 0.2 % below 2.9
    ("plateau_small_gains_do_not_add_up_past_ref", PLATEAU, None, False,
     [(2.0, None), (1.998, None), (1.9961, None)],                 # 0.1 %, then 0.195 % vs ref 2.0
     [GO, GO, (True, True, "plateau")]),
    ("plateau_significant_gain_resets_patience", PLATEAU, None, False,
     [(3.0, None), (3.0, None), (2.5, None), (2.5, None), (2.6, None)],
     [GO, GO, GO, GO, (True, True, "plateau")]),
    ("plateau_absolute_min_delta", PLATEAU_ABS, None, False,
     [(3.0, None), (2.96, None), (2.94, None)],                    # 0.04 then 0.06 below 3.0 → second resets
     [GO, GO, GO]),
    ("plateau_max_steps_passes", PLATEAU, None, True,
     [(3.0, None), (2.0, None), (1.0, None)],
     [GO, GO, (True, True, "max_steps")]),
    ("plateau_nan_is_no_improvement", PLATEAU, None, False,
     [(3.0, None), (float("nan"), None), (float("nan"), None)],
     [GO, GO, (True, True, "plateau")]),
    # --- max_steps rule: never early
    ("max_steps_never_early", StopConfig(rule="max_steps", patience=1), None, True,
     [(3.0, None), (3.0, None), (3.0, None), (3.0, None)],
     [GO, GO, GO, (True, True, "max_steps")]),
    # --- exam (stages 1/2): baseline 2.00 → raw bound 2.06, target 1.0, patience 2
    ("exam_target_and_raw_ok", EXAM, 2.0, False,
     [(2.05, 1.5), (2.05, 0.95)],
     [GO, (True, True, "exam_target")]),
    ("exam_target_raw_on_bound_ok", EXAM, 2.0, False,
     [(2.06, 1.0)],
     [(True, True, "exam_target")]),
    ("exam_plateau_and_raw_ok", EXAM, 2.0, False,
     [(2.0, 1.5), (2.0, 1.5), (2.0, 1.499)],
     [GO, GO, (True, True, "exam_plateau")]),
    ("exam_done_but_raw_over_continues_then_recovers", EXAM, 2.0, False,
     [(2.07, 0.9), (2.10, 0.8), (2.05, 0.8)],
     [(False, False, "raw_over_tolerance"), (False, False, "raw_over_tolerance"), (True, True, "exam_target")]),
    ("exam_raw_over_until_max_steps_fails", EXAM, 2.0, True,
     [(2.07, 0.9), (2.08, 0.85)],
     [(False, False, "raw_over_tolerance"), (True, False, "max_steps: raw over tolerance")]),
    ("exam_not_done_at_max_steps_fails", EXAM, 2.0, True,
     [(2.0, 3.0), (2.0, 2.0)],
     [GO, (True, False, "max_steps: exam not done")]),
    ("exam_not_done_and_raw_over_at_max_steps", EXAM, 2.0, True,
     [(2.0, 3.0), (2.2, 2.0)],
     [GO, (True, False, "max_steps: exam not done, raw over tolerance")]),
    ("exam_plateau_with_raw_over_then_raw_recovers", EXAM, 2.0, False,
     [(2.0, 1.5), (2.1, 1.5), (2.1, 1.5), (2.03, 1.5)],
     [GO, GO, (False, False, "raw_over_tolerance"), (True, True, "exam_plateau")]),
    ("exam_raw_bound_off_ignores_raw", EXAM_NO_BOUND, None, False,
     [(9.0, 0.5)],
     [(True, True, "exam_target")]),
    ("exam_raw_bound_off_ignores_even_a_given_baseline", EXAM_NO_BOUND, 2.0, False,
     [(9.0, 0.5)],
     [(True, True, "exam_target")]),
    # --- gate (stage 3): baseline 2.00, eps 0.03 → 2.06; target 1.0; 3 consecutive
    ("gate_three_in_a_row", GATE, 2.0, False,
     [(2.05, 0.9), (2.00, 1.0), (2.06, 0.5)],
     [GO, GO, (True, True, "gate")]),
    ("gate_raw_miss_resets_streak", GATE, 2.0, False,
     [(2.05, 0.9), (2.05, 0.9), (2.07, 0.9), (2.05, 0.9), (2.05, 0.9), (2.05, 0.9)],
     [GO, GO, GO, GO, GO, (True, True, "gate")]),
    ("gate_exam_miss_resets_streak", GATE, 2.0, False,
     [(2.05, 0.9), (2.05, 0.9), (2.05, 1.1), (2.05, 0.9)],
     [GO, GO, GO, GO]),
    # --- exam accuracy: exam ≥ target, rising accuracy is an improvement, falling is not
    ("acc_target_met_from_below", EXAM_ACC, 2.0, False,
     [(2.0, 0.3), (2.0, 0.5), (2.0, 0.6)],
     [GO, GO, (True, True, "exam_target")]),
    ("acc_rising_resets_plateau", EXAM_ACC, 2.0, False,
     [(2.0, 0.1), (2.0, 0.2), (2.0, 0.3), (2.0, 0.4)],
     [GO, GO, GO, GO]),
    ("acc_falling_is_a_plateau", EXAM_ACC, 2.0, False,
     [(2.0, 0.4), (2.0, 0.3), (2.0, 0.2)],
     [GO, GO, (True, True, "exam_plateau")]),
    ("acc_gate_needs_acc_at_or_over_target", GATE_ACC, 2.0, False,
     [(2.0, 0.59), (2.0, 0.6), (2.0, 0.9)],
     [GO, GO, (True, True, "gate")]),
    ("acc_gate_low_acc_resets_streak", GATE_ACC, 2.0, False,
     [(2.0, 0.7), (2.0, 0.1), (2.0, 0.7)],
     [GO, GO, GO]),
    ("gate_not_held_at_max_steps_fails", GATE, 2.0, True,
     [(2.05, 0.9), (2.05, 0.9)],
     [GO, (True, False, "max_steps: gate held 2 consecutive evals, needs 3")]),
]


@pytest.mark.parametrize(("name", "cfg", "baseline", "final", "evals", "expected"), CASES, ids=[c[0] for c in CASES])
def test_rule_table(name, cfg, baseline, final, evals, expected):
    state = StopState()
    got = []
    streak = 0
    for i, (raw, exam) in enumerate(evals):
        d = update_stop(state, cfg, step=(i + 1) * 10, raw=raw, exam=exam, baseline_raw_best=baseline,
                        final=final and i == len(evals) - 1)
        got.append((d.stop, d.passed, d.reason))
        streak = streak + 1 if d.gate_ok else 0  # the streak is the evals in a row where the gate held, any rule
        assert d.gate_streak == streak, (i, d)
    assert got == expected
    assert len(state.history) == len(evals)


GATE_SEED = [  # (raw, exam, gate_ok, raw_ok) with baseline 2.00, eps 0.03 (bound 2.06), target 1.0
    (2.05, 0.9, True, True),
    (2.07, 0.9, False, False),
    (2.06, 1.0, True, True),
    (2.00, 1.01, False, True),
    (float("nan"), 0.5, False, False),
    (1.5, float("inf"), False, True),
]


@pytest.mark.parametrize(("raw", "exam", "gate_ok", "raw_ok"), GATE_SEED)
def test_gate_seed_examples(raw, exam, gate_ok, raw_ok):
    d = update_stop(StopState(), GATE, step=1, raw=raw, exam=exam, baseline_raw_best=2.0)
    assert (d.gate_ok, d.raw_ok, d.gate_streak) == (gate_ok, raw_ok, int(gate_ok))
    assert d.raw_bound == pytest.approx(2.06)


@pytest.mark.parametrize(("new", "best", "cfg", "expected"), [
    (2.99, None, PLATEAU, True),
    (2.99, 3.0, PLATEAU, True),       # needs 0.2 % of 3.0 = 0.006; gains 0.01
    (2.9939, 3.0, PLATEAU, True),
    (2.995, 3.0, PLATEAU, False),
    (3.0, 3.0, StopConfig(min_delta=0.0, min_delta_relative=0.0), False),   # equal is never an improvement
    (2.96, 3.0, PLATEAU_ABS, False),
    (2.95, 3.0, PLATEAU_ABS, True),   # exactly min_delta (float 3.0 - 2.95 is 0.04999…)
    (float("nan"), 3.0, PLATEAU, False),
    (float("nan"), None, PLATEAU, False),
])
def test_improved(new, best, cfg, expected):
    assert improved(new, best, cfg) is expected


def test_best_is_plain_argmin_of_eligible_evals():
    # plateau: best_raw follows every decrease even when it is too small to reset patience
    st = StopState()
    flags = [update_stop(st, PLATEAU, step=s, raw=r, exam=None, baseline_raw_best=None).new_best
             for s, r in [(10, 3.0), (20, 2.999), (30, 3.1)]]
    assert flags == [True, True, False]
    assert (st.best_raw, st.best_raw_step, st.best_step) == (2.999, 20, 20)
    assert st.evals_since_raw_improve == 2 and st.raw_ref == 3.0
    # gate: best = lowest exam among gate-ok evals only
    st = StopState()
    flags = [update_stop(st, GATE, step=s, raw=r, exam=e, baseline_raw_best=2.0).new_best
             for s, r, e in [(10, 2.2, 0.1), (20, 2.0, 0.9), (30, 2.0, 0.95), (40, 2.01, 0.8)]]
    assert flags == [False, True, False, True]
    assert (st.best_metric, st.best_step, st.best_exam, st.best_exam_step) == (0.8, 40, 0.1, 10)
    # exam: evals over the raw bound are not eligible
    st = StopState()
    flags = [update_stop(st, EXAM, step=s, raw=r, exam=e, baseline_raw_best=2.0).new_best
             for s, r, e in [(10, 2.5, 1.2), (20, 2.0, 1.3)]]
    assert flags == [False, True] and st.best_step == 20


def test_state_json_round_trip_continues_identically():
    evals = [(2.05, 0.9), (2.05, 0.9), (2.07, 0.9), (2.05, 0.9), (2.05, 0.9), (2.05, 0.9)]
    a = StopState()
    b = StopState()
    out_a, out_b = [], []
    for i, (raw, exam) in enumerate(evals):
        out_a.append(update_stop(a, GATE, step=i, raw=raw, exam=exam, baseline_raw_best=2.0))
        b = StopState.from_dict(json.loads(json.dumps(b.to_dict())))   # checkpoint + resume before every eval
        out_b.append(update_stop(b, GATE, step=i, raw=raw, exam=exam, baseline_raw_best=2.0))
    assert out_a == out_b and a == b and out_b[-1].reason == "gate"


def test_missing_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="baseline_raw_best"):
        update_stop(StopState(), GATE, step=1, raw=2.0, exam=0.5, baseline_raw_best=None)
    # the exam rule no longer passes a stage with raw loss anywhere when the baseline is missing
    with pytest.raises(ConfigError, match="baseline_raw_best.*raw_bound: false"):
        update_stop(StopState(), EXAM, step=1, raw=9.0, exam=0.5, baseline_raw_best=None)
    with pytest.raises(ValueError, match="raw_bound false is not allowed"):
        StopConfig(rule="gate", exam_target=1.0, raw_bound=False)
    with pytest.raises(ValueError, match="exam val loss"):
        update_stop(StopState(), EXAM, step=1, raw=2.0, exam=None, baseline_raw_best=2.0)


def test_best_eval_under_accuracy_is_the_argmax():
    state = StopState()
    bests = []
    for i, acc in enumerate([0.2, 0.5, 0.4, 0.55]):
        d = update_stop(state, GATE_ACC.model_copy(update={"exam_target": 0.9}), step=i + 1, raw=2.0, exam=acc,
                        baseline_raw_best=2.0, record={"exam_loss": 3.0 - acc})
        bests.append(d.new_best)
    assert bests == [False, False, False, False]  # gate never ok: no eligible eval
    state = StopState()
    bests = [update_stop(state, EXAM_ACC, step=i + 1, raw=2.0, exam=acc, baseline_raw_best=2.0,
                         record={"exam_loss": 3.0 - acc}).new_best for i, acc in enumerate([0.2, 0.5, 0.4, 0.55])]
    assert bests == [True, True, False, True]
    assert state.best_step == 4 and state.best_metric == 0.55 and state.best_exam == 0.55
    assert state.history[2]["exam_loss"] == pytest.approx(2.6) and state.history[2]["exam"] == 0.4


def test_accuracy_improvement_is_upward():
    assert improved(0.6, 0.5, EXAM_ACC, higher=True) and not improved(0.5, 0.6, EXAM_ACC, higher=True)
    assert not improved(0.52, 0.5, EXAM_ACC, higher=True)  # below min_delta 0.05


NO_GAIN_CASES = [  # (name, cfg, baseline, final, start (raw, exam), evals, expected after the last eval)
    ("plateau_above_the_start_fails", PLATEAU, None, False, (2.5, None),
     [(3.0, None), (2.9, None), (2.9, None), (2.9, None)], (True, False, "plateau" + NO_GAIN)),
    ("plateau_equal_to_the_start_fails", PLATEAU, None, False, (3.0, None),
     [(3.0, None), (3.0, None), (3.0, None)], (True, False, "plateau" + NO_GAIN)),
    ("plateau_max_steps_above_the_start_fails", PLATEAU, None, True, (2.5, None),
     [(3.0, None), (2.6, None)], (True, False, "max_steps" + NO_GAIN)),
    ("plateau_below_the_start_passes", PLATEAU, None, False, (3.5, None),
     [(3.0, None), (2.9, None), (2.9, None), (2.9, None)], (True, True, "plateau")),
    ("plateau_all_nan_after_the_start_fails", PLATEAU, None, False, (3.0, None),
     [(3.0, None), (float("nan"), None), (float("nan"), None)], (True, False, "plateau" + NO_GAIN)),
    ("plateau_without_a_start_passes", PLATEAU, None, False, (None, None),
     [(3.0, None), (2.9, None), (2.9, None), (2.9, None)], (True, True, "plateau")),
    # no finite eval at all: nothing gained, with or without a start (before: passed, with no baseline to hand on)
    ("plateau_all_nan_without_a_start_fails", PLATEAU, None, False, (None, None),
     [(float("nan"), None)] * 3, (True, False, "plateau" + NO_GAIN)),
    ("max_steps_all_nan_without_a_start_fails", PLATEAU, None, True, (None, None),
     [(float("nan"), None)], (True, False, "max_steps" + NO_GAIN)),
    ("exam_plateau_all_nan_without_a_start_fails", EXAM, 2.0, False, (None, None),
     [(2.0, float("nan"))] * 3, (True, False, "exam_plateau" + NO_GAIN)),
    ("exam_plateau_above_the_start_fails", EXAM, 2.0, False, (2.0, 1.4),
     [(2.0, 1.5), (2.0, 1.5), (2.0, 1.5)], (True, False, "exam_plateau" + NO_GAIN)),
    ("exam_plateau_below_the_start_passes", EXAM, 2.0, False, (2.0, 1.6),
     [(2.0, 1.5), (2.0, 1.5), (2.0, 1.5)], (True, True, "exam_plateau")),
    ("exam_target_met_passes_whatever_the_start", EXAM, 2.0, False, (2.0, 0.5),
     [(2.0, 0.9)], (True, True, "exam_target")),
    ("acc_plateau_below_the_start_fails", EXAM_ACC, 2.0, False, (2.0, 0.5),
     [(2.0, 0.45), (2.0, 0.45), (2.0, 0.45)], (True, False, "exam_plateau" + NO_GAIN)),
    ("acc_plateau_above_the_start_passes", EXAM_ACC, 2.0, False, (2.0, 0.4),
     [(2.0, 0.45), (2.0, 0.45), (2.0, 0.45)], (True, True, "exam_plateau")),
]


@pytest.mark.parametrize(("name", "cfg", "baseline", "final", "start", "evals", "expected"), NO_GAIN_CASES,
                         ids=[c[0] for c in NO_GAIN_CASES])
def test_a_plateau_passes_only_with_a_gain_on_the_start(name, cfg, baseline, final, start, evals, expected):
    state = StopState()
    if start[0] is not None:
        record_start(state, raw=start[0], exam=start[1])
    assert state.history == [] and state.best_raw is None  # the start is not an eval of the rule
    for i, (raw, exam) in enumerate(evals):
        d = update_stop(state, cfg, step=(i + 1) * 10, raw=raw, exam=exam, baseline_raw_best=baseline,
                        final=final and i == len(evals) - 1)
    assert (d.stop, d.passed, d.reason) == expected
    assert StopState.from_dict(json.loads(json.dumps(state.to_dict()))).start_raw == start[0]  # survives a resume


def test_the_baseline_is_the_lower_of_the_start_and_the_best():
    state = StopState()
    assert baseline_of(state) is None
    update_stop(state, PLATEAU, step=10, raw=3.0, exam=None, baseline_raw_best=None)
    assert baseline_of(state) == 3.0  # no start (eval_at_start off): the best, as before
    record_start(state, raw=2.5, exam=None)
    assert baseline_of(state) == 2.5
    record_start(state, raw=3.5, exam=None)
    assert baseline_of(state) == 3.0


def test_the_no_gain_text_names_start_best_and_lr_even_without_a_finite_eval():
    from kcpt.config import StageConfig
    from kcpt.train.loop import no_gain_text

    stage = StageConfig(name="cpt", sources={"raw_train": 1.0}, sets_baseline=True, stop=PLATEAU,
                        lr={"peak": 0.05})
    state = StopState()
    record_start(state, raw=8.7277, exam=None)
    for step in (10, 20, 30):
        d = update_stop(state, PLATEAU, step=step, raw=float("nan"), exam=None, baseline_raw_best=None)
    assert d.reason == "plateau" + NO_GAIN
    text = no_gain_text(stage, state, d)
    assert "8.7277" in text and "no eval gave a finite value" in text and "lr.peak (now 5.00e-02)" in text
    update_stop(state, PLATEAU, step=40, raw=9.5, exam=None, baseline_raw_best=None)
    assert "best 9.5000 at step 40" in no_gain_text(stage, state, d)
    assert no_gain_text(stage, state, update_stop(StopState(), PLATEAU, step=10, raw=3.0, exam=None,
                                                     baseline_raw_best=None)) is None
