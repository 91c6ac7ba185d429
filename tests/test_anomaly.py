"""Anomaly rule, rollback budget and the stable snapshot (bit-identical restore on a tiny Llama)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kcpt.config import AnomalyConfig, LRConfig
from kcpt.errors import TrainingAborted
from kcpt.train.anomaly import AnomalyDetector, StableSnapshot
from kcpt.train.schedule import lr_multiplier, make_scheduler, scale_base_lr

LR = LRConfig(peak=1e-2, warmup_steps=2)
CFG = AnomalyConfig(window=4, min_history=3, k_sigma=2.0, min_spike_ratio=1.0, max_rollbacks=2)


@pytest.mark.parametrize(("accepted", "loss", "norm", "expect"), [
    ([], float("nan"), 1.0, "loss is not finite"),
    ([], float("inf"), 1.0, "loss is not finite"),
    ([], 1.0, float("nan"), "grad norm is not finite"),
    ([], 1.0, float("inf"), "grad norm is not finite"),
    ([1.0, 1.0], 1.0, 1e9, None),                        # fewer than min_history: no spike rule yet
    ([1.0, 2.0, 3.0], 1.0, 3.63, None),                  # mean 2, std √(2/3)=0.8165 → limit 3.633
    ([1.0, 2.0, 3.0], 1.0, 3.64, "grad norm 3.64 >"),
    # window 4 keeps [1, 2, 3, 2] (limit 3.414); with the evicted 9.0 the limit would be 9.14
    ([9.0, 1.0, 2.0, 3.0, 2.0], 1.0, 3.5, "grad norm 3.5 >"),
])
def test_check_table(accepted, loss, norm, expect):
    det = AnomalyDetector(CFG)
    for g in accepted:
        det.accept(g)
    got = det.check(loss, norm)
    if expect is None:
        assert got is None
    else:
        assert got is not None and got.startswith(expect)


@pytest.mark.parametrize(("norm", "expect_spike"), [(2.05, False), (2.2, True)])
def test_relative_floor_spares_a_smooth_drifting_norm(norm: float, expect_spike: bool):
    # a slowly drifting, smooth norm: std tiny, so mean + 6·std ≈ 1.10 would flag a healthy 1.2 step;
    # the floor min_spike_ratio·mean (here 2 × 1.025) keeps it, and still catches a real spike
    det = AnomalyDetector(AnomalyConfig(window=8, min_history=3, k_sigma=6.0, min_spike_ratio=2.0))
    for g in [1.0, 1.01, 1.02, 1.03, 1.04, 1.05]:
        det.accept(g)
    assert det.check(1.0, 1.2) is None
    assert (det.check(1.0, norm) is not None) is expect_spike


def test_rejected_spike_does_not_enter_the_window():
    det = AnomalyDetector(CFG)
    for g in [1.0, 2.0, 3.0]:
        det.accept(g)
    assert det.check(1.0, 50.0) is not None      # the loop does not accept it
    assert det.threshold() == pytest.approx(2.0 + 2.0 * math.sqrt(2 / 3))
    assert det.check(1.0, 3.0) is None


def test_rollback_budget_then_clear_abort():
    det = AnomalyDetector(CFG)
    det.record_rollback("loss is not finite (nan)")
    det.record_rollback("grad norm 9 > 3")
    with pytest.raises(TrainingAborted, match=r"3 anomalies.*max_rollbacks = 2.*last: grad norm 9 > 3"):
        det.record_rollback()
    with pytest.raises(TrainingAborted):
        AnomalyDetector(AnomalyConfig(max_rollbacks=0)).record_rollback("x")


def test_detector_state_round_trips_with_weights_only():
    det = AnomalyDetector(CFG)
    for g in [1.0, 2.0, 3.0, 2.5, 1.5]:
        det.accept(g)
    det.record_rollback("r")
    buf = io.BytesIO()
    torch.save(det.state_dict(), buf)
    buf.seek(0)
    det2 = AnomalyDetector(CFG)
    det2.load_state_dict(torch.load(buf, weights_only=True))
    assert list(det2.norms) == [2.0, 3.0, 2.5, 1.5] and det2.rollbacks == 1
    assert det2.threshold() == det.threshold()
    assert det2.check(1.0, 4.0) == det.check(1.0, 4.0)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def _train(model, opt, sched, batches):
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_snapshot_restore_is_bit_identical_and_continues_identically():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(6)]
    model = _tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = make_scheduler(opt, 10, LR)
    _train(model, opt, sched, batches[:2])
    snap = StableSnapshot()
    assert not snap.captured
    snap.capture(model, opt, sched, step=2)
    at_capture = _params(model)
    _train(model, opt, sched, batches[2:4])
    after = _params(model)
    lr_after = opt.param_groups[0]["lr"]
    assert any(not torch.equal(at_capture[k], after[k]) for k in after)

    for _ in range(2):   # restoring twice works: training after a restore never alters the snapshot
        assert snap.restore(model, opt, sched) == 2
        restored = _params(model)
        assert all(torch.equal(at_capture[k], restored[k]) for k in restored)
        _train(model, opt, sched, batches[2:4])
        again = _params(model)
        assert all(torch.equal(after[k], again[k]) for k in again)
        assert opt.param_groups[0]["lr"] == lr_after

    # rollback + lower LR: restore, then scale; the lowered LR is what the next step uses
    snap.restore(model, opt, sched)
    scale_base_lr(sched, 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 1e-2 * lr_multiplier(2, 10, LR))


def test_restore_before_capture_is_an_error():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="no stable snapshot"):
        StableSnapshot().restore(model, opt, None)
