"""At most one device→host sync per optimizer step between evals (the anomaly rule's read of the step objective
and grad norm), counted by op on the CPU with :class:`kcpt.train.syncs.SyncCounter` over the real stage loop
(``bench/syncs_per_step.py``, in-process): grad_accum 2, raw micro-batches with KL to a reference, exam ones
without, a rollback point taken every 3 steps, for both loss paths and both CPU attention implementations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kcpt.train.syncs import SyncCounter

_spec = importlib.util.spec_from_file_location("bench_syncs", Path(__file__).parents[1] / "bench" / "syncs_per_step.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_counter_sees_the_usual_syncs():
    t = torch.arange(6.0)
    with SyncCounter() as c:
        float(t.sum())
        bool(t[0] == 0)
        t.tolist()
        t[t > 2].sum()
        t.nonzero()
    assert c.counts["_local_scalar_dense"] == 2 and c.counts["tolist"] == 1 and c.counts["index_bool_mask"] == 1
    assert c.counts["nonzero"] == 1 and c.total == 5
    with SyncCounter() as c:
        torch.where(t > 2, t, 0).sum() * 2     # stays on the device
    assert c.total == 0


@pytest.fixture(scope="module")
def prepared_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prepared")


@pytest.mark.parametrize("extra", [[], ["train.fused_loss=false"], ["model.attn_implementation=eager"]],
                         ids=["fused-sdpa", "logits-sdpa", "fused-eager"])
def test_at_most_one_sync_per_step(prepared_root, tmp_path, extra):
    recs = bench.per_step_syncs(prepared_root, tmp_path, steps=7, eval_every=4, grad_accum=2, extra=extra)
    assert [r["step"] for r in recs] == list(range(1, 8))
    worst = max(recs, key=lambda r: r["total"])
    assert worst["total"] <= 1, f"step {worst['step']}: {worst['kinds']}"
