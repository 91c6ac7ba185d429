"""The streaming loader (kcpt.train.streams) on synthetic prepared shards whose rows carry their own id: every
rank holds the same number of rows per epoch and the ranks' rows are disjoint; the order is a pure function of
the seed (run to run), differs per epoch, and a loader restored from ``state_dict`` continues with exactly the
batches of the uninterrupted one; a source that runs out starts its next epoch inside a batch; only a bounded
window is held and a rank reads only the blocks of its part; the same rows stream from an s3:// URI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kcpt.errors import InputError
from kcpt.train.streams import ShardReader, StreamBatches

T = 8


def make_prepared(d: Path, rows: int, *, per_shard: int = 40, row_group: int = 7) -> Path:
    """``rows`` rows: input_ids[i] = [i, i, ...], written in shards of ``per_shard`` rows, row groups of
    ``row_group`` rows, with a manifest listing the shards."""
    d.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, lo in enumerate(range(0, rows, per_shard)):
        ids = np.repeat(np.arange(lo, min(rows, lo + per_shard), dtype=np.int32)[:, None], T, axis=1)
        pos = np.tile(np.arange(T, dtype=np.int32), (len(ids), 1))

        def col(a: np.ndarray) -> pa.Array:
            return pa.ListArray.from_arrays(pa.array(np.arange(0, a.size + 1, T, dtype=np.int32)), pa.array(a.ravel()))

        name = f"part-{k:05d}.parquet"
        pq.write_table(pa.table({"input_ids": col(ids), "position_ids": col(pos), "labels": col(ids)}), d / name,
                       row_group_size=row_group)
        shards.append(name)
    (d / "manifest.json").write_text(json.dumps({"shards": shards, "rows": rows}))
    return d


def stream(ref, rank=0, world=1, batch=4, seed=0, window=10, name="raw") -> StreamBatches:
    return StreamBatches(ShardReader(str(ref), seq_len=T, name=name), rank=rank, world=world, batch_size=batch,
                         seed=seed, window_rows=window)


def ids(s: StreamBatches, n: int) -> list[int]:
    return [int(x) for _ in range(n) for x in s.next()["input_ids"][:, 0]]


def test_ranks_hold_equal_disjoint_parts_and_each_epoch_is_a_new_order(tmp_path):
    ref = make_prepared(tmp_path / "d", 203)
    world, batch = 3, 3
    per_rank = 203 // world  # 67 rows per rank per epoch; 2 rows of the epoch left out
    seen = []
    for r in range(world):
        s = stream(ref, r, world, batch)
        assert s.per_rank == per_rank
        got = ids(s, 2 * per_rank // batch + 1)  # two epochs and a bit
        seen.append(got)
        assert len(set(got[:per_rank])) == per_rank  # no row twice within an epoch
        assert got[:per_rank] != got[per_rank:2 * per_rank]  # epoch 1: a new order
        s.close()
    ep0 = [set(g[:per_rank]) for g in seen]
    assert all(not (ep0[a] & ep0[b]) for a in range(world) for b in range(a + 1, world))
    assert len(set().union(*ep0)) == world * per_rank


def test_order_is_seeded_and_a_restored_cursor_continues_exactly(tmp_path):
    ref = make_prepared(tmp_path / "d", 150)
    a, b = stream(ref, 1, 2, seed=7), stream(ref, 1, 2, seed=7)
    straight = ids(a, 60)  # 240 rows: more than three epochs of 75
    assert ids(b, 60) == straight  # run to run
    assert ids(stream(ref, 1, 2, seed=8), 60) != straight  # another seed, another order
    first = stream(ref, 1, 2, seed=7)
    ids(first, 23)
    state = first.state_dict()
    # epoch 1, 92 - 75 = 17 rows of each rank's part read: the rest of both parts is left
    assert state == {"cursor": 23, "epoch": 1, "remaining": [[17, 75], [92, 150]], "batch_size": 4, "world": 2}
    resumed = stream(ref, 1, 2, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as the checkpoint stores it
    assert ids(resumed, 37) == straight[23 * 4:]
    legacy = {"cursor": 23, "epoch": 1, "rows": 17, "batch_size": 4}  # a checkpoint of kcpt before `remaining`
    old = stream(ref, 1, 2, seed=7)
    old.load_state_dict(legacy)
    assert ids(old, 37) == straight[23 * 4:]
    with pytest.raises(InputError, match="micro_batch_size"):
        stream(ref, 1, 2, batch=8).load_state_dict(legacy)
    for s in (a, b, first, resumed, old):
        s.close()


def test_small_source_runs_out_and_continues_inside_a_batch(tmp_path):
    ref = make_prepared(tmp_path / "d", 10, per_shard=10, row_group=10)
    s = stream(ref, batch=4)
    got = ids(s, 5)  # 20 rows = exactly two epochs of 10, the 3rd batch spans both
    assert sorted(got[:10]) == list(range(10)) and sorted(got[10:]) == list(range(10))
    assert got[:10] != got[10:]
    assert s.epoch == 2.0
    s.close()


class CountingReader(ShardReader):
    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.read_blocks: list[tuple[int, int]] = []

    def read(self, block):
        self.read_blocks.append((block.file, block.row_group))
        return super().read(block)


def test_memory_is_a_bounded_window_and_a_rank_reads_only_its_part(tmp_path):
    ref = make_prepared(tmp_path / "d", 700, per_shard=100, row_group=10)  # 70 blocks of 10 rows
    reader = CountingReader(str(ref), seq_len=T, name="raw")
    s = StreamBatches(reader, rank=0, world=2, batch_size=5, seed=1, window_rows=20, prefetch=False)
    held = 0
    for _ in range(70):  # one epoch of rank 0 (350 rows)
        s.next()
        held = max(held, sum(w[0].shape[0] for w in s._windows.values()))
    assert held <= 2 * 20  # two windows of 20 rows (whole 10-row blocks), never the corpus
    # its half of the epoch is 17.5 windows of 2 blocks: 18 windows (the boundary one is read by both ranks)
    assert len(reader.read_blocks) == 36 and len(set(reader.read_blocks)) == 36
    s.close()


def test_prefetch_does_not_change_the_batches(tmp_path):
    ref = make_prepared(tmp_path / "d", 300, per_shard=50, row_group=5)
    a = StreamBatches(ShardReader(str(ref), seq_len=T, name="x"), rank=0, world=1, batch_size=6, seed=3,
                      window_rows=15, prefetch=True)
    b = StreamBatches(ShardReader(str(ref), seq_len=T, name="x"), rank=0, world=1, batch_size=6, seed=3,
                      window_rows=15, prefetch=False)
    assert ids(a, 120) == ids(b, 120)
    a.close()


def test_streams_straight_from_an_s3_uri(s3_prefix, tmp_path):
    from kcpt.storage import Store

    ref = make_prepared(tmp_path / "d", 120, per_shard=30, row_group=6)
    Store(s3_prefix).upload_tree(ref, "prep")
    uri = f"{s3_prefix}/prep"
    assert ids(stream(uri, 1, 2, seed=5), 40) == ids(stream(ref, 1, 2, seed=5), 40)
    head = ShardReader(uri, seq_len=T, name="v").head(13)
    assert head.input_ids[:, 0].tolist() == list(range(13))
    with pytest.raises(InputError, match="no manifest.json"):
        ShardReader(f"{s3_prefix}/absent", seq_len=T, name="v")


def test_memory_loader_maps_one_decoded_copy_per_node(tmp_path, monkeypatch):
    """The ``memory`` loader decodes a dataset once into node scratch (.npy) and memory-maps it: a second
    reader (another rank) maps the same files, read-only, with the same rows as a plain decode."""
    from kcpt.train.batches import load_packed_rows, mapped_packed_rows

    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch"))
    ref = make_prepared(tmp_path / "d", 50, per_shard=20, row_group=5)
    a, b = mapped_packed_rows(ref, "x", T), mapped_packed_rows(ref, "x", T)
    plain = load_packed_rows(ref, "x", T)
    assert isinstance(a.input_ids, np.memmap) and a.input_ids.filename == b.input_ids.filename
    assert not a.labels.flags.writeable
    for c in ("input_ids", "position_ids", "labels"):
        assert np.array_equal(getattr(a, c), getattr(plain, c))


def test_stream_loader_fetches_only_manifest_and_tokenizer_from_a_uri(s3_prefix, tmp_path, monkeypatch):
    from kcpt.data.shards import fetch_prepared
    from kcpt.storage import Store

    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch"))
    ref = make_prepared(tmp_path / "d", 30, per_shard=10, row_group=5)
    (ref / "tokenizer").mkdir()
    (ref / "tokenizer" / "tokenizer.json").write_text("{}")
    Store(s3_prefix).upload_tree(ref, "prep", last=("manifest.json",))
    meta = fetch_prepared(f"{s3_prefix}/prep", shards=False)
    assert (meta / "manifest.json").is_file() and (meta / "tokenizer" / "tokenizer.json").is_file()
    assert not list(meta.glob("*.parquet"))
    full = fetch_prepared(f"{s3_prefix}/prep")  # the memory loader's copy: a separate, complete mirror
    assert full != meta and len(list(full.glob("*.parquet"))) == 3


def test_the_data_table_reads_a_prepared_dataset_at_a_uri_without_downloading_its_shards(s3_prefix, tmp_path,
                                                                                       monkeypatch):
    """The driver's data table (every run and tune job prints it) downloaded each dataset's shards into the driver's
    scratch — the whole corpus, onto a head node — to read its manifest."""
    from kcpt.data.report import load_reports
    from kcpt.storage import Store

    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch"))
    ref = make_prepared(tmp_path / "d", 30, per_shard=10, row_group=5)
    Store(s3_prefix).upload_tree(ref, "prep", last=("manifest.json",))
    (report,) = load_reports({"d": f"{s3_prefix}/prep"})
    assert report.manifest == json.loads((ref / "manifest.json").read_text())
    assert list((tmp_path / "scratch").rglob("manifest.json")) and not list((tmp_path / "scratch").rglob("*.parquet"))
