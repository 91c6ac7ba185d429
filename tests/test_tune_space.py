"""Search space → stage-3 config (pure, no Ray)."""

from __future__ import annotations

import pickle

import optuna
import pytest

from kcpt.config import FloatRange, SearchSpace, dump_config, load_config
from kcpt.errors import ConfigError
from kcpt.tune.space import SpaceSampler, apply_params, mixture_weights, suggest_params


def test_fractions_become_stage3_weights_and_lr_kl_are_set():
    cfg = load_config()
    before = cfg.stage("stage3").model_copy(deep=True)
    params = {"exam_fraction": 0.7, "qa_fraction": 0.25, "lr": 2e-4, "kl_on": True, "kl_beta": 0.05}
    new = apply_params(cfg, params)
    st = new.stage("stage3")
    assert st.sources == pytest.approx({"qa_train": 0.175, "example_train": 0.525, "raw_train": 0.3})
    assert sum(st.sources.values()) == pytest.approx(1.0)
    assert st.lr.peak == 2e-4 and st.kl_beta == 0.05
    assert new.stage("stage2") == cfg.stage("stage2")  # other stages untouched
    assert cfg.stage("stage3") == before  # the input config is not mutated


def test_kl_off_means_beta_zero():
    cfg = load_config()
    st = apply_params(cfg, {"exam_fraction": 0.5, "qa_fraction": 0.5, "lr": 1e-3, "kl_on": False}).stage("stage3")
    assert st.kl_beta == 0.0


def test_extra_dotted_params_and_stage_overrides_apply():
    cfg = load_config(None, ["tune.stage_overrides.max_steps=40", "tune.stage_overrides.stop.rule=max_steps"])
    cfg.tune.space = SearchSpace(extra={"lr.min_ratio": FloatRange(low=0.05, high=0.3)})
    st = apply_params(cfg, {"lr.min_ratio": 0.2}).stage("stage3")
    assert st.lr.min_ratio == 0.2 and st.max_steps == 40
    assert st.stop.rule == "max_steps" and st.stop.exam_target == cfg.stage("stage3").stop.exam_target  # merged
    with pytest.raises(ConfigError, match="stage3"):
        apply_params(cfg, {"lr.min_ratio": 2.0})  # out of the field's bounds: a clear config error


def test_define_by_run_samples_inside_the_ranges_and_kl_is_conditional():
    space = SearchSpace()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen_off = seen_on = False
    for _ in range(30):
        t = study.ask()
        p = suggest_params(t, space)
        assert space.exam_fraction.low <= p["exam_fraction"] <= space.exam_fraction.high
        assert space.lr.low <= p["lr"] <= space.lr.high
        if "kl_beta" in t.params:
            seen_on = True
            assert space.kl_beta.low <= p["kl_beta"] <= space.kl_beta.high
        else:
            seen_off = True
            assert p["kl_beta"] == 0.0 and t.params["kl_on"] is False
        w = mixture_weights(p, space)
        assert sum(w.values()) == pytest.approx(1.0) and min(w.values()) >= 0
        study.tell(t, 0.0)
    assert seen_on and seen_off
    assert pickle.loads(pickle.dumps(SpaceSampler(space))).space == space  # Tune checkpoints the searcher


def test_recipe_step_schedule_is_a_searchable_shape():
    space = SearchSpace(mixture_shapes=["fixed", "recipe_step"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    shapes = set()
    for _ in range(12):
        trial = study.ask()
        p = suggest_params(trial, space)
        shapes.add(trial.params["mixture_shape"])
        assert ("exam_fraction" in p) == (trial.params["mixture_shape"] != "recipe_step")
        study.tell(trial, 1.0)
    assert shapes == {"fixed", "recipe_step"}
    cfg = load_config(None, ["tune.space.mixture_shapes=[fixed, recipe_step]"])
    st = apply_params(cfg, {"mixture_shape": "recipe_step", "qa_fraction": 0.5, "lr": 1e-3}).stage("stage3")
    assert st.mixture_mode == "step"
    exam = [ph.weights["qa_train"] + ph.weights["example_train"] for ph in st.mixture_schedule]
    assert exam == pytest.approx([0.7, 0.5, 0.6])
    assert [ph.start_frac for ph in st.mixture_schedule] == pytest.approx([0.0, 1 / 3, 2 / 3])


def test_linear_shape_moves_the_exam_share_from_start_to_end():
    space = SearchSpace(mixture_shapes=["fixed", "linear"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(12):
        trial = study.ask()
        p = suggest_params(trial, space)
        assert ("exam_fraction_end" in p) == (trial.params["mixture_shape"] == "linear")
        study.tell(trial, 1.0)
    cfg = load_config(None, ["tune.space.mixture_shapes=[fixed, linear]"])
    st = apply_params(cfg, {"mixture_shape": "linear", "exam_fraction": 0.8, "exam_fraction_end": 0.4,
                            "qa_fraction": 0.5, "lr": 1e-3}).stage("stage3")
    assert st.mixture_mode == "linear"
    exam = [(ph.start_frac, ph.weights["qa_train"] + ph.weights["example_train"]) for ph in st.mixture_schedule]
    assert exam == [(0.0, pytest.approx(0.8)), (1.0, pytest.approx(0.4))]
    from kcpt.train.mixture import MixtureSampler
    w = MixtureSampler(st.sources, seed=0, schedule=st.mixture_schedule, max_steps=st.max_steps, mode="linear")
    mid = w.weights_at(st.max_steps // 2)
    assert mid["raw_train"] == pytest.approx(0.4, abs=0.01)        # halfway: exam 0.6, raw 0.4


def test_every_sampled_point_of_every_shape_makes_a_stage():
    """A sampled point must apply (a ``linear`` point once lacked its start share: every such trial failed)."""
    cfg = load_config(None, ["tune.space.mixture_shapes=[fixed, linear, recipe_step]"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    shapes = set()
    for _ in range(24):
        trial = study.ask()
        p = suggest_params(trial, cfg.tune.space)
        shape = trial.params["mixture_shape"]
        shapes.add(shape)
        st = apply_params(cfg, p).stage("stage3")
        if shape == "linear":
            exam = [ph.weights["qa_train"] + ph.weights["example_train"] for ph in st.mixture_schedule]
            assert exam == pytest.approx([p["exam_fraction"], p["exam_fraction_end"]])
        study.tell(trial, 1.0)
    assert shapes == {"fixed", "linear", "recipe_step"}


def test_integer_extra_fields_are_sampled_as_integers_and_the_recipe_keeps_the_stages_values():
    from kcpt.tune.space import recipe_points

    cfg = load_config(None, ["tune.space.extra={lr.warmup_steps: {low: 1.5, high: 10}, "
                             "lr.min_ratio: {low: 0.05, high: 0.5}}"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        p = suggest_params(study.ask(), cfg.tune.space)
        assert isinstance(p["lr.warmup_steps"], int) and 2 <= p["lr.warmup_steps"] <= 10
        seen.add(p["lr.warmup_steps"])
        assert apply_params(cfg, p).stage("stage3").lr.warmup_steps == p["lr.warmup_steps"]
    assert len(seen) > 3
    first = recipe_points(cfg)[0]   # the stage as configured: warm-up 5, min_ratio at its default, not sampled
    st = cfg.stage("stage3")
    assert first["lr.warmup_steps"] == st.lr.warmup_steps == 5
    assert first["lr.min_ratio"] == pytest.approx(st.lr.min_ratio)
    assert apply_params(cfg, first).stage("stage3").lr == st.lr


@pytest.mark.parametrize("sets, match", [
    (["tune.space.extra={lr.min_ratio: {low: 0.5, high: 2.0}}"],
     r"tune.space.extra.lr.min_ratio: its high bound 2 gives stage 'stage3' lr.min_ratio"),
    (["tune.space.extra={stop.consecutive: {low: 1.2, high: 1.8}}"],
     r"tune.space.extra.stop.consecutive: an integer field, and \[1.2, 1.8\] holds no integer"),
    (["tune.space.exam_fraction={low: 0.5, high: 1.5}"], r"exam_fraction: a share of the mixture.*\[0, 1\]"),
    (["tune.space.qa_fraction={low: -0.5, high: 0.5}"], r"qa_fraction: a share of the mixture"),
    (["tune.space.micro_batch_sizes=[0]"], r"micro_batch_sizes: rows per worker per step must be ≥ 1, got 0"),
    (["tune.space.lr={low: 0, high: 0.01}"], r"lr: a learning rate must be > 0"),
])
def test_search_ranges_are_checked_at_both_bounds_when_the_config_loads(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, sets)


def test_micro_batch_choice_is_token_fair_and_enqueued_at_the_stages_own():
    from kcpt.tune.launch import stage_token_budget, tokens_per_step
    from kcpt.tune.space import recipe_points

    cfg = load_config(None, ["tune.space.micro_batch_sizes=[2,4,8]"])
    ref = cfg.stage("stage3")                                 # the demo: micro-batch 8 (train's), 100 steps
    assert cfg.micro_batch("stage3") == 8 and recipe_points(cfg)[0]["micro_batch_size"] == 8
    for m in (2, 4, 8):
        c = apply_params(cfg, {"micro_batch_size": m})
        st = c.stage("stage3")
        assert c.micro_batch("stage3") == m == st.micro_batch_size
        assert tokens_per_step(c) == m * 256 * 2             # 2 workers, seq_len 256
        # the same tokens: budget, per eval (where the gate counts), of warm-up
        assert stage_token_budget(c) == stage_token_budget(cfg)
        assert st.eval_every * tokens_per_step(c) == ref.eval_every * tokens_per_step(cfg)
        assert st.lr.warmup_steps * m == ref.lr.warmup_steps * 8
    assert cfg.train.micro_batch_size == 8                    # the other stages keep train's
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {suggest_params(study.ask(), cfg.tune.space)["micro_batch_size"] for _ in range(30)}
    assert seen == {2, 4, 8}
    assert "micro_batch_size" not in suggest_params(study.ask(), SearchSpace())  # not searched by default
    with pytest.raises(ConfigError, match=r"micro_batch_sizes: 3 does not fit stage 'stage3'.*max_steps 100"):
        load_config(None, ["tune.space.micro_batch_sizes=[3]"])


def test_stage_overrides_are_applied_once_so_a_trials_scaled_steps_stand(tmp_path):
    """``tune.stage_overrides`` count in steps at the base micro-batch: a trial at another micro-batch has them
    scaled, and its config (and best_config.yaml) must not re-apply them (eval every 5 steps at micro-batch 2
    would be 10 rows, no whole step of 4: the validator refused every trial at 2 or 4)."""
    from kcpt.tune.launch import stage_token_budget, tokens_per_step

    cfg = load_config(None, ["tune.space.micro_batch_sizes=[2,4,8]", "tune.stage_overrides.max_steps=30",
                             "tune.stage_overrides.eval_every=5"])
    for m in (2, 4, 8):
        c = apply_params(cfg, {"micro_batch_size": m})
        st = c.stage("stage3")
        assert (st.max_steps, st.eval_every) == (30 * 8 // m, 5 * 8 // m) and c.tune.stage_overrides == {}
        assert stage_token_budget(c) == stage_token_budget(cfg) == 30 * tokens_per_step(cfg)
        assert apply_params(c, {}).stage("stage3") == st                      # idempotent: nothing left to apply
        dump_config(c, tmp_path / f"best-{m}.yaml")                            # what export writes, read back
        assert load_config(tmp_path / f"best-{m}.yaml").stage("stage3") == st


def test_the_gp_samples_a_static_space_and_kl_off_wins_over_its_beta(tmp_path):
    """``--sampler gp``: kl_beta is suggested in every trial (the GP models only parameters every trial has), a
    trial with KL off trains with β 0 — in the trial config and in best_config.yaml — whatever β it carries, and
    no ASHA (the GP ignores stopped trials and re-proposes their point)."""
    from kcpt.tune.launch import build_scheduler, build_searcher
    from kcpt.tune.searcher import make_sampler

    cfg = load_config(None, [])
    gp = build_searcher(cfg, storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="s", sampler="gp")
    assert gp._space.static and isinstance(make_sampler("gp", seed=0, n_startup_trials=1),
                                           optuna.samplers.GPSampler)
    assert not build_searcher(cfg, storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="t")._space.static
    assert build_scheduler(cfg, "gp") is None and build_scheduler(cfg, "tpe") is not None  # GP: no ASHA
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    offs = 0
    for _ in range(20):
        t = study.ask()
        p = suggest_params(t, cfg.tune.space, static=True)
        assert "kl_beta" in t.params                                # sampled in every trial
        if p.get("kl_on") is False:
            offs += 1
            assert p["kl_beta"] == 0.0 and t.params["kl_beta"] > 0
            assert apply_params(cfg, t.params).stage("stage3").kl_beta == 0.0   # export applies trial.params
    assert offs
    t = study.ask()
    p = suggest_params(t, cfg.tune.space)
    assert ("kl_beta" in t.params) == (p.get("kl_on") is not False)  # define-by-run (TPE): only when on


def test_an_asha_grace_longer_than_a_trial_is_refused_before_anything_is_made(tmp_path):
    """ASHA asserted inside Ray (`grace_period must be <= max_t`) after the prerequisites had trained, and left a
    half-made experiment that only --overwrite could replace."""
    from kcpt.tune.launch import tune_stage3

    cfg = load_config(None, ["tune.stage_overrides.max_steps=10", "tune.stage_overrides.eval_every=5",
                             "tune.stage_overrides.stop.consecutive=2",
                             "tune.asha.grace_period=10", f"train.output_dir={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match=r"tune.asha.grace_period: a grace of .* tokens .* is longer than a trial "
                                          r"of stage 'stage3' can run"):
        tune_stage3(cfg, experiment_dir=tmp_path / "exp")
    assert not (tmp_path / "exp").exists() and not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="grace_tokens: a grace in tokens needs time_attr: tokens"):
        load_config(None, ["tune.asha.time_attr=evals", "tune.asha.grace_tokens=1000"])
