"""The Ray Data loader (kcpt.train.ray_stream) on real Ray Data, with synthetic prepared shards whose rows carry
their own id. Each "rank" is a thread reading its split of ``streaming_split(world, equal=True)`` — the split
Ray Train's ``DataConfig`` hands the workers — concurrently, as training ranks do. Checked: every rank holds the
same number of rows per epoch and the ranks' rows are disjoint; each epoch comes in a new order; the sequence is
the same run to run; a loader restored from ``state_dict`` (after any number of batches, also inside an epoch and
across the execution boundary) continues with exactly the uninterrupted batches; a small source is materialized,
repeated, and wraps inside a batch; a checkpoint of another loader is refused."""

from __future__ import annotations

import gc
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_streams import make_prepared

from kcpt.errors import InputError
from kcpt.train.ray_stream import RayDataBatches, data_config, execution_rows, source_dataset

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield
    gc.collect()  # iterators and split coordinators of the tests go before the Ray they belong to
    ray.shutdown()


def splits(ref, world, *, seed=0, materialize_rows=0, micro_batches=None):
    ds = source_dataset("raw", str(ref), seed=seed, materialize_rows=materialize_rows, read_cpus=0.25)
    # exactly what Ray Train does with the trainer's datasets: DataConfig.configure → per-worker DataIterators
    per_worker = data_config(["raw"], micro_batches).configure({"raw": ds}, world_size=world, worker_handles=None,
                                                               worker_node_ids=None)
    return [w["raw"] for w in per_worker]


def read(ref, world, batches, *, seed=0, batch=4, shuffle=16, materialize_rows=0, rows=None, state=None):
    """Every rank's ids over ``batches`` micro-batches (ranks read concurrently); the loaders' last states."""
    its = splits(ref, world, seed=seed, materialize_rows=materialize_rows)

    def rank(r):
        b = RayDataBatches(its[r], name="raw", rank=r, world=world, batch_size=batch, seed=seed,
                           shuffle_rows=shuffle, source_rows=rows or 1)
        if state is not None:
            b.load_state_dict(json.loads(json.dumps(state[r])))
        got = [int(x) for _ in range(batches) for x in b.next()["input_ids"][:, 0]]
        st = b.state_dict()
        for _ in b._it or ():  # read the epoch to its end: no Ray Data prefetch thread outlives the test's Ray
            pass
        b.close()
        return got, st

    with ThreadPoolExecutor(world) as pool:
        out = list(pool.map(rank, range(world)))
    return [o[0] for o in out], [o[1] for o in out]


def test_equal_disjoint_parts_new_order_each_epoch_and_same_run_to_run(ray_local, tmp_path):
    ref = make_prepared(tmp_path / "d", 203, per_shard=40, row_group=7)
    world, batch = 2, 4
    per_rank = 203 // world  # equal=True: 101 rows each, the odd row left out of the epoch
    got, states = read(ref, world, 51, batch=batch, rows=203)  # 204 rows per rank: two epochs and 2 rows
    for g in got:
        assert len(set(g[:per_rank])) == per_rank  # no row twice within an epoch
        assert g[:per_rank] != g[per_rank:2 * per_rank]  # epoch 1: a new order
        assert set(g[:per_rank]) == set(g[per_rank:2 * per_rank])  # ... of the same split
    assert not set(got[0][:per_rank]) & set(got[1][:per_rank])
    assert [s["epoch"] for s in states] == [2, 2] and [s["rows"] for s in states] == [2, 2]
    again, _ = read(ref, world, 51, batch=batch, rows=203)
    assert again == got  # run to run
    other, _ = read(ref, world, 51, batch=batch, rows=203, seed=1)
    assert other != got  # another seed, another order


def test_a_restored_state_continues_exactly(ray_local, tmp_path):
    """Cut after 25 batches (100 of epoch 0's 101 rows handed out: the next batch spans epochs 0 and 1) and after
    26 (3 rows into epoch 1): the resumed loaders skip what was handed out and continue with the same rows."""
    ref = make_prepared(tmp_path / "d", 203, per_shard=40, row_group=7)
    straight, _ = read(ref, 2, 40, rows=203)
    for cut, (epoch, rows) in ((25, (0, 100)), (26, (1, 3))):
        _, states = read(ref, 2, cut, rows=203)
        assert [(s["epoch"], s["rows"]) for s in states] == [(epoch, rows)] * 2
        resumed, _ = read(ref, 2, 40 - cut, rows=203, state=states)
        assert resumed == [s[cut * 4:] for s in straight], cut


def test_a_small_source_is_materialized_repeated_and_wraps_inside_a_batch(ray_local, tmp_path):
    ref = make_prepared(tmp_path / "d", 10, per_shard=10, row_group=10)
    n_exec = execution_rows(10, materialize_rows=100)
    assert n_exec == 4100  # repeated to at least MIN_ROWS_PER_EXECUTION rows
    per_rank = n_exec // 2
    batches = per_rank // 3 + 2  # crosses into the second execution inside a batch (2050 = 683·3 + 1)
    got, states = read(ref, 2, batches, batch=3, materialize_rows=100, rows=10)
    assert states[0]["epoch"] == 1 and states[0]["rows"] == batches * 3 - per_rank
    for g in got:
        assert set(g) <= set(range(10))
    # over one execution the two ranks together see every row exactly as often as it was repeated
    from collections import Counter

    counts = Counter(got[0][:per_rank] + got[1][:per_rank])
    assert sorted(counts) == list(range(10)) and set(counts.values()) == {410}


def test_an_elastic_worlds_spare_rank_gets_no_split_and_the_readers_share_every_row(ray_local, tmp_path):
    """An elastic run's step of 4 micro-batches on 3 workers: 2 read (4 divides over 2, not 3) and split the
    epoch between them; the spare rank gets no iterator (it runs padding micro-batches), so no part goes unread."""
    ref = make_prepared(tmp_path / "d", 41, per_shard=10, row_group=5)
    its = splits(ref, 3, micro_batches=4)
    assert its[2] is None and its[0] is not None and its[1] is not None

    def ids(r):
        b = RayDataBatches(its[r], name="raw", rank=r, world=2, batch_size=4, seed=0, shuffle_rows=8, source_rows=41)
        got = [int(x) for _ in range(5) for x in b.next()["input_ids"][:, 0]]  # 20 rows: one reader's epoch
        b.close()
        return got

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(ids, range(2))
    assert len(set(a)) == len(set(b)) == 20 and not set(a) & set(b)  # 41 // 2 each, disjoint: 40 of 41 rows read
    assert [it is None for it in splits(ref, 3, micro_batches=3)] == [False, False, False]  # 3 divide over 3


def test_a_read_starved_of_cpus_is_told_and_goes_on_when_they_free_up(ray_local, tmp_path):
    """Training workers that hold every CPU leave Ray Data's read tasks none: the worker waits for good, and before
    this nothing said why (Ray Data's starvation warning is in its own log). Here an actor holds both CPUs; the
    reader tells ``on_stall`` what to do after ``stall_s``, and reads on once the CPUs are free."""
    import threading

    ref = make_prepared(tmp_path / "d", 40)
    hog = ray.remote(num_cpus=2)(type("Hog", (), {"ping": lambda self: 1})).remote()
    ray.get(hog.ping.remote())
    told: list[str] = []
    its = splits(ref, 1)  # materialize_rows 0: read by Ray Data tasks as the training reads
    b = RayDataBatches(its[0], name="raw", rank=0, world=1, batch_size=4, seed=0, shuffle_rows=8, source_rows=40,
                       on_stall=told.append, stall_s=2)
    got: list = []
    reader = threading.Thread(target=lambda: got.append(b.next()), daemon=True)
    reader.start()
    for _ in range(300):
        if told:
            break
        time.sleep(0.1)
    assert not got and len(told) == 1, told
    assert told[0].startswith("source 'raw': no rows from Ray Data for 2 s (worker 0).") and \
        "leave a CPU or more of the cluster free of training workers" in told[0]
    ray.kill(hog)
    reader.join(timeout=120)
    assert got and got[0]["input_ids"].shape[0] == 4 and len(told) == 1  # read on, told once
    b.next()  # a read that flows says nothing
    assert len(told) == 1
    b.close()


def test_refuses_another_loaders_state_and_another_batch_size(ray_local, tmp_path):
    ref = make_prepared(tmp_path / "d", 40)
    its = splits(ref, 1)
    b = RayDataBatches(its[0], name="raw", rank=0, world=1, batch_size=4, seed=0, shuffle_rows=8, source_rows=40)
    with pytest.raises(InputError, match="loader"):
        b.load_state_dict({"cursor": 3, "epoch": 0, "rows": 12, "batch_size": 4})  # a stream-loader state
    with pytest.raises(InputError, match="micro_batch_size"):
        b.load_state_dict({"loader": "ray_data", "cursor": 3, "epoch": 0, "rows": 24, "batch_size": 8})
