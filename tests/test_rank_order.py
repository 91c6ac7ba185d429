"""A resume on another number of workers or micro-batch size reads the rest of the epoch once (kcpt.train.rank_order,
the ``stream`` and ``memory`` loaders): over the rows the old ranks read and the rows the new ranks read, no row of
the epoch twice and none left out but the fewer-than-``world`` the new split cannot share; the next epoch is whole;
at the same world size the resumed stream is the uninterrupted one, and the memory loader's global batches stay
the uninterrupted run's whenever a micro-batch holds as many rows over all workers."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from test_streams import ids, make_prepared, stream

from kcpt.errors import InputError
from kcpt.train.batches import PackedRows, SourceBatches
from kcpt.train.rank_order import RankOrder, ranges_length


def _read(orders: list[RankOrder], start: int, n: int) -> list[tuple[int, int]]:
    """``(epoch, g)`` of positions ``[start, start + n)`` of every rank."""
    return [o.locate(p) for o in orders for p in range(start, start + n)]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(("rows", "world", "read", "worlds"), [
    (203, 2, 37, [1]), (203, 2, 37, [3]), (200, 4, 11, [3, 1]), (150, 3, 0, [2]), (150, 3, 49, [5]),
    (97, 1, 20, [4, 2, 3])])
def test_rest_of_the_epoch_is_read_once_on_any_world(interleaved, rows, world, read, worlds):
    orders = [RankOrder(rows, rank=r, world=world, interleaved=interleaved) for r in range(world)]
    seen = _read(orders, 0, read)
    pos = read
    epoch, rest = orders[0].remaining(pos)
    assert all(o.remaining(pos) == (epoch, rest) for o in orders)  # every rank records the same
    for w in worlds:  # resume, read a part of the rest, resume again on another world…
        orders = [RankOrder(rows, rank=r, world=w, interleaved=interleaved) for r in range(w)]
        for o in orders:
            o.resume(pos, epoch, json.loads(json.dumps(rest)))  # as a checkpoint stores it
        share = ranges_length(rest) // w
        n = share // 2 if w != worlds[-1] else share
        seen += _read(orders, pos, n)
        pos += n
        epoch, rest = orders[0].remaining(pos)
    assert all(e == 0 for e, _ in seen)
    counts = Counter(g for _, g in seen)
    assert max(counts.values()) == 1  # no row twice
    left = world * (rows // world) - len(counts)
    assert 0 <= left < max(worlds) * len(worlds)  # only what a split could not share out
    assert set(counts) <= set(range(world * (rows // world)))  # nor a row the epoch had skipped
    nxt = _read(orders, pos, orders[0].per_rank)  # the next epoch, whole, at the new world size
    assert {e for e, _ in nxt} == {1} and len({g for _, g in nxt}) == len(nxt) == orders[0].per_rank * len(orders)


@pytest.mark.parametrize("interleaved", [False, True])
def test_same_world_resume_is_the_uninterrupted_stream(interleaved):
    straight = [RankOrder(101, rank=r, world=3, interleaved=interleaved) for r in range(3)]
    for pos in (0, 5, 33, 34, 50):
        epoch, rest = straight[0].remaining(pos)
        for r in range(3):
            o = RankOrder(101, rank=r, world=3, interleaved=interleaved)
            o.resume(pos, epoch, rest)
            assert [o.locate(p) for p in range(pos, pos + 80)] == [straight[r].locate(p) for p in range(pos, pos + 80)]


def test_ranges_of_another_dataset_are_refused():
    with pytest.raises(ValueError, match="do not name rows"):
        RankOrder(10, rank=0, world=1, interleaved=True).resume(0, 0, [[3, 12]])


@pytest.mark.parametrize(("world", "batch", "new_world", "new_batch"), [(2, 4, 1, 8), (2, 4, 1, 4), (2, 3, 3, 5)])
def test_stream_loader_resumed_on_another_layout_reads_each_row_once(tmp_path, world, batch, new_world, new_batch):
    ref = make_prepared(tmp_path / "d", 301, per_shard=50, row_group=7)
    old = [stream(ref, r, world, batch) for r in range(world)]
    seen = [x for s in old for x in ids(s, 9)]
    state = json.loads(json.dumps(old[0].state_dict()))
    assert all(s.state_dict() == old[0].state_dict() for s in old)
    new = [stream(ref, r, new_world, new_batch) for r in range(new_world)]
    for s in new:
        s.load_state_dict(state)
    share = (world * (301 // world) - world * 9 * batch) // new_world
    rest = [ids(s, -(-share // new_batch)) for s in new]
    seen += [x for r in rest for x in r[:share]]
    assert len(seen) == len(set(seen))  # no row twice in the epoch
    assert world * (301 // world) - len(seen) < new_world  # none left out but what 3 ranks could not share
    nxt = [x for r in rest for x in r[share:]] + [x for s in new for x in ids(s, 301 // new_world // new_batch)]
    assert len(nxt) > 0
    for s in old + new:
        s.close()


def test_memory_loader_keeps_the_global_batches_on_another_layout():
    n = 203
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], 8, axis=1)
    rows = PackedRows("raw", ids, np.tile(np.arange(8, dtype=np.int32), (n, 1)), ids.copy())
    straight = [SourceBatches(rows, rank=r, world=2, batch_size=4, seed=5) for r in range(2)]
    glob = [sorted(int(x) for s in straight for x in s.next()["input_ids"][:, 0]) for _ in range(40)]
    old = [SourceBatches(rows, rank=r, world=2, batch_size=4, seed=5) for r in range(2)]
    for _ in range(7):
        for s in old:
            s.next()
    state = json.loads(json.dumps(old[0].state_dict()))
    one = SourceBatches(rows, rank=0, world=1, batch_size=8, seed=5)  # a node lost, its rows in the micro-batch
    one.load_state_dict(state)
    assert [sorted(int(x) for x in one.next()["input_ids"][:, 0]) for _ in range(5)] == glob[7:12]
    accum = SourceBatches(rows, rank=0, world=1, batch_size=4, seed=5)  # …or in grad_accum: the same rows in turn
    accum.load_state_dict(state)
    got = [int(x) for _ in range(10) for x in accum.next()["input_ids"][:, 0]]
    assert sorted(got) == sorted(x for b in glob[7:12] for x in b)
    with pytest.raises(InputError, match="does not fit this dataset of 50 rows"):
        SourceBatches(PackedRows("raw", ids[:50], ids[:50], ids[:50]), rank=0, world=1, batch_size=4,
                      seed=5).load_state_dict(state)
