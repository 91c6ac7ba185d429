"""Stage-loop building blocks without Ray: answer-only loss by hand, KL against the reference, batch streams
with cursors, padded eval batches, full labels on exam rows, tiny model loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kcpt.config import ModelConfig, TinyModelConfig
from kcpt.data.types import IGNORE_INDEX
from kcpt.model.loading import build_tiny_model, freeze, load_causal_lm
from kcpt.train.batches import PackedRows, SourceBatches, eval_batches, full_labels
from kcpt.train.losses import kl_to_reference_sum, token_ce_sum

TINY = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))


def _rows(n: int, t: int = 8, name: str = "src") -> PackedRows:
    ids = np.arange(n * t, dtype=np.int32).reshape(n, t) % 50 + 2
    pos = np.tile(np.arange(t, dtype=np.int32), (n, 1))
    labels = ids.copy()
    labels[:, 0] = IGNORE_INDEX
    return PackedRows(name, ids, pos, labels)


def test_answer_only_loss_equals_hand_computation():
    # One exam row: prompt tokens [5, 6, 7], answer tokens [8, 9], padding; labels -100 on prompt and padding.
    torch.manual_seed(0)
    labels = torch.tensor([[-100, -100, -100, 8, 9, -100, -100]])
    logits = torch.randn(1, 7, 12)
    loss_sum, count = token_ce_sum(logits, labels)
    # by hand: label at position t is predicted from position t-1
    logp = torch.log_softmax(logits[0], dim=-1)
    hand = -(logp[2, 8] + logp[3, 9])
    assert int(count) == 2
    assert math.isclose(float(loss_sum), float(hand), rel_tol=1e-6)
    # the prompt tokens do not matter: changing the logits that predict them leaves the loss unchanged
    logits2 = logits.clone()
    logits2[0, 0:2] += 5.0
    assert math.isclose(float(token_ce_sum(logits2, labels)[0]), float(hand), rel_tol=1e-6)


def test_kl_zero_for_same_model_positive_for_other():
    vocab = 40
    model = build_tiny_model(TINY, vocab)
    same = freeze(build_tiny_model(TINY, vocab))
    other = freeze(build_tiny_model(TINY.model_copy(update={"seed": 1}), vocab))
    ids = torch.randint(2, vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(10).repeat(2, 1)
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    logits = model(input_ids=ids, position_ids=pos).logits
    kl_same, n = kl_to_reference_sum(logits, same(input_ids=ids, position_ids=pos).logits, labels)
    kl_other, _ = kl_to_reference_sum(logits, other(input_ids=ids, position_ids=pos).logits, labels)
    assert int(n) == 18
    assert abs(float(kl_same.detach())) < 1e-5
    assert float(kl_other.detach()) > 1e-3
    kl_other.backward()  # gradient flows into the trained model only
    assert model.lm_head.weight.grad is not None
    assert all(p.grad is None for p in other.parameters())


def test_tiny_model_is_deterministic_and_uncached(tmp_path):
    a, b = build_tiny_model(TINY, 40), build_tiny_model(TINY, 40)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert a.config.use_cache is False and a.get_input_embeddings().num_embeddings == 40
    a.save_pretrained(tmp_path)
    c = load_causal_lm(TINY, path=tmp_path, vocab_size=40)
    assert c.config.use_cache is False
    assert torch.equal(c.lm_head.weight, a.lm_head.weight)


def test_source_batches_cursor_resume_and_rank_split():
    rows = _rows(21)
    world, bs = 2, 4
    a = [SourceBatches(rows, rank=r, world=world, batch_size=bs, seed=3) for r in range(world)]
    first = [[a[r].next()["input_ids"] for _ in range(5)] for r in range(world)]
    # within epoch 0 (10 rows per rank) the ranks see disjoint rows
    seen0 = {tuple(x.tolist()) for b in first[0][:2] for x in b}
    seen1 = {tuple(x.tolist()) for b in first[1][:2] for x in b}
    assert seen0.isdisjoint(seen1)
    # every batch is full (no short batch at an epoch boundary)
    assert all(b.shape == (bs, 8) for r in first for b in r)
    # a fresh stream restored at cursor 3 continues with batches 3 and 4
    b = SourceBatches(rows, rank=0, world=world, batch_size=bs, seed=3)
    b.load_state_dict({"cursor": 3})
    assert torch.equal(b.next()["input_ids"], first[0][3])
    assert torch.equal(b.next()["input_ids"], first[0][4])
    # another seed gives another order
    c = SourceBatches(rows, rank=0, world=world, batch_size=bs, seed=4)
    assert not all(torch.equal(c.next()["input_ids"], x) for x in first[0][:3])


def test_eval_batches_equal_counts_and_padding_has_no_labels():
    rows = _rows(5)
    per_rank = [eval_batches(rows, rank=r, world=2, batch_size=2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    labelled = sum(int((b["labels"] != IGNORE_INDEX).sum()) for bs in per_rank for b in bs)
    assert labelled == 5 * 7  # every real row once, the padding row adds nothing
    assert int((per_rank[1][-1]["labels"] != IGNORE_INDEX).sum()) == 0


def test_full_labels_on_exam_rows():
    ids = np.array([[10, 11, 12, 13, 14, 15, 1, 1]], dtype=np.int32)
    pos = np.array([[0, 1, 2, 0, 1, 2, 3, 4]], dtype=np.int32)
    # answer-only labels: second segment's answer is tokens 14, 15
    labels = np.array([[-100, -100, 12, -100, 14, 15, -100, -100]], dtype=np.int32)
    full = full_labels(ids, pos, labels)
    assert full.tolist() == [[-100, 11, 12, -100, 14, 15, -100, -100]]


def test_too_few_rows_for_workers_is_an_input_error():
    from kcpt.errors import InputError

    with pytest.raises(InputError, match="fewer than the 2 workers"):
        SourceBatches(_rows(1), rank=0, world=2, batch_size=1, seed=0)


def test_run_report_stage_table_and_pareto(tmp_path):
    from kcpt.analysis.run_report import format_run_report, pareto_checkpoints
    from kcpt.train.rundir import RunDir

    rd = RunDir(tmp_path)
    ck = tmp_path / "checkpoints"
    recs = [
        {"stage": "stage3", "step": 0, "raw_val_loss": 5.0, "exam_val_loss": 4.0, "checkpoint": None},
        {"stage": "stage3", "step": 10, "raw_val_loss": 5.1, "exam_val_loss": 3.0, "checkpoint": str(ck / "a")},
        {"stage": "stage3", "step": 20, "raw_val_loss": 5.2, "exam_val_loss": 3.1, "checkpoint": str(ck / "b")},
        {"stage": "stage3", "step": 30, "raw_val_loss": 4.9, "exam_val_loss": 3.5, "checkpoint": str(ck / "c")},
        # another stage's front is its own, though stage3's points dominate it (one front over all stages hid it)
        {"stage": "stage2", "step": 10, "raw_val_loss": 5.3, "exam_val_loss": 3.6, "checkpoint": str(ck / "d")},
    ]
    for r in recs:
        rd.append_metrics(r)
    rd.write_summary({"stage_order": ["stage3"], "baseline_raw_best": 5.0, "stages": {"stage3": {
        "steps": 30, "stop_reason": "gate", "passed": True, "best_raw_val_loss": 5.1, "best_exam_val_loss": 3.0,
        "baseline_raw_best": 5.0, "gate_streak": 3, "rollbacks": 0}}})
    front = pareto_checkpoints(rd.read_metrics())
    # step 20 is dominated by 10; step 0 saved no checkpoint
    assert [(m["stage"], m["step"]) for m in front] == [("stage3", 10), ("stage3", 30), ("stage2", 10)]
    text = format_run_report(tmp_path)
    assert "gate" in text and "1.020" in text and "(pruned)" in text


def test_run_report_of_an_interrupted_run_shows_the_unfinished_stage_from_its_evals(tmp_path):
    """A run killed in its first stage has metrics but no summary: the report used to print an empty table."""
    from kcpt.analysis.run_report import format_run_report
    from kcpt.train.rundir import RunDir

    rd = RunDir(tmp_path)
    rd.write_summary({"stage_order": ["cpt", "stage1"], "stages": {"cpt": {
        "steps": 40, "stop_reason": "plateau", "passed": True, "best_raw_val_loss": 7.0, "baseline_raw_best": 7.0}}})
    for step, raw, exam in [(0, 7.0, 4.9), (10, 7.07, 4.1), (20, 7.14, 4.3)]:
        rd.append_metrics({"stage": "stage1", "step": step, "raw_val_loss": raw, "exam_val_loss": exam,
                           "gate_streak": 0, "rollbacks": 0})
    lines = format_run_report(tmp_path).splitlines()
    (row,) = [ln for ln in lines if ln.startswith("stage1")]
    assert row.split()[:8] == ["stage1", "20", "(unfinished)", "-", "7.0000", "7.0000", "4.9000", "4.1000"], row
    assert row.split()[10:12] == ["7.0000", "1.000"], row  # held to the CPT baseline, as the stage is
    assert ("note: stage 'stage1' has no summary: its last eval is at step 20. The run is still running, or it "
            "stopped there: the same command with --resume continues it.") in lines


def test_latest_checkpoint_follows_stage_order_then_step(tmp_path):
    from kcpt.train.launch import latest_checkpoint
    from kcpt.train.rundir import RunDir

    rd = RunDir(tmp_path)
    for name in ["00-cpt-step000040", "00-cpt-step000100", "01-stage3-step000010", "01-other-step000090",
                 ".01-stage3-step000020.tmp-1-abc", "notes"]:
        (rd.checkpoints / name).mkdir(parents=True)
    assert latest_checkpoint(rd, ["cpt", "stage3"]) == str(rd.checkpoints / "01-stage3-step000010")
    assert latest_checkpoint(rd, ["cpt"]) == str(rd.checkpoints / "00-cpt-step000100")
    assert latest_checkpoint(rd, ["stage3"]) is None  # position 0 of this plan is not 'cpt'
