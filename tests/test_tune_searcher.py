"""ConstrainedOptunaSearch under real Ray Tune + real Optuna SQLite.

The trainable here is a stand-in for the stage loop that reports a chosen sequence of evals (the searcher is
under test, not training): it follows the same protocol as :func:`kcpt.tune.launch.run_trial` (running gate
metrics per eval, then one ``trial_final`` summary). The real stage loop is exercised by test_tune_stage3.py.
"""

from __future__ import annotations

import sys

import optuna
import pytest
import ray
from optuna.trial import TrialState
from ray import cloudpickle, tune
from ray.tune.schedulers import ASHAScheduler

from kcpt.config import SearchSpace
from kcpt.tune.export import trials_frame
from kcpt.tune.objective import GateSpec, GateTracker, gate_outcome
from kcpt.tune.searcher import CONSTRAINT_NAME, FINAL_KEY, ConstrainedOptunaSearch
from kcpt.tune.space import SpaceSampler

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # trial actors cannot import tests/

SPEC = GateSpec(baseline_raw_best=2.0, eps=0.03, exam_target=1.5, consecutive=2, penalty=100.0)
NUM_EVALS = 6


def scripted_evals(lr: float, exam_fraction: float) -> list[dict]:
    """Raw drifts up with the LR (lr=3e-3 leaves the ±3% band at once), exam falls faster with a high LR."""
    evals = []
    for k in range(1, NUM_EVALS + 1):
        ratio = 1.0 + lr * 20 * k
        evals.append({"stage": "stage3", "step": 10 * k, "tokens_seen": 1000 * k, "raw_ratio": ratio,
                      "raw_val_loss": 2.0 * ratio, "exam_val_loss": 2.0 - k * (0.05 + lr * 300) * exam_fraction})
    return evals


def scripted_trial(config: dict) -> None:
    tracker = GateTracker(SPEC)
    for k, m in enumerate(scripted_evals(config["lr"], config["exam_fraction"])):
        tune.report({**m, **tracker.update(m), FINAL_KEY: False})
        if config["qa_fraction"] > 0.75 and k == 1:
            raise RuntimeError("injected worker failure")  # the failure this test injects
    tune.report({**tracker.outcome.as_metrics(), FINAL_KEY: True})


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=3, include_dashboard=False)
    yield
    ray.shutdown()


def point(lr: float, exam_fraction: float = 0.7) -> dict:
    return {"exam_fraction": exam_fraction, "qa_fraction": 0.5, "lr": lr, "kl_on": False}


def run(tmp_path, points, scheduler=None, name="s"):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = SearchSpace()
    searcher = ConstrainedOptunaSearch(space=SpaceSampler(space), metric="gate_score", mode="min",
                                       points_to_evaluate=points, study_name=name,
                                       storage=optuna.storages.RDBStorage(storage),
                                       sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2))
    tuner = tune.Tuner(scripted_trial,
                       tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, metric="gate_score",
                                                   mode="min", num_samples=len(points), max_concurrent_trials=1),
                       run_config=tune.RunConfig(name=name, storage_path=str(tmp_path / "tune"), verbose=0))
    tuner.fit()
    return optuna.load_study(study_name=name, storage=storage)  # a fresh read of the SQLite file


def test_gate_outcome_selects_lowest_exam_among_feasible_evals():
    evals = scripted_evals(1e-4, 0.7)
    o = gate_outcome(evals, SPEC)
    assert o.gate_feasible and o.selected_step == 60
    assert o.gate_objective == pytest.approx(evals[-1]["exam_val_loss"])
    assert o.gate_constraint == pytest.approx(evals[-1]["raw_ratio"] - 1.03)
    assert o.gate_passed is False  # exam never reaches 1.5 here
    bad = gate_outcome(scripted_evals(3e-3, 0.7), SPEC)
    assert not bad.gate_feasible and bad.selected_step == 10  # lowest raw ratio when nothing is feasible
    assert bad.gate_constraint > 0 and bad.gate_score == pytest.approx(bad.gate_objective + 100 * bad.gate_constraint)


def test_gate_passed_needs_consecutive_ok_evals_and_ignores_step_zero():
    evals = [{"step": 0, "raw_ratio": 1.0, "exam_val_loss": 0.1, "tokens_seen": 0},
             {"step": 10, "raw_ratio": 1.01, "exam_val_loss": 1.4, "tokens_seen": 100},
             {"step": 20, "raw_ratio": 1.05, "exam_val_loss": 1.3, "tokens_seen": 200},
             {"step": 30, "raw_ratio": 1.02, "exam_val_loss": 1.45, "tokens_seen": 300},
             {"step": 40, "raw_ratio": 1.00, "exam_val_loss": 1.2, "tokens_seen": 400}]
    o = gate_outcome(evals, SPEC)
    assert o.gate_passed and o.steps_to_gate == 40 and o.tokens_to_gate == 400
    assert o.selected_step == 40 and o.gate_objective == 1.2


def test_constraint_reaches_optuna_and_best_trial_is_feasible(ray_local, tmp_path):
    study = run(tmp_path, [point(1e-4), point(3e-3), point(2e-4)], name="constraint")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    cons = [t.constraints[CONSTRAINT_NAME] for t in trials]
    assert cons[0] <= 0 and cons[1] > 0 and cons[2] <= 0
    # the infeasible trial has the lowest exam loss: Optuna must still not pick it
    assert trials[1].value < min(trials[0].value, trials[2].value)
    assert study.best_trial.number in (0, 2)
    assert trials[0].user_attrs["ray_trial_id"] and trials[0].user_attrs["stopped_early"] is False
    df = trials_frame(study)
    assert df["feasible"].tolist() == [True, False, True]


def test_asha_stopped_trial_is_pruned_not_complete(ray_local, tmp_path):
    asha = ASHAScheduler(time_attr="training_iteration", max_t=NUM_EVALS + 1, grace_period=1, reduction_factor=2)
    study = run(tmp_path, [point(1e-4), point(3e-3, exam_fraction=0.4)], scheduler=asha, name="asha")
    first, hopeless = study.get_trials()
    assert first.state == TrialState.COMPLETE and first.value is not None
    assert hopeless.state == TrialState.PRUNED  # not COMPLETE with an early value
    assert hopeless.user_attrs["stopped_early"] is True
    # Optuna keeps the last intermediate score of a pruned trial (what TPE ranks pruned trials by)
    assert hopeless.intermediate_values and hopeless.value == list(hopeless.intermediate_values.values())[-1]
    assert len(first.intermediate_values) > len(hopeless.intermediate_values)
    assert hopeless.constraints[CONSTRAINT_NAME] > 0
    df = trials_frame(study)
    assert df.loc[1, "status"] == "PRUNED" and not df.loc[1, "feasible"]


def test_errored_trial_is_failed_and_the_search_goes_on(ray_local, tmp_path):
    crash = {**point(1e-4), "qa_fraction": 0.8}
    study = run(tmp_path, [point(1e-4), crash, point(2e-4)], name="fail")
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert study.best_trial.number in (0, 2)


def test_trial_stopped_on_the_eval_that_ended_its_stage_is_complete(tmp_path):
    """ASHA may stop a trial on its last eval (the gate passed there): that trial finished, it is not pruned."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    searcher = ConstrainedOptunaSearch(space=SpaceSampler(SearchSpace()), metric="gate_score", mode="min",
                                       study_name="done", storage=storage)
    tracker = GateTracker(SPEC)
    searcher.suggest("a")
    searcher.suggest("b")
    evals = scripted_evals(1e-4, 0.7)
    for i, m in enumerate(evals[:2], 1):
        searcher.on_trial_result("a", {**m, **tracker.update(m), "training_iteration": i})
    last = {**evals[2], **tracker.update(evals[2]), "training_iteration": 3}
    searcher.on_trial_complete("a", {**last, "stage_done": True})  # stopped by the scheduler on its last eval
    searcher.on_trial_complete("b", {**last, "stage_done": False})  # stopped earlier: pruned
    a, b = optuna.load_study(study_name="done", storage=storage).get_trials()
    assert a.state == TrialState.COMPLETE and a.value == pytest.approx(last["gate_objective"])
    assert b.state == TrialState.PRUNED


def test_searcher_restored_from_an_older_save_does_not_tell_a_trial_twice(tmp_path):
    """After a resume, Tune may re-run a trial whose first run was already told (its saved state predates the
    tell): the re-run's results and completion leave the study's first outcome as it was, without an error."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
    searcher = ConstrainedOptunaSearch(space=SpaceSampler(SearchSpace()), metric="gate_score", mode="min",
                                       study_name="resumed", storage=storage)
    tracker = GateTracker(SPEC)
    searcher.suggest("a")
    searcher.save(str(tmp_path / "searcher.pkl"))  # Tune's last saved state: trial "a" running
    evals = scripted_evals(1e-4, 0.7)
    for i, m in enumerate(evals, 1):
        searcher.on_trial_result("a", {**m, **tracker.update(m), "training_iteration": i})
    final = {**tracker.outcome.as_metrics(), FINAL_KEY: True}
    searcher.on_trial_complete("a", final)
    restored = ConstrainedOptunaSearch(space=SpaceSampler(SearchSpace()), metric="gate_score", mode="min")
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("a", {**evals[0], **GateTracker(SPEC).update(evals[0]), "training_iteration": 1})
    restored.on_trial_complete("a", {**final, "gate_objective": 123.0})
    (t,) = optuna.load_study(study_name="resumed", storage=storage).get_trials()
    assert t.state == TrialState.COMPLETE and t.value == pytest.approx(final["gate_objective"])
    assert len(t.intermediate_values) == len(evals)


TOKENS_SPEC = GateSpec(baseline_raw_best=2.0, eps=0.03, exam_target=1.5, consecutive=2, penalty=100.0,
                       objective="tokens_to_gate", token_scale=6000.0, tokens_before=500)


def test_tokens_objective_is_lexicographic_passed_then_tokens_then_exam():
    def outcome(exam_slope: float, tokens_per_eval: int = 1000):
        evals = [{"step": 10 * k, "tokens_seen": tokens_per_eval * k, "raw_ratio": 1.0,
                  "exam_val_loss": 2.0 - exam_slope * k} for k in range(1, 7)]
        return gate_outcome(evals, TOKENS_SPEC)
    fast, slow, never, never_better = outcome(0.3), outcome(0.15), outcome(0.02), outcome(0.05)
    assert (fast.tokens_to_gate, slow.tokens_to_gate, never.tokens_to_gate) == (3000, 5000, None)  # 2nd pass
    assert fast.plan_tokens_to_gate == 3500 and never.plan_tokens_to_gate is None
    # passing wins over not passing, fewer tokens over more; among the never-passing the exam loss decides
    assert fast.gate_objective < slow.gate_objective < 1.0 <= never_better.gate_objective < never.gate_objective
    # equal tokens to the pass: the exam loss decides
    tie_a = gate_outcome([{"step": 10, "tokens_seen": 1000, "raw_ratio": 1.0, "exam_val_loss": 1.4},
                          {"step": 20, "tokens_seen": 2000, "raw_ratio": 1.0, "exam_val_loss": 1.0}], TOKENS_SPEC)
    tie_b = gate_outcome([{"step": 10, "tokens_seen": 1000, "raw_ratio": 1.0, "exam_val_loss": 1.4},
                          {"step": 20, "tokens_seen": 2000, "raw_ratio": 1.0, "exam_val_loss": 1.3}], TOKENS_SPEC)
    assert tie_a.tokens_to_gate == tie_b.tokens_to_gate and tie_a.gate_objective < tie_b.gate_objective
    # a passing trial that needed twice the budget still beats a non-passing one
    assert outcome(0.3, tokens_per_eval=4000).gate_objective < never_better.gate_objective
    # infeasible: the constraint (not the value) ranks it last; the ASHA score carries the penalty
    bad = gate_outcome([{"step": 10, "tokens_seen": 1000, "raw_ratio": 1.2, "exam_val_loss": 1.0}], TOKENS_SPEC)
    assert bad.gate_constraint > 0 and bad.gate_score > 10


def test_tokens_objective_refines_the_pass_by_where_the_gate_margin_crossed():
    """Two trials whose gate holds at the same eval rank by how early, between the eval before the streak and its
    first eval, the gate margin crossed 0 (linear); a pass one eval earlier still wins; the step-0 eval counts as
    the eval before; a streak that begins because raw came back within its bound interpolates the raw margin."""
    spec = GateSpec(2.0, 0.03, 1.5, 2, objective="tokens_to_gate", token_scale=6000.0)

    def run(exams, ratios=None, start=0):
        ratios = ratios or [1.0] * len(exams)
        return gate_outcome([{"step": 10 * k, "tokens_seen": 1000 * k, "raw_ratio": r, "exam_val_loss": e}
                             for k, (e, r) in enumerate(zip(exams, ratios, strict=True), start=start)], spec)
    # margin at eval 1: 1.8/1.5 − 1 = 0.2; at eval 2: 1.2/1.5 − 1 = −0.2 → crossed half-way: 500 tokens early
    early, late = run([2.0, 1.8, 1.2, 1.4]), run([2.0, 1.8, 1.47, 1.1])
    assert early.tokens_to_gate == late.tokens_to_gate == 3000                 # the gate count itself: whole evals
    assert early.refined_tokens_to_gate == pytest.approx(2500.0)
    assert late.refined_tokens_to_gate == pytest.approx(3000 - 1000 * 0.02 / 0.22)
    # the earlier crossing wins although the later one ends at the lower exam loss (the old tie-break)
    assert late.selected_exam_val_loss < early.selected_exam_val_loss
    assert early.gate_objective < late.gate_objective < 1.0
    one_eval_sooner = run([2.0, 1.49, 1.49, 1.4])                             # passes at 2000, lead ~0
    assert one_eval_sooner.gate_objective < early.gate_objective
    # the step-0 eval is the eval before a streak that starts at the first counted eval
    assert run([1.8, 1.2, 1.2]).refined_tokens_to_gate == pytest.approx(1500.0)
    assert run([1.2, 1.2], start=1).refined_tokens_to_gate == 2000.0         # no eval before: no refinement
    # raw back within its bound between evals 1 and 2: raw margin 1.0609/1.03 − 1 = 0.03 → 0.9991/1.03 − 1 = −0.03
    raw = run([1.8, 1.2, 1.2, 1.2], [1.0, 1.0609, 0.9991, 1.0])
    assert raw.tokens_to_gate == 3000 and raw.refined_tokens_to_gate == pytest.approx(2500.0, abs=1.0)


def test_an_eval_with_a_nan_loss_breaks_the_gate_streak_its_window_and_its_refinement():
    """A NaN eval between two gate-ok evals: the gate holds only two evals after it, and the refined tokens do not
    reach back across it (before: the streak and the crossing spanned it, and a pass at 4000 tokens was credited
    as early as 2000 — a lead of two eval intervals, ranking it above a pass at 3000)."""
    spec = GateSpec(2.0, 0.03, 1.5, 2, objective="tokens_to_gate", token_scale=6000.0)
    nan = float("nan")
    exams = [2.0, 1.4, nan, 1.4, 1.4]
    streaks = [0, 1, 0, 1, 2]  # what the loop reports (its own streak resets on the NaN eval)
    for mode, extra in (("recomputed", lambda k: {}), ("loop's", lambda k: {"gate_streak": streaks[k]})):
        out = gate_outcome([{"step": 10 * k, "tokens_seen": 1000 * k, "raw_ratio": 1.0, "exam_val_loss": e,
                             **extra(k)} for k, e in enumerate(exams)], spec)
        assert (out.steps_to_gate, out.tokens_to_gate) == (40, 4000), mode
        assert out.refined_tokens_to_gate == 4000.0, mode  # no eval right before the streak: no refinement
        sooner = gate_outcome([{"step": 10 * k, "tokens_seen": 1000 * k, "raw_ratio": 1.0, "exam_val_loss": e}
                               for k, e in enumerate([2.0, 1.6, 1.4, 1.4])], spec)
        assert sooner.tokens_to_gate == 3000 and sooner.gate_objective < out.gate_objective, mode
    # no window of 2 feasible evals spans the NaN eval either
    window = gate_outcome([{"step": 10 * k, "tokens_seen": 1000 * k, "raw_ratio": 1.0, "exam_val_loss": e}
                           for k, e in enumerate([2.0, 1.6, nan, 1.7, 2.0])], spec)
    assert window.gate_objective == pytest.approx(1.0 + 2.0 / 3.0)  # the window (1.7, 2.0), not (1.6, 1.7)


def test_evals_a_restarted_worker_group_reports_again_are_not_counted_twice():
    """After a worker group restart the loop evaluates again the steps after its checkpoint; the trial's callback
    (on the Train controller, which survives the restart) must not count them twice: the step-10 eval twice made a
    gate of 2 consecutive evals hold that never held."""
    from kcpt.tune.objective import ReplayedGateTracker

    evals = [{"stage": "stage3", "step": 10 * k, "tokens_seen": 1000 * k, "raw_ratio": 1.0, "exam_val_loss": e}
             for k, e in enumerate([2.0, 1.4, 1.6, 1.4])]
    tracker = ReplayedGateTracker(SPEC)  # what GateReportCallback feeds (it needs a Tune session to be made)
    for m in [evals[0], evals[1], evals[1], evals[2], evals[1], evals[2], evals[3]]:  # two restarts at step 10
        got = tracker.update(m)
    want = gate_outcome(evals, SPEC)
    assert not got["gate_passed"] and got["num_evals"] == want.num_evals == 3
    assert got["gate_objective"] == pytest.approx(want.gate_objective)


def test_not_passed_trials_rank_by_their_best_window_of_consecutive_evals():
    """Before the gate holds, the tokens objective ranks by the worst exam value of the best window of
    ``consecutive`` raw-feasible evals (what the gate tests), not by one lucky eval."""
    spec = GateSpec(2.0, 0.03, 1.5, 2, objective="tokens_to_gate", token_scale=6000.0)

    def run(exams, ratios=None):
        ratios = ratios or [1.0] * len(exams)
        return gate_outcome([{"step": 10 * k, "tokens_seen": 1000 * k, "raw_ratio": r, "exam_val_loss": e}
                             for k, (e, r) in enumerate(zip(exams, ratios, strict=True), start=1)], spec)
    dip, steady = run([2.0, 1.2, 2.0, 2.0]), run([1.7, 1.6, 1.6, 1.7])       # neither passes (target 1.5 twice)
    assert not dip.gate_passed and not steady.gate_passed
    assert dip.selected_exam_val_loss == 1.2 < steady.selected_exam_val_loss   # the selected eval is unchanged
    assert 1.0 <= steady.gate_objective < dip.gate_objective                   # the steady window is closer
    assert steady.gate_objective == pytest.approx(1.0 + 1.6 / 2.6)            # 1 + u(worst exam of [1.6, 1.6])
    # a window needs every eval within the raw bound: the raw miss at eval 2 leaves the window (3, 4)
    assert run([1.6, 1.6, 1.9, 1.8], [1.0, 1.1, 1.0, 1.0]).gate_objective == pytest.approx(1.0 + 1.9 / 2.9)
    # fewer evals than a window: the best single feasible eval, as before
    assert run([1.7]).gate_objective == pytest.approx(1.0 + 1.7 / 2.7)
    assert run([1.4, 1.45]).gate_passed and run([1.4, 1.45]).gate_objective < 1.0


def test_recipe_points_are_enqueued_first_and_only_into_a_new_study(tmp_path):
    from kcpt.config import load_config
    from kcpt.tune.space import recipe_points

    cfg = load_config(None, ["tune.space.mixture_shapes=[fixed, linear, recipe_step]"])
    points = recipe_points(cfg)     # demo stage 3: 70:30 exam:raw (qa = examples), LR 5e-4, KL β 0.1
    assert points == [
        {"mixture_shape": "fixed", "qa_fraction": 0.5, "lr": 5e-4, "kl_on": True, "kl_beta": 0.1,
         "exam_fraction": pytest.approx(0.7)},
        {"mixture_shape": "recipe_step", "qa_fraction": 0.5, "lr": 5e-4, "kl_on": True, "kl_beta": 0.1}]
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    space = cfg.tune.space

    def searcher():
        return ConstrainedOptunaSearch(space=SpaceSampler(space), metric="gate_score", mode="min",
                                       study_name="enq", storage=storage, enqueue=points,
                                       sampler=optuna.samplers.RandomSampler(seed=0))
    s = searcher()
    first, second, third = s.suggest("a"), s.suggest("b"), s.suggest("c")
    assert first["exam_fraction"] == pytest.approx(0.7) and first["lr"] == 5e-4 and first["kl_beta"] == 0.1
    assert second["mixture_shape"] == "recipe_step" and "exam_fraction" not in second
    assert third["lr"] != 5e-4                                     # then the sampler's own points
    again = searcher()                                             # the same study, resumed / shared
    again.suggest("d")
    trials = optuna.load_study(study_name="enq", storage=storage).get_trials()
    assert [t.user_attrs.get("enqueued") for t in trials] == ["recipe", "recipe", None, None]


def test_objective_follows_the_gates_accuracy_metric():
    """stop.exam_metric accuracy: the selected eval has the HIGHEST exam_acc among feasible evals, the value told
    to Optuna is the error rate 1 − acc (minimised), and the gate streak needs acc ≥ target."""
    spec = GateSpec(baseline_raw_best=2.0, eps=0.03, exam_target=0.6, consecutive=2, objective="exam",
                    exam_metric="accuracy")
    evals = [{"step": 5, "raw_ratio": 1.0, "exam_val_loss": 1.0, "exam_acc": 0.5},
             {"step": 10, "raw_ratio": 1.0, "exam_val_loss": 1.2, "exam_acc": 0.7},   # worse loss, better acc
             {"step": 15, "raw_ratio": 1.1, "exam_val_loss": 0.5, "exam_acc": 0.9},   # infeasible
             {"step": 20, "raw_ratio": 1.0, "exam_val_loss": 1.3, "exam_acc": 0.65}]
    o = gate_outcome(evals, spec)
    assert o.selected_step == 10 and o.selected_exam_acc == 0.7 and o.selected_exam_val_loss == 1.2
    assert o.gate_objective == pytest.approx(0.3)
    assert not o.gate_passed  # the raw miss at step 15 broke the streak; 20 alone is one
    o = gate_outcome([*evals, {"step": 25, "raw_ratio": 1.0, "exam_val_loss": 1.3, "exam_acc": 0.6}], spec)
    assert o.gate_passed and o.steps_to_gate == 25
    assert gate_outcome(evals, GateSpec(2.0, 0.03, 1.5, 2, objective="exam")).selected_step == 5  # loss: lowest



@pytest.mark.parametrize("publish", [True, False], ids=["published-after-ask", "published-after-complete-only"])
def test_a_bucket_experiment_resumed_after_its_driver_died_mid_trial_tells_that_trial(s3_prefix, tmp_path, publish,
                                                                                      caplog):
    """A URI experiment's study is a SQLite file in the driver's mirror, published to the bucket. Published only
    after finished trials, the bucket's study lacked the trial Tune's saved state was running when the driver died,
    and every --resume died with ``KeyError: 'Record does not exist.'``. Now each new trial is published as it is
    asked; a study that still lacks one (an older snapshot) skips telling it, with a warning, instead of failing."""
    import shutil

    from kcpt import storage as store_lib
    from kcpt.tune.experiment import Publisher, mirror_of

    uri = f"{s3_prefix}/exp"
    local = mirror_of(uri)
    url = f"sqlite:///{local / 'optuna.db'}"

    def searcher(**kw):
        return ConstrainedOptunaSearch(space=SpaceSampler(SearchSpace()), metric="gate_score", mode="min",
                                       study_name="s3", storage=optuna.storages.RDBStorage(url), **kw)

    first = searcher(after_ask=Publisher(uri) if publish else None)
    Publisher(uri)()  # the experiment's start publishes the (empty) study
    first.suggest("a")
    first.save(str(tmp_path / "searcher.pkl"))  # Tune's saved state: trial "a" running; then the driver dies
    shutil.rmtree(local)
    assert mirror_of(uri) == local == store_lib.local_path_for(uri)  # a new driver pulls the bucket's snapshot
    restored = searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    evals = scripted_evals(1e-4, 0.7)
    tracker = GateTracker(SPEC)
    for i, m in enumerate(evals, 1):
        restored.on_trial_result("a", {**m, **tracker.update(m), "training_iteration": i})
    restored.on_trial_complete("a", {**tracker.outcome.as_metrics(), FINAL_KEY: True})
    trials = optuna.load_study(study_name="s3", storage=url).get_trials()
    if publish:
        (t,) = trials
        assert t.state == TrialState.COMPLETE and t.user_attrs["ray_trial_id"] == "a"
    else:
        assert trials == [] and "is not in the study's storage" in caplog.text
