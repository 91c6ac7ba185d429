"""The loop's wiring, run in-process (``run_plan(in_process=True)``: the same StageRunner, no Ray) so each rule
is checked in seconds: the mixture schedule is applied at the current step, KL only on replay sources, eval
losses are token means, a rollback cuts the LR while the schedule keeps following the step, the baseline is the
best (not the last) CPT raw loss, a stage that needs a baseline is refused before any step, a stage hands off
from the chosen Pareto-front checkpoint, and a deterministic abort ends the run once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kcpt.config import load_config
from kcpt.errors import CheckpointError, ConfigError, TrainingAborted
from kcpt.train.checkpoint import list_checkpoints
from kcpt.train.launch import run_plan
from kcpt.train.rundir import read_metrics
from kcpt.train.schedule import lr_at

BASE = [
    "data.seq_len=64", "logging.progress=false", "logging.tensorboard=false",
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64", "train.micro_batch_size=4", "train.eval_batch_size=16",
    "train.max_eval_rows=48", "train.num_workers=1", "train.anomaly.min_history=3", "train.anomaly.stable_every=2",
    "tune.stage=s",
]


@pytest.fixture(scope="module")
def prepared_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prepared")


def cfg_of(prepared_root: Path, out: Path, plan: str, *extra: str):
    return load_config(None, [*BASE, f"data.prepared_root={prepared_root}", f"train.output_dir={out}",
                              "train.run_name=r", f"plan={plan}", *extra])


def uninterrupted_and_resumed_from_step_4(cfg) -> tuple[list[dict], list[dict]]:
    """The evals (step > 0) of a run of ``cfg``, and of the same run resumed from its step-4 checkpoint with the
    later ones deleted (as if it had died after step 4)."""
    import shutil

    res = run_plan(cfg, resume="never", in_process=True)
    want = [r for r in read_metrics(res.run_dir) if r["step"] > 0]
    for c in list_checkpoints(Path(res.run_dir) / "checkpoints"):
        if not str(c).endswith("step000004"):
            shutil.rmtree(c)
    again = run_plan(cfg, resume="auto", in_process=True)
    return want, [r for r in read_metrics(again.run_dir) if r["step"] > 0]


def assert_same_evals(got: list[dict], want: list[dict], keys: tuple[str, ...]) -> None:
    for g, w in zip(got, want, strict=True):
        for k in keys:
            assert g[k] == pytest.approx(w[k], abs=1e-6, rel=0), (g["step"], k)


def evals(res, stage: str) -> list[dict]:
    return [r for r in read_metrics(res.run_dir) if r["stage"] == stage and r["step"] > 0]


def test_a_mixture_step_trains_the_same_at_every_layout_of_its_rows(prepared_root, tmp_path):
    """A qa + raw mixture at 8 rows per step: one micro-batch of 8 and grad_accum 2 × 4 train the same steps (one
    source per step). A draw per micro-batch mixed the sources of a step at grad_accum 2, where the raw rows'
    targets outweighed the exam rows' in the token mean, so the same config trained another objective."""
    plan = ("[{name: s, sources: {qa_train: 0.5, raw_train: 0.5}, max_steps: 8, eval_every: 4, "
            "stop: {rule: max_steps}}]")
    one = evals(run_plan(cfg_of(prepared_root, tmp_path / "one", plan, "train.micro_batch_size=8"),
                         resume="never", in_process=True), "s")
    two = evals(run_plan(cfg_of(prepared_root, tmp_path / "two", plan, "train.grad_accum=2"),
                         resume="never", in_process=True), "s")
    assert {"train_loss_qa_train", "train_loss_raw_train"} <= set(one[-1])  # both sources were drawn
    keys = ("train_loss", "train_loss_qa_train", "train_loss_raw_train", "raw_val_loss", "grad_norm", "label_tokens")
    assert [g[k] for g in two for k in keys] == pytest.approx([w[k] for w in one for k in keys], rel=1e-6)


def test_mixture_schedule_is_applied_at_the_current_step(prepared_root, tmp_path):
    plan = ('[{name: s, sources: {raw_train: 1.0}, mixture_mode: step, max_steps: 8, eval_every: 4, '
            'mixture_schedule: [{start_frac: 0.5, weights: {qa_train: 1.0}}], stop: {rule: max_steps}}]')
    res = run_plan(cfg_of(prepared_root, tmp_path, plan), resume="never", in_process=True)
    first, second = evals(res, "s")
    assert first["train_loss_raw_train"] is not None and first["train_loss_qa_train"] is None
    assert second["train_loss_raw_train"] is None and second["train_loss_qa_train"] is not None


def test_kl_only_on_replay_sources(prepared_root, tmp_path):
    # raw_train at weight 0: a replay source the stage never draws (with no replay source at all a KL weight is
    # refused, test_config), so every step is exam rows
    plan = ('[{name: s, sources: {qa_train: 1.0, raw_train: 0.0}, max_steps: 4, eval_every: 2, kl_beta: 0.5, '
            'kl_reference: base, stop: {rule: max_steps}}, '
            '{name: t, sources: {raw_train: 1.0}, max_steps: 4, eval_every: 2, kl_beta: 0.5, kl_reference: base, '
            'stop: {rule: max_steps}}]')
    res = run_plan(cfg_of(prepared_root, tmp_path, plan), resume="never", in_process=True)
    assert all(r["kl"] is None for r in evals(res, "s"))      # exam rows are not replay: no KL term
    assert all(r["kl"] is not None and r["kl"] > 0 for r in evals(res, "t"))


def _token_mean_loss(checkpoint: str, cfg, prepared: Path) -> float:
    """Exam val loss computed independently: every row, one at a time, Σ CE / Σ targets."""
    from kcpt.model.loading import load_causal_lm
    from kcpt.train.batches import load_packed_rows, to_batch
    from kcpt.train.losses import token_ce_sum

    model = load_causal_lm(cfg.model, path=checkpoint).eval()
    rows = load_packed_rows(prepared, seq_len=cfg.data.seq_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(min(len(rows), cfg.train.max_eval_rows)):
            b = to_batch(rows, torch.tensor([i]).numpy())
            s, n = token_ce_sum(model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits, b["labels"])
            total, count = total + float(s), count + int(n)
    return total / count


def test_eval_losses_are_token_means(prepared_root, tmp_path):
    plan = ('[{name: s, sources: {qa_train: 1.0}, max_steps: 3, eval_every: 3, eval_exam: qa_val, '
            'stop: {rule: max_steps}}]')
    cfg = cfg_of(prepared_root, tmp_path, plan, "train.eval_batch_size=5")
    res = run_plan(cfg, resume="never", in_process=True)
    (rec,) = evals(res, "s")
    prepared = next(p for p in prepared_root.iterdir() if p.name.startswith("qa_val-"))
    assert rec["exam_val_loss"] == pytest.approx(_token_mean_loss(rec["checkpoint"], cfg, prepared), abs=1e-5)


def test_rollback_cuts_the_lr_and_the_schedule_keeps_following_the_step(prepared_root, tmp_path):
    plan = ('[{name: s, sources: {raw_train: 1.0}, max_steps: 10, eval_every: 5, lr: {peak: 0.003, warmup_steps: 2},'
            ' stop: {rule: max_steps}}]')
    cfg = cfg_of(prepared_root, tmp_path, plan, "train.faults.grad_spike_at_step=6")
    res = run_plan(cfg, resume="never", in_process=True)
    a, b = evals(res, "s")
    lr = cfg.stage("s").lr
    assert (a["rollbacks"], b["rollbacks"]) == (0, 1)
    assert a["lr"] == pytest.approx(lr_at(4, 10, lr))
    # the last step (index 9) runs at the schedule's value for step 9, halved once: not rewound, not uncut
    assert b["lr_scale"] == 0.5
    assert b["lr"] == pytest.approx(lr_at(9, 10, lr, 0.5))
    assert res.summaries["s"]["steps"] == 10


def test_baseline_is_the_best_not_the_last_cpt_raw_loss(prepared_root, tmp_path):
    plan = ('[{name: cpt, sources: {raw_train: 1.0}, max_steps: 60, eval_every: 4, sets_baseline: true, '
            'lr: {peak: 0.03, warmup_steps: 0, min_ratio: 1.0}, stop: {rule: max_steps}}]')
    cfg = cfg_of(prepared_root, tmp_path, plan, "tune.stage=cpt", "train.micro_batch_size=2",
                 "train.anomaly.k_mad=1000", "train.weight_decay=0", "data.loader=memory")
    # wd 0: the same run with or without decay groups (the run must overfit; at LR 0.03 the trajectory depends on
    # which parameters decay, and on the row order: the memory loader's order was measured to end above its best)
    res = run_plan(cfg, resume="never", in_process=True)
    raws = [r["raw_val_loss"] for r in evals(res, "cpt")]
    assert min(raws) < raws[-1]                  # the run overfits: the last eval is not the best
    assert res.baseline_raw_best == pytest.approx(min(raws), abs=1e-9)
    assert res.summaries["cpt"]["best_checkpoint"].endswith(f"step{4 * (raws.index(min(raws)) + 1):06d}")


def test_a_cpt_that_never_beats_its_start_does_not_pass_nor_lower_the_bar(prepared_root, tmp_path):
    """LR 1.0 on the tiny model: every CPT eval is above the step-0 eval. The stage must not be reported as a
    plateau pass, the user must be told what to change, the plan stops there by default, and when told to go on
    the later stage's raw bound is the start's."""
    from kcpt.console import stage_end_line
    from kcpt.train.rundir import RunDir
    from kcpt.train.stopping import NO_GAIN

    plan = ('[{name: cpt, sources: {raw_train: 1.0}, max_steps: 24, eval_every: 4, sets_baseline: true, '
            'lr: {peak: 1.0, warmup_steps: 0, min_ratio: 1.0}, stop: {rule: plateau, patience: 2}}, '
            '{name: s, sources: {qa_train: 1.0}, max_steps: 2, eval_every: 2, eval_exam: exam_val, '
            'stop: {rule: exam, exam_target: 0.1, patience: 5}}]')
    with pytest.raises(TrainingAborted, match=r"stage 'cpt': its raw val loss never got better.*lr.peak \(now "
                                              r"1.00e\+00\)[^:]*The plan stops before 's'.*stop_plan_without_gain"):
        run_plan(cfg_of(prepared_root, tmp_path / "stops", plan), resume="never", in_process=True)
    stopped = RunDir(tmp_path / "stops" / "r")
    assert stopped.read_summary()["stage_order"] == ["cpt"]  # CPT's summary is there; stage s never started
    assert {r["stage"] for r in read_metrics(stopped.root)} == {"cpt"}
    res = run_plan(cfg_of(prepared_root, tmp_path, plan, "train.stop_plan_without_gain=false"), resume="never",
                   in_process=True)
    recs = read_metrics(res.run_dir)
    start = next(r["raw_val_loss"] for r in recs if r["stage"] == "cpt" and r["step"] == 0)
    cpt = res.summaries["cpt"]
    assert min(r["raw_val_loss"] for r in evals(res, "cpt")) > start  # the premise: training only made it worse
    assert not cpt["passed"] and cpt["stop_reason"] == "plateau" + NO_GAIN
    assert cpt["start_raw_val_loss"] == start and cpt["min_raw_val_loss"] > start
    assert "lr.peak (now 1.00e+00)" in cpt["warning"] and f"baseline_raw_best stays the start's {start:.4f}" in \
        cpt["warning"]
    assert res.baseline_raw_best == start  # not the worse best the stage reached
    s0 = next(r for r in recs if r["stage"] == "s" and r["step"] == 0)  # stage s starts from CPT's best ...
    assert s0["raw_val_loss"] == pytest.approx(cpt["min_raw_val_loss"], rel=1e-5)
    assert s0["raw_ratio"] == pytest.approx(s0["raw_val_loss"] / start) and s0["raw_ratio"] > 1.03  # ... judged
    assert "warning: stage 'cpt'" in stage_end_line({**cpt, "sets_baseline": True})
    assert "warning" not in stage_end_line({**res.summaries["s"], "sets_baseline": False})
    from kcpt.analysis.run_report import format_stage_table

    assert f"warning: {cpt['warning']}" in format_stage_table(res.summaries, recs).splitlines()  # the end table


def test_stage_needing_a_baseline_is_refused_before_any_step(prepared_root, tmp_path):
    plan = ('[{name: s, sources: {qa_train: 1.0}, eval_exam: qa_val, max_steps: 2, '
            'stop: {rule: exam, exam_target: 1.0}}]')
    cfg = cfg_of(prepared_root, tmp_path, plan)
    with pytest.raises(ConfigError, match="stage 's'.*baseline_raw_best.*--baseline-raw-best.*raw_bound: false"):
        run_plan(cfg, resume="never", in_process=True)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()    # refused before anything ran
    # said explicitly: the stage runs without the raw bound
    off = cfg_of(prepared_root, tmp_path, plan.replace("rule: exam,", "rule: exam, raw_bound: false,"))
    assert run_plan(off, resume="never", in_process=True).summaries["s"]["steps"] >= 1
    # given at launch: fine (the same run name again: replaced on purpose)
    res = run_plan(cfg, resume="overwrite", in_process=True, baseline_raw_best=9.0)
    assert res.summaries["s"]["baseline_raw_best"] == 9.0


def test_pareto_front_is_kept_and_the_next_stage_starts_from_the_chosen_point(prepared_root, tmp_path):
    # CPT, then QA only at a high LR: exam loss falls while raw loss climbs — a real (raw, exam) trade-off
    plan = ('[{name: c, sources: {raw_train: 1.0}, max_steps: 30, eval_every: 30, sets_baseline: true, '
            'lr: {peak: 0.01, warmup_steps: 0}, stop: {rule: max_steps}}, '
            '{name: a, sources: {qa_train: 1.0}, eval_exam: qa_val, max_steps: 16, eval_every: 2, '
            'lr: {peak: 0.01, warmup_steps: 0, min_ratio: 1.0}, stop: {rule: max_steps}}, '
            '{name: b, sources: {raw_train: 1.0}, max_steps: 2, eval_every: 2, start_from: best_exam, '
            'stop: {rule: max_steps}}]')
    cfg = cfg_of(prepared_root, tmp_path, plan, "train.keep_last=1", "tune.stage=a", "train.anomaly.k_mad=1000")
    res = run_plan(cfg, resume="never", in_process=True)
    a = res.summaries["a"]
    recs = evals(res, "a")
    by_ckpt = {r["checkpoint"]: r for r in recs}
    front_only = set(a["pareto_front"]) - set(a["handoff"].values()) - {a["best_checkpoint"]}
    assert front_only                                          # the check below can catch a pruned front point
    on_disk = {str(p) for p in list_checkpoints(res.run_dir / "checkpoints")}
    assert set(a["pareto_front"]) <= on_disk                   # no front point pruned (keep_last is 1)
    best_exam = min(recs, key=lambda r: (r["exam_val_loss"], r["raw_val_loss"]))
    assert a["handoff"]["best_exam"] == best_exam["checkpoint"]
    assert a["handoff"]["best_exam"] != a["best_checkpoint"]  # max_steps rule: best by raw, another point
    assert all(by_ckpt[p]["exam_val_loss"] >= best_exam["exam_val_loss"] for p in a["pareto_front"])
    # stage b started from the chosen point: its step-0 raw loss is that checkpoint's
    b0 = next(r for r in read_metrics(res.run_dir) if r["stage"] == "b" and r["step"] == 0)
    assert b0["raw_val_loss"] == pytest.approx(best_exam["raw_val_loss"], abs=1e-6)


def test_deterministic_abort_ends_the_run_once_with_state_intact(prepared_root, tmp_path):
    plan = ('[{name: s, sources: {raw_train: 1.0}, max_steps: 8, eval_every: 2, stop: {rule: max_steps}}]')
    cfg = cfg_of(prepared_root, tmp_path, plan, "train.faults.nan_at_step=5", "train.anomaly.max_rollbacks=0")
    with pytest.raises(TrainingAborted, match=r"1 anomalies.*max_rollbacks = 0.*not finite"):
        run_plan(cfg, resume="never", in_process=True)
    recs = read_metrics(tmp_path / "r")
    assert [r["step"] for r in recs] == [0, 2, 4]              # evals up to the abort are kept
    assert all(math.isfinite(r["raw_val_loss"]) for r in recs)
    assert len(list_checkpoints(tmp_path / "r" / "checkpoints")) >= 1


def test_default_anomaly_rule_has_no_false_positives_on_uneven_answers(tmp_path):
    """An exam stage on whole-article answers mixed with one-word answers (1 to ~250 targets per row), 2 rows per
    micro-batch, the default anomaly rule: not one rollback (the old mean/std rule aborted such a stage), while
    the injected NaN and spike tests above and in test_train_ray still roll back."""
    from kcpt.data.demo import build_uneven_exam

    paths = build_uneven_exam(tmp_path / "data")
    datasets = ("{raw_train: {kind: raw, inputs: ['demo:raw_train']}, raw_val: {kind: raw, inputs: ['demo:raw_val']},"
                f" qa_long_train: {{kind: exam, inputs: ['{paths['qa_long_train']}']}},"
                f" qa_long_val: {{kind: exam, inputs: ['{paths['qa_long_val']}']}}}}")
    plan = ("[{name: s, sources: {qa_long_train: 1.0}, eval_exam: qa_long_val, max_steps: 80, eval_every: 40, "
            "lr: {peak: 1.0e-3, warmup_steps: 5}, stop: {rule: max_steps}}]")
    cfg = load_config(None, ["logging.progress=false", "logging.tensorboard=false", f"data.datasets={datasets}",
                             f"data.prepared_root={tmp_path / 'prepared'}", f"train.output_dir={tmp_path}",
                             "train.num_workers=1", "train.micro_batch_size=2", "train.max_eval_rows=16",
                             "tune.stage=s", f"plan={plan}"])
    res = run_plan(cfg, resume="never", in_process=True)
    recs = evals(res, "s")
    assert recs[-1]["step"] == 80 and recs[-1]["rollbacks"] == 0
    assert recs[-1]["grad_norm_max"] > 1.5 * recs[-1]["grad_norm"]   # the norms really were uneven


def test_checkpoint_every_k_evals_besides_best_stop_and_front():
    from kcpt.config import StageConfig, TrainConfig
    from kcpt.train.loop import checkpoint_due

    st = StageConfig(name="s", sources={"raw_train": 1.0}, max_steps=40, eval_every=5)
    t3 = TrainConfig(checkpoint_every_evals=3)
    plain = {"new_best": False, "stop": False, "on_front": False}
    assert [s for s in range(5, 41, 5) if checkpoint_due(t3, st, s, **plain)] == [15, 30]
    assert all(checkpoint_due(TrainConfig(), st, s, **plain) for s in range(5, 41, 5))   # default: every eval
    assert not any(checkpoint_due(TrainConfig(checkpoint_every_eval=False), st, s, **plain) for s in range(5, 41, 5))
    for key in plain:
        assert checkpoint_due(t3, st, 5, **{**plain, key: True})


def test_tokens_to_gate_is_recorded_per_eval_per_stage_and_for_the_plan(prepared_root, tmp_path):
    # a CPT stage, then a gated stage whose gate always holds (loose bounds): it passes at its 2nd eval (step 4)
    plan = ('[{name: cpt, sources: {raw_train: 1.0}, max_steps: 6, eval_every: 3, sets_baseline: true, '
            'stop: {rule: max_steps}}, '
            '{name: s, sources: {qa_train: 0.5, raw_train: 0.5}, eval_exam: qa_val, max_steps: 10, eval_every: 2, '
            'stop: {rule: gate, exam_target: 100.0, raw_tolerance: 1.0, consecutive: 2}}]')
    res = run_plan(cfg_of(prepared_root, tmp_path, plan, "tune.stage=s"), resume="never", in_process=True)
    per_step = 4 * 64                                  # micro_batch 4 × seq_len 64, one worker, no accumulation
    cpt_tokens = res.summaries["cpt"]["tokens_seen"]
    assert cpt_tokens == 6 * per_step
    first, second = evals(res, "s")                    # the gate rule ends the stage at its 2nd consecutive pass
    assert first["tokens_to_gate"] is None and first["plan_tokens_to_gate"] is None
    assert second["tokens_to_gate"] == 4 * per_step == second["tokens_seen"]
    assert second["plan_tokens_to_gate"] == cpt_tokens + 4 * per_step
    s = res.summaries["s"]
    assert (s["tokens_to_gate"], s["plan_tokens_to_gate"]) == (4 * per_step, cpt_tokens + 4 * per_step)
    assert res.summaries["cpt"]["tokens_to_gate"] is None          # no gate in a max_steps stage
    records = read_metrics(res.run_dir)
    assert all(r["gate_ok"] is None for r in records if r["stage"] == "cpt")  # the console prints no "gate no ×0"
    assert [r["gate_ok"] for r in records if r["stage"] == "s"] == [None, True, True]  # start, then the evals
    assert [r["lr"] is None for r in records] == [r["step"] == 0 for r in records]  # no step before the start eval
    # label positions (≠ -100) of each interval: fewer than its row positions (segment starts, padding, prompts);
    # tokens_seen counts every position
    assert 0 < evals(res, "cpt")[0]["label_tokens"] < 3 * per_step and 0 < first["label_tokens"] < 2 * per_step
    summary = json.loads((Path(res.run_dir) / "summary.json").read_text())
    assert summary["first_gate"] == {"stage": "s", "tokens_to_gate": 4 * per_step,
                                     "plan_tokens_to_gate": cpt_tokens + 4 * per_step}
    # a gate that never holds: null everywhere, no first_gate
    never = plan.replace("exam_target: 100.0", "exam_target: 0.001")
    res = run_plan(cfg_of(prepared_root, tmp_path, never, "tune.stage=s"), resume="overwrite", in_process=True)
    assert all(r["tokens_to_gate"] is None for r in evals(res, "s"))
    assert res.summaries["s"]["tokens_to_gate"] is None and res.summaries["s"]["steps"] == 10
    assert "first_gate" not in json.loads((Path(res.run_dir) / "summary.json").read_text())


def test_a_stages_micro_batch_trains_as_the_same_train_setting_would(prepared_root, tmp_path):
    """``plan[i].micro_batch_size`` overrides ``train.micro_batch_size`` for that stage only: the stage trains
    exactly as a run with that train setting (same rows, losses, tokens); the other stages keep train's."""
    stage = ('{name: s, sources: {qa_train: 0.5, raw_train: 0.5}, max_steps: 6, eval_every: 3, '
             'stop: {rule: max_steps}%s}')
    then = '{name: f, sources: {raw_train: 1.0}, max_steps: 2, eval_every: 2, stop: {rule: max_steps}}'
    own = run_plan(cfg_of(prepared_root, tmp_path / "own", f"[{stage % ', micro_batch_size: 2'}, {then}]"),
                   resume="never", in_process=True)
    train = run_plan(cfg_of(prepared_root, tmp_path / "train", f"[{stage % ''}]", "train.micro_batch_size=2"),
                     resume="never", in_process=True)
    four = run_plan(cfg_of(prepared_root, tmp_path / "four", f"[{stage % ''}]"), resume="never", in_process=True)
    got, want = evals(own, "s"), evals(train, "s")
    assert [r["tokens_seen"] for r in got] == [3 * 2 * 64, 6 * 2 * 64] == [r["tokens_seen"] for r in want]
    for g, w in zip(got, want, strict=True):
        for k in ("train_loss", "raw_val_loss", "grad_norm"):
            assert g[k] == pytest.approx(w[k], abs=1e-6, rel=0), (g["step"], k)
    assert own.summaries["f"]["tokens_seen"] == 2 * 4 * 64          # the next stage: train's micro-batch 4
    assert evals(four, "s")[0]["tokens_seen"] == 3 * 4 * 64
    assert evals(four, "s")[0]["train_loss"] != pytest.approx(got[0]["train_loss"], abs=1e-6)  # other rows


@pytest.mark.parametrize("loader", ["stream", "memory"])
def test_resume_from_a_mid_stage_checkpoint_is_exact_with_either_loader(prepared_root, tmp_path, loader):
    """A run resumed from its step-4 checkpoint (the later ones deleted, as if the run died after step 4) ends
    with the uninterrupted run's metrics: the data cursors (stream: epoch + rows consumed; memory: batch
    index), the mixture sampler and the RNG continue exactly. The two loaders give different row orders."""
    plan = ('[{name: s, sources: {qa_train: 0.5, raw_train: 0.5}, max_steps: 12, eval_every: 4, '
            'stop: {rule: max_steps}}]')
    cfg = cfg_of(prepared_root, tmp_path, plan, f"data.loader={loader}", "train.keep_last=5")
    want, got = uninterrupted_and_resumed_from_step_4(cfg)
    assert [r["step"] for r in got] == [4, 8, 12]
    assert_same_evals(got, want, ("train_loss", "train_loss_qa_train", "train_loss_raw_train", "raw_val_loss",
                                  "grad_norm"))
    other = "memory" if loader == "stream" else "stream"
    res2 = run_plan(cfg_of(prepared_root, tmp_path / "other", plan, f"data.loader={other}"), resume="never",
                    in_process=True)
    assert evals(res2, "s")[0]["train_loss"] != pytest.approx(want[0]["train_loss"], abs=1e-6)


def test_resume_at_another_micro_batch_reads_on_from_the_rows_not_read_yet(prepared_root, tmp_path, caplog):
    """Stream loader: a run at micro-batch 4 resumed from its step-4 checkpoint at micro-batch 2 × grad_accum 2 (the
    same 4 rows per step, so no --force: a layout change alone) ends with the uninterrupted run's metrics — the
    source goes on with the rows no worker had read (before: refused, the cursor counted batches of 4)."""
    import logging
    import shutil

    plan = "[{name: s, sources: {raw_train: 1.0}, max_steps: 12, eval_every: 4, stop: {rule: max_steps}}]"
    res = run_plan(cfg_of(prepared_root, tmp_path, plan, "train.keep_last=5"), resume="never", in_process=True)
    want = evals(res, "s")
    for c in list_checkpoints(Path(res.run_dir) / "checkpoints"):
        if not str(c).endswith("step000004"):
            shutil.rmtree(c)
    relaid = cfg_of(prepared_root, tmp_path, plan, "train.keep_last=5", "train.micro_batch_size=2",
                    "train.grad_accum=2")
    with caplog.at_level(logging.INFO, logger="kcpt.train.launch"):
        again = run_plan(relaid, resume="auto", in_process=True)
    assert "grad_accum 1 → 2, micro-batch 4 → 2 rows — the same rows per step (4): the run goes on as configured, " \
           "each source with the rows of its epoch no worker has read yet" in caplog.text
    got = evals(again, "s")
    assert [r["step"] for r in got] == [4, 8, 12]
    assert_same_evals(got, want, ("train_loss", "raw_val_loss", "grad_norm"))


def test_exam_accuracy_at_every_eval_equals_an_independent_score(prepared_root, tmp_path):
    """exam_acc / exam_em / exam_f1 in metrics.jsonl at every eval (step 0 too) are what score_exam gives for
    the checkpoint on the prepared set's items.jsonl; the gate's accuracy metric stops the stage on its target."""
    from transformers import AutoTokenizer

    from kcpt.data.exam_io import read_items_file
    from kcpt.eval.exam_scoring import score_exam
    from kcpt.model.loading import load_causal_lm

    plan = ('[{name: s, sources: {example_train: 1.0}, max_steps: 4, eval_every: 2, eval_exam: example_val, '
            'stop: {rule: exam, exam_metric: accuracy, exam_target: 0.05, raw_bound: false}}]')
    cfg = cfg_of(prepared_root, tmp_path, plan)
    res = run_plan(cfg, resume="never", in_process=True)
    recs = [r for r in read_metrics(res.run_dir) if r["stage"] == "s"]
    prepared = next(p for p in prepared_root.iterdir() if p.name.startswith("example_val-"))
    items = read_items_file(prepared / "items.jsonl")
    n_mc = sum(1 for it in items if it.choices)
    assert 0 < n_mc < len(items)
    assert [r["step"] for r in recs] == [0, 2]  # stopped at the first eval after step 0: acc ≥ 0.05
    for r in recs:
        assert r["exam_items_mc"] == n_mc and r["exam_items_short"] == len(items) - n_mc
        assert r["exam_acc"] is not None and r["exam_em"] is not None and r["exam_f1"] is not None
    last = recs[-1]
    assert last["exam_acc"] >= 0.05 and last["stop"] and last["stop_reason"] == "exam_target"
    model = load_causal_lm(cfg.model, path=last["checkpoint"]).eval()
    tok = AutoTokenizer.from_pretrained(str(prepared / "tokenizer"))
    s = score_exam(model, tok, items, cfg.data.template, batch_size=5)
    assert (last["exam_acc"], last["exam_em"]) == (s.accuracy, s.exact_match)
    assert last["exam_f1"] == pytest.approx(s.f1, abs=1e-12)
    summary = res.summaries["s"]
    assert summary["exam_metric"] == "accuracy" and summary["best_exam_acc"] == last["exam_acc"]
    assert summary["best_exam_val_loss"] == last["exam_val_loss"]
    from kcpt.analysis.run_report import format_run_report

    report = format_run_report(res.run_dir)  # `kcpt report RUN`: the stage table shows the accuracy
    assert "acc best" in report and f"{last['exam_acc']:.3f}" in report
    # a target the accuracy does not reach (the loss, ~8 nats, would "reach" it): the stage runs to max_steps
    res = run_plan(cfg_of(prepared_root, tmp_path / "high", plan.replace("exam_target: 0.05", "exam_target: 0.9")
                          .replace("{rule: exam,", "{rule: exam, patience: 9,")), resume="never", in_process=True)
    high = [r for r in read_metrics(res.run_dir) if r["stage"] == "s"]
    assert [r["step"] for r in high] == [0, 2, 4] and all(r["exam_acc"] < 0.9 for r in high)
    assert high[-1]["stop_reason"] == "max_steps: exam not done"


def test_accuracy_stop_on_a_set_without_choices_is_refused_at_the_first_eval(prepared_root, tmp_path):
    plan = ('[{name: s, sources: {qa_train: 1.0}, max_steps: 4, eval_every: 2, eval_exam: qa_val, '
            'stop: {rule: exam, exam_metric: accuracy, exam_target: 0.5, raw_bound: false}}]')
    with pytest.raises(ConfigError, match="eval set 'qa_val' gave no exam accuracy: it has no multiple-choice"):
        run_plan(cfg_of(prepared_root, tmp_path, plan), resume="never", in_process=True)


def test_a_resume_may_change_how_the_run_runs_and_a_refused_one_names_what_changed(prepared_root, tmp_path, capsys):
    """A full resume checks what the config trains, not how it runs: retries, CPUs, kept checkpoints, the data
    cache's place and the tune section may change. A change to what it trains is refused naming each key."""
    from kcpt.errors import CheckpointError

    plan = '[{name: s, sources: {raw_train: 1.0}, max_steps: 4, eval_every: 2, stop: {rule: max_steps}}]'
    run_plan(cfg_of(prepared_root, tmp_path, plan), resume="never", in_process=True)
    ops = ["train.max_failures=5", "train.cpus_per_worker=2", "train.keep_last=3", "tune.num_samples=9",
           "data.max_reject_fraction=0.5"]
    run_plan(cfg_of(prepared_root, tmp_path, plan, *ops), resume="auto", in_process=True)
    assert f"resuming from {tmp_path / 'r' / 'checkpoints' / '00-s-step000004'} (stage 's', step 4)" in \
        capsys.readouterr().out
    changed = cfg_of(prepared_root, tmp_path, plan, "plan.0.lr.peak=0.003", "train.weight_decay=0.2")
    with pytest.raises(CheckpointError) as e:
        run_plan(changed, resume="auto", in_process=True)
    msg = str(e.value)
    assert "config_sha256" in msg and "… vs now " in msg and "…. ." not in msg and ".." not in msg and msg.endswith(
        "Changed since the run's config.yaml: plan.0.lr.peak: 0.001 → 0.003; train.weight_decay: 0.01 → 0.2. Set them "
        "back to continue the run, start another (--run-name, or --overwrite), or pass --force to continue with the "
        "new values."), msg


def test_resume_of_a_run_that_has_nothing_to_resume_says_so(tmp_path, capsys):
    """`--resume` with a mistyped run name used to start a new run without a word."""
    from kcpt.train.commands import main

    ds = tmp_path / "ds.json"
    ds.write_text('{"gradient_clipping": 5.0}')  # refused by run_plan before Ray starts: the test stops there
    rc = main(["--resume", "--set", f"train.output_dir={tmp_path}", "--set", "train.run_name=typo",
               "--set", f"train.deepspeed={{zero_stage: 2, config: {ds}}}"])
    out, err = capsys.readouterr()
    assert rc == 2 and "gradient_clipping" in err
    assert f"--resume: {tmp_path / 'typo'} holds no complete checkpoint of this plan (a typo in the run name?); a " \
           "new run starts there" in out


def test_a_sigterm_during_a_run_ends_it_like_a_ctrl_c_with_its_own_status(prepared_root, tmp_path, capsys):
    """`ray job stop` sends SIGTERM: Ray's driver used to dump a stack trace and abort (status 134). Now the run
    ends as after a Ctrl-C, its last checkpoint kept, with one line and status 143."""
    import os
    import signal

    from kcpt.cli import run_guarded
    from kcpt.errors import Terminated

    plan = '[{name: s, sources: {raw_train: 1.0}, max_steps: 8, eval_every: 2, stop: {rule: max_steps}}]'

    def on_report(metrics, checkpoint):
        if metrics.get("step") == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match=r"r keeps its last complete checkpoint; run the same command with --resume"):
        run_plan(cfg_of(prepared_root, tmp_path, plan), resume="never", in_process=True, on_report=on_report)
    assert signal.getsignal(signal.SIGTERM) is before  # the job's own handler is back
    assert [p.name for p in list_checkpoints(tmp_path / "r" / "checkpoints")][-1] == "00-s-step000004"
    capsys.readouterr()

    def job():
        raise Terminated("x keeps its last complete checkpoint")

    assert run_guarded("", job) == 143
    assert capsys.readouterr().err == "terminated: x keeps its last complete checkpoint\n"


def test_a_rollback_after_a_resume_returns_where_the_uninterrupted_run_returns(prepared_root, tmp_path):
    """Rollback points every 3 accepted steps, a checkpoint at step 4, a NaN at step 6. A resume from step 4 takes
    its rollback point at step 4; the uninterrupted run used to be at its step-3 point, so the two rolled back to
    different states and every later eval differed. Every checkpoint is now a rollback point in both."""
    plan = '[{name: s, sources: {raw_train: 1.0}, max_steps: 12, eval_every: 4, stop: {rule: max_steps}}]'
    cfg = cfg_of(prepared_root, tmp_path, plan, "train.anomaly.stable_every=3", "train.keep_last=5",
                 "train.faults.nan_at_step=6")
    want, got = uninterrupted_and_resumed_from_step_4(cfg)
    assert [r["rollbacks"] for r in want] == [0, 1, 1]
    assert [r["step"] for r in got] == [4, 8, 12]
    assert_same_evals(got, want, ("train_loss", "raw_val_loss", "grad_norm", "lr_scale", "rollbacks"))


def test_a_model_whose_logits_have_an_output_bias_trains_and_evaluates_on_its_own_logits(prepared_root, tmp_path):
    """The fused loss computes ``hidden @ head.T``: for a model with an output bias (Phi) it trained and evaluated
    another function than the model is (measured: step-0 raw loss 8.697 = the model with its bias zeroed, against
    10.793). Such a model now runs on its logits: the step-0 loss is the same with train.fused_loss on or off,
    and it changes with the bias."""
    from transformers import PhiConfig, PhiForCausalLM

    from kcpt.model.tokenizer import load_tokenizer
    from kcpt.train.fused_loss import unfused_reason

    tok = load_tokenizer(load_config(None, []).tokenizer)
    torch.manual_seed(0)
    phi = PhiForCausalLM(PhiConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=128,
                                   eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    assert unfused_reason(phi) == "its output head has a bias"
    with torch.no_grad():
        phi.lm_head.bias.normal_(0, 2.0)
    phi.save_pretrained(tmp_path / "phi")
    with torch.no_grad():
        phi.lm_head.bias.zero_()
    phi.save_pretrained(tmp_path / "phi0")
    plan = '[{name: s, sources: {raw_train: 1.0}, max_steps: 1, eval_every: 1, stop: {rule: max_steps}}]'

    def start_loss(model_dir, name, *extra):
        res = run_plan(cfg_of(prepared_root, tmp_path / name, plan, f"model.name_or_path={model_dir}", *extra),
                       resume="never", in_process=True)
        return next(r for r in read_metrics(res.run_dir) if r["step"] == 0)["raw_val_loss"]

    fused, logits = start_loss(tmp_path / "phi", "a"), start_loss(tmp_path / "phi", "b", "train.fused_loss=false")
    assert fused == pytest.approx(logits, abs=1e-5)
    assert abs(start_loss(tmp_path / "phi0", "c") - fused) > 0.5  # the bias is in the loss


def test_a_relative_model_directory_reaches_the_workers_as_an_absolute_path(prepared_root, tmp_path, monkeypatch):
    """Workers run in other working directories: `--set model.name_or_path=expanded/llama` (as the README's
    tokenizer-expansion example writes it) was taken for a hub name there, after minutes of hub retries."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kcpt.model.tokenizer import load_tokenizer

    tok = load_tokenizer(load_config(None, []).tokenizer)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=128)).save_pretrained(
        tmp_path / "expanded" / "llama")
    monkeypatch.chdir(tmp_path)
    plan = '[{name: s, sources: {raw_train: 1.0}, max_steps: 1, eval_every: 1, stop: {rule: max_steps}}]'
    res = run_plan(cfg_of(prepared_root, tmp_path, plan, "model.name_or_path=expanded/llama"), resume="never",
                   in_process=True)
    assert load_config(Path(res.run_dir) / "config.yaml").model.name_or_path == str(tmp_path / "expanded" / "llama")


def test_a_model_with_fewer_learned_positions_than_seq_len_is_refused_before_anything_runs(prepared_root, tmp_path):
    """A GPT-2 of 32 positions at data.seq_len 64 failed in every worker with an IndexError (a 60-line Ray
    traceback) and left a half-written run directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    plan = '[{name: s, sources: {raw_train: 1.0}, max_steps: 1, eval_every: 1, stop: {rule: max_steps}}]'
    with pytest.raises(ConfigError, match=r"data.seq_len 64 is longer than the 32 positions of .*gpt2 \(a gpt2 model "
                                          r"learns a table of positions\): set data.seq_len=32 or less"):
        run_plan(cfg_of(prepared_root, tmp_path, plan, f"model.name_or_path={tmp_path / 'gpt2'}"), resume="never",
                 in_process=True)
    assert not (tmp_path / "r").exists()


def test_a_model_with_fewer_embedding_rows_than_tokens_is_warned_on_the_console(prepared_root, tmp_path, capsys):
    """The loader grows such a model with random rows; only a worker's log said so."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kcpt.model.tokenizer import load_tokenizer

    n = len(load_tokenizer(load_config(None, []).tokenizer))
    LlamaForCausalLM(LlamaConfig(vocab_size=n - 9, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=128)).save_pretrained(tmp_path / "m")
    plan = '[{name: s, sources: {raw_train: 1.0}, max_steps: 1, eval_every: 1, stop: {rule: max_steps}}]'
    run_plan(cfg_of(prepared_root, tmp_path, plan, f"model.name_or_path={tmp_path / 'm'}"), resume="never",
             in_process=True)
    assert (f"warning: {tmp_path / 'm'} has {n - 9} embedding rows and the tokenizer {n} tokens: rows "
            f"{n - 9}..{n - 1} are added with random values.") in capsys.readouterr().out


def test_a_copied_or_moved_run_directory_resumes_on_its_own_checkpoints(prepared_root, tmp_path):
    """A run stopped in its 2nd stage (an injected InputError), then copied and resumed, and moved and resumed:
    each finishes on its own checkpoints — its CPT best kept (keep_last 1 prunes what the run does not name), the
    hand-off, summaries and metric records naming checkpoints of its own directory, none of the original's (the
    trainer state names checkpoints where they were written: the copy used to prune its own CPT checkpoints and
    hand off from the original's; a move failed)."""
    import shutil

    plan = ('[{name: c, sources: {raw_train: 1.0}, max_steps: 6, eval_every: 2, sets_baseline: true, '
            'stop: {rule: max_steps}}, '
            '{name: s, sources: {qa_train: 0.5, raw_train: 0.5}, eval_exam: qa_val, max_steps: 8, eval_every: 2, '
            'kl_beta: 0.1, stop: {rule: max_steps}}]')
    cfg_at = lambda out, *x: cfg_of(prepared_root, out, plan, "train.keep_last=1", *x)  # noqa: E731
    with pytest.raises(Exception, match="input_error_at_step"):
        run_plan(cfg_at(tmp_path / "a", "train.faults.stage=s", "train.faults.input_error_at_step=5"),
                 resume="never", in_process=True)
    original = tmp_path / "a" / "r"
    shutil.copytree(original, tmp_path / "b" / "r")
    (tmp_path / "m").mkdir()
    for out in (tmp_path / "b", tmp_path / "m"):
        if out.name == "m":
            shutil.move(original, out / "r")  # the original itself goes: nothing may point at it any more
        res = run_plan(cfg_at(out), resume="auto", in_process=True, force=True)
        run = out / "r"
        assert res.summaries["s"]["steps"] == 8
        text = (run / "summary.json").read_text() + (run / "metrics.jsonl").read_text()
        assert str(original) not in text and str(run / "checkpoints") in text
        on_disk = {str(p) for p in list_checkpoints(run / "checkpoints")}
        summary = json.loads((run / "summary.json").read_text())
        assert summary["stages"]["c"]["best_checkpoint"] in on_disk  # the CPT best (the KL reference) kept
        assert summary["cpt_best"] in on_disk if "cpt_best" in summary else True


def test_an_eval_that_is_not_finite_saves_no_checkpoint(prepared_root, tmp_path):
    """Weights damaged on disk at the same size (0xFF bytes: NaN) load without complaint; the resumed run's evals
    are then NaN. Such an eval used to save a checkpoint (a NaN point never looks dominated, so it "joined the
    Pareto front"), which became the newest: every later --resume took it. Now no eval that is not finite saves
    one, and the newest checkpoint stays the damaged one, for the user to remove. (Written without checksums, as
    before 2026-11-25: with them the damage is refused at the load, see the checksum test.)"""
    plan = '[{name: s, sources: {raw_train: 1.0}, max_steps: 12, eval_every: 2, stop: {rule: max_steps}}]'
    with pytest.raises(Exception, match="input_error_at_step"):
        run_plan(cfg_of(prepared_root, tmp_path, plan, "train.faults.input_error_at_step=5",
                        "train.checkpoint_checksums=false"), resume="never", in_process=True)
    newest = list_checkpoints(tmp_path / "r" / "checkpoints")[-1]
    assert newest.name.endswith("step000004")
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) - 4000:] = b"\xff" * 4000  # the last tensor's tail, same size
    weights.write_bytes(bytes(data))
    try:
        run_plan(cfg_of(prepared_root, tmp_path, plan), resume="auto", in_process=True, force=True)
    except TrainingAborted:
        pass
    records = [r for r in read_metrics(tmp_path / "r") if r["step"] > 4]
    # the damage shows in the evals (a NaN loss is recorded as null)
    assert records and all(r["raw_val_loss"] is None or not math.isfinite(r["raw_val_loss"]) for r in records)
    assert list_checkpoints(tmp_path / "r" / "checkpoints")[-1] == newest


def test_a_damaged_newest_checkpoint_is_refused_naming_the_one_a_resume_would_take_instead(prepared_root, tmp_path):
    """A newest checkpoint whose files no longer match its manifest (truncated) blocks the resume with what to do:
    move it away, and --resume continues from the checkpoint before it (named). Done so, the run finishes."""
    import shutil

    plan = '[{name: s, sources: {raw_train: 1.0}, max_steps: 8, eval_every: 2, stop: {rule: max_steps}}]'
    with pytest.raises(Exception, match="input_error_at_step"):
        run_plan(cfg_of(prepared_root, tmp_path, plan, "train.faults.input_error_at_step=5"), resume="never",
                 in_process=True)
    before, newest = list_checkpoints(tmp_path / "r" / "checkpoints")[-2:]
    with open(newest / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError) as err:
        run_plan(cfg_of(prepared_root, tmp_path, plan), resume="auto", in_process=True, force=True)
    assert "model.safetensors has 1000 bytes" in str(err.value)
    assert f"move it out of the run's checkpoints directory (or delete it) and run the same command with --resume, " \
           f"which then continues from the checkpoint before it, {before}" in str(err.value)
    shutil.move(newest, tmp_path / "damaged")
    res = run_plan(cfg_of(prepared_root, tmp_path, plan), resume="auto", in_process=True, force=True)
    assert res.summaries["s"]["steps"] == 8


def test_a_resume_puts_back_its_checkpoints_record_when_metrics_jsonl_lost_it(prepared_root, tmp_path, caplog):
    """A kill mid-write leaves metrics.jsonl's last line cut short; reading skips it (with a warning), and the
    record of the checkpoint the run resumes from came back from the checkpoint's manifest (it was dropped
    silently): every eval is recorded once, as in the uninterrupted run."""
    plan = '[{name: s, sources: {raw_train: 1.0}, max_steps: 8, eval_every: 2, stop: {rule: max_steps}}]'
    straight = run_plan(cfg_of(prepared_root, tmp_path / "a", plan), resume="never", in_process=True)
    with pytest.raises(Exception, match="input_error_at_step"):
        run_plan(cfg_of(prepared_root, tmp_path / "b", plan, "train.faults.input_error_at_step=5"), resume="never",
                 in_process=True)
    metrics = tmp_path / "b" / "r" / "metrics.jsonl"
    assert metrics.read_text().splitlines()[-1].startswith('{"stage": "s", "step": 4')
    metrics.write_text(metrics.read_text()[:-40])  # the step-4 record (its checkpoint's) cut short
    res = run_plan(cfg_of(prepared_root, tmp_path / "b", plan), resume="auto", in_process=True, force=True)
    assert "line 3 is cut short" in caplog.text and "put back from its manifest" in caplog.text
    got, want = read_metrics(res.run_dir), read_metrics(straight.run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 2, 4, 6, 8]
    assert_same_evals(got, want, ("raw_val_loss", "train_loss", "lr", "tokens_seen"))


@pytest.mark.parametrize("damaged", ["engine/optimizer.pt", "model.safetensors"])
def test_a_checkpoint_file_changed_at_the_same_size_is_refused_by_its_checksum(prepared_root, tmp_path, damaged):
    """A same-size change to a checkpoint file (random bytes into the optimizer state or the weights) loaded
    without complaint and was trained on (crash audit). The manifest's CRC-32 of each file is checked when the
    run loads it: the resume is refused naming the file and what to do, and with checksums off (an older
    checkpoint) it loads as before."""
    plan = '[{name: s, sources: {raw_train: 1.0}, max_steps: 8, eval_every: 2, stop: {rule: max_steps}}]'
    with pytest.raises(Exception, match="input_error_at_step"):
        run_plan(cfg_of(prepared_root, tmp_path, plan, "train.faults.input_error_at_step=5"), resume="never",
                 in_process=True)
    before, newest = list_checkpoints(tmp_path / "r" / "checkpoints")[-2:]
    manifest = json.loads((newest / "manifest.json").read_text())
    assert set(manifest["crc32"]) == set(manifest["files"])
    f = newest / damaged
    data = bytearray(f.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4000] = bytes(range(256)) * 15 + bytes(160)
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        run_plan(cfg_of(prepared_root, tmp_path, plan), resume="auto", in_process=True, force=True)
    assert f"{newest}: file {damaged} does not match its checksum in manifest.json" in str(err.value)
    assert f"continues from the checkpoint before it, {before}" in str(err.value)
    del manifest["crc32"]
    (newest / "manifest.json").write_text(json.dumps(manifest))
    run_plan(cfg_of(prepared_root, tmp_path, plan), resume="auto", in_process=True, force=True)  # no checksums: loads


def test_a_kl_reference_nobody_gives_is_refused_and_a_warmup_as_long_as_the_stage_is_warned(prepared_root, tmp_path,
                                                                                           capsys):
    """``kl_reference: cpt_best`` with no CPT stage before it and no reference or init checkpoint was refused inside
    each worker at the stage's start; now by run_plan before anything runs. A warm-up as long as the stage keeps the
    LR below its peak: the console says so, with the fraction the loop's LR reaches."""
    kl = ('[{name: s, sources: {raw_train: 1.0}, max_steps: 2, eval_every: 1, kl_beta: 0.1, '
          'stop: {rule: max_steps}}]')
    with pytest.raises(ConfigError, match=r"plan stage 's': kl_beta 0.1 with kl_reference cpt_best, but no stage "
                                          r"before it in this run sets_baseline"):
        run_plan(cfg_of(prepared_root, tmp_path, kl), resume="never", in_process=True)
    assert not (tmp_path / "r").exists()
    plan = ('[{name: a, sources: {raw_train: 1.0}, max_steps: 2, eval_every: 2, sets_baseline: true, '
            'lr: {peak: 0.001, warmup_steps: 4}, stop: {rule: max_steps}}, '
            '{name: b, sources: {raw_train: 1.0}, max_steps: 2, eval_every: 2, kl_beta: 0.1, '
            'lr: {peak: 0.001, warmup_steps: 1}, stop: {rule: max_steps}}]')
    res = run_plan(cfg_of(prepared_root, tmp_path, plan), resume="never", in_process=True)
    out = capsys.readouterr().out
    assert ("warning: plan stage 'a': lr.warmup_steps 4 ≥ max_steps 2: the LR only ramps up, to 40% of lr.peak at "
            "the last step") in out
    assert "plan stage 'b'" not in out                # its warm-up ends inside the stage
    last_a = [r for r in read_metrics(res.run_dir) if r["stage"] == "a"][-1]
    assert last_a["lr"] == pytest.approx(0.4 * 0.001)  # what the warning said the loop reaches
