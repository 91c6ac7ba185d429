"""How an elastic run lays each step's micro-batches over the world Ray Train gives it (kcpt.train.layout), and
the config rules around ``train.min_workers``. The run itself (a node lost mid-run, ZeRO-2, metrics equal to the
one-worker run) is tested in test_cluster_s3.py."""

from __future__ import annotations

import pytest
import torch

from kcpt.config import load_config
from kcpt.errors import ConfigError
from kcpt.train.layout import PaddingBatches, step_layout


def elastic(num_workers: int, grad_accum: int = 1, min_workers: int = 1):
    return load_config(None, [f"train.num_workers={num_workers}", f"train.grad_accum={grad_accum}",
                              f"train.min_workers={min_workers}"])


@pytest.mark.parametrize(("num_workers", "grad_accum", "world", "active", "accum"), [
    (8, 1, 8, 8, 1),  # as configured
    (8, 1, 4, 4, 2),  # half the workers: twice the accumulation
    (8, 1, 7, 4, 2),  # 8 micro-batches do not divide over 7: 4 read, 3 run padding
    (8, 1, 5, 4, 2),
    (8, 1, 3, 2, 4),
    (8, 3, 5, 4, 6),  # 24 micro-batches: 5 → 4 × 6
    (8, 3, 7, 6, 4),
    (3, 1, 2, 1, 3),  # the cluster test's: 3 micro-batches on 2 workers, 1 spare
    (4, 2, 1, 1, 8),
])
def test_every_world_keeps_the_configured_micro_batches_per_step(num_workers, grad_accum, world, active, accum):
    lay = step_layout(elastic(num_workers, grad_accum), world)
    assert (lay.world, lay.active, lay.grad_accum) == (world, active, accum)
    assert lay.micro_batches == num_workers * grad_accum
    assert [lay.reads(r) for r in range(world)] == [r < active for r in range(world)]


def test_a_fixed_size_run_trains_as_configured_at_any_world():
    cfg = load_config(None, ["train.num_workers=4", "train.grad_accum=2"])
    assert [(step_layout(cfg, w).active, step_layout(cfg, w).grad_accum) for w in (1, 3, 4)] == [(1, 2), (3, 2),
                                                                                                  (4, 2)]


def test_the_console_line_names_the_spare_workers():
    assert step_layout(elastic(3), 2).describe(3) == (
        "elastic: 2 of 3 workers; each step's 3 micro-batches as 1 reading worker × 3, 1 worker running padding "
        "micro-batches (weightless: 3 do not divide over 2)")
    assert step_layout(elastic(8), 4).describe(8) == "elastic: 4 of 8 workers; each step's 8 micro-batches as 4 " \
                                                     "reading workers × 2"


def test_padding_micro_batches_have_no_target():
    pad = PaddingBatches("raw_train", batch_size=2, seq_len=5, device="cpu")
    b = pad.next()
    assert b["input_ids"].shape == b["position_ids"].shape == b["labels"].shape == (2, 5)
    assert bool((b["labels"] == -100).all()) and b["position_ids"][1].tolist() == [0, 1, 2, 3, 4]
    # the keys of a real micro-batch: varlen flash attention on a spare rank needs the documents' boundaries
    from kcpt.model.attention import packed_kwargs

    flash = packed_kwargs("flash_attention_2", b)
    assert flash["cu_seq_lens_q"].tolist() == [0, 5, 10] and flash["max_length_q"] == 5
    pad.load_state_dict(pad.state_dict())  # nothing to restore
    from kcpt.train.losses import token_ce_sum

    logits = torch.randn(2, 5, 7, requires_grad=True)
    ce, n = token_ce_sum(logits, b["labels"])
    ce.backward()
    assert float(n) == 0 and float(ce.detach()) == 0 and bool((logits.grad == 0).all())


def test_min_workers_is_checked_and_changes_no_training_hash():
    with pytest.raises(ConfigError, match=r"train.min_workers: 3 is more than train.num_workers \(2\)"):
        load_config(None, ["train.num_workers=2", "train.min_workers=3"])
    fixed = load_config(None, [])
    # how many workers a run may shrink to changes no trained weight (a resume may change it), and the hashes of
    # configs written before the key existed stay as they were
    assert elastic(2).training_sha256() == fixed.training_sha256()
    assert "min_workers" not in fixed._hashed_dump()["train"]
