"""No silent destruction: a run name that already has results is continued (``--resume``) or replaced
(``--overwrite``) only when asked; otherwise the run is refused (exit 2, one line naming both flags) and nothing in
the run directory changes. A run directory without results yet is simply started over."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kcpt.config import load_config
from kcpt.errors import InputError
from kcpt.train.launch import run_plan
from kcpt.train.rundir import RunDir, read_metrics

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "data.seq_len=64", "logging.progress=false", "logging.tensorboard=false", "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1", "model.tiny.num_heads=2", "model.tiny.intermediate_size=64",
    "train.micro_batch_size=4", "train.eval_batch_size=16", "train.max_eval_rows=16", "train.num_workers=1",
    "tune.stage=s", "train.run_name=r",
    "plan=[{name: s, sets_baseline: true, sources: {raw_train: 1.0}, max_steps: 2, eval_every: 2,"
    " stop: {rule: max_steps}}]",
]


def _cfg(tmp_path: Path, *extra: str):
    return load_config(None, [*BASE, f"data.prepared_root={tmp_path / 'prepared'}",
                              f"train.output_dir={tmp_path / 'runs'}", *extra])


def test_has_results(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "r")
    assert not rd.has_results()
    rd.create(load_config())  # marker + config.yaml + empty checkpoints/: a run that died before any result
    (rd.checkpoints / ".0-cpt-step2.tmp-x").mkdir()  # a half-written checkpoint is not a result
    rd.ray_storage.mkdir()
    assert not rd.has_results()
    rd.refuse_existing()
    rd.append_metrics({"stage": "cpt", "step": 0})
    assert rd.has_results()
    rd.metrics_path.unlink()
    (rd.checkpoints / "0-cpt-step2").mkdir()
    assert rd.has_results()
    with pytest.raises(InputError, match=r"--resume .*--overwrite"):
        rd.refuse_existing()


def test_rerun_refuses_and_only_overwrite_replaces(tmp_path: Path) -> None:
    first = run_plan(_cfg(tmp_path), resume="never", in_process=True)
    before = read_metrics(first.run_dir)
    ckpts = sorted(p.name for p in (first.run_dir / "checkpoints").iterdir())
    assert before and ckpts
    with pytest.raises(InputError) as err:
        run_plan(_cfg(tmp_path), resume="never", in_process=True)
    msg = str(err.value)
    assert "\n" not in msg and "--resume" in msg and "--overwrite" in msg and str(first.run_dir) in msg
    assert read_metrics(first.run_dir) == before  # untouched
    assert sorted(p.name for p in (first.run_dir / "checkpoints").iterdir()) == ckpts
    (first.run_dir / "checkpoints" / ckpts[0] / "sentinel").write_text("old")
    again = run_plan(_cfg(tmp_path), resume="overwrite", in_process=True)
    assert again.run_dir == first.run_dir
    assert not (first.run_dir / "checkpoints" / ckpts[0] / "sentinel").exists()  # replaced, on request
    assert [r["step"] for r in read_metrics(again.run_dir)] == [r["step"] for r in before]


def test_run_dir_without_results_starts_over(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    rd = RunDir(tmp_path / "runs" / "r").create(cfg)  # what a run that failed before its first eval leaves
    (rd.root / "aborted.json").write_text('{"message": "old"}')
    res = run_plan(cfg, resume="never", in_process=True)
    assert res.summaries["s"]["steps"] == 2 and not (rd.root / "aborted.json").exists()


def _results_dir(tmp_path: Path) -> RunDir:
    rd = RunDir(tmp_path / "runs" / "r").create(_cfg(tmp_path))
    (rd.checkpoints / "0-s-step000002").mkdir()
    rd.append_metrics({"stage": "s", "step": 2})
    return rd


@pytest.mark.parametrize("cmd", [["jobs/cpt.py"], ["jobs/train_stages.py"], ["-m", "kcpt.cli", "train"]])
def test_entry_points_refuse_an_existing_run_in_one_line(tmp_path: Path, cmd: list[str]) -> None:
    rd = _results_dir(tmp_path)
    sets = [a for o in BASE for a in ("--set", o)]
    roots = ["--set", f"train.output_dir={tmp_path / 'runs'}", "--set", f"data.prepared_root={tmp_path / 'p'}"]
    res = subprocess.run([sys.executable, *cmd, *sets, *roots], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0] and "--overwrite" in lines[0], res.stderr
    assert (rd.checkpoints / "0-s-step000002").is_dir() and read_metrics(rd.root) == [{"stage": "s", "step": 2}]
    both = subprocess.run([sys.executable, *cmd, "--resume", "--overwrite"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert both.returncode == 2 and "not allowed with" in both.stderr


def _holder(run_dir: Path | str, seconds: float, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Another process holding ``run_dir`` (:meth:`RunDir.in_use`) for ``seconds``; prints "held" once it does, and
    touches ``<run_dir>.released`` just before it lets go."""
    code = ("import sys, time; from pathlib import Path; from kcpt.train.rundir import RunDir\n"
            "with RunDir(sys.argv[1]).in_use():\n"
            "    print('held', flush=True); time.sleep(float(sys.argv[2]))\n"
            "    p = Path(sys.argv[1] + '.released'); p.parent.mkdir(parents=True, exist_ok=True); p.touch()\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir), str(seconds)], stdout=subprocess.PIPE, text=True,
                         env=None if env is None else {**os.environ, **env})
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_run_directory_in_use_by_another_run_is_refused_or_waited_for(tmp_path):
    """Two runs into one local run directory interleaved their metrics and lost checkpoints (two tunes of one
    config trained the same prerequisites): a second run is refused naming the first's pid, before anything is
    written; the tune's prerequisites wait for the first and then reuse its results."""
    cfg = _cfg(tmp_path)
    rd = tmp_path / "runs" / "r"
    holder = _holder(rd, 60)
    try:
        with pytest.raises(InputError, match=rf"in use by another kcpt run \(pid {holder.pid}\).*another run name"):
            run_plan(cfg, in_process=True)
        assert not rd.exists()                       # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    holder = _holder(rd, 1.5)
    said: list[str] = []
    with RunDir(rd).in_use(wait=True, on_wait=said.append):
        assert Path(f"{rd}.released").is_file()      # got it once the other process let go
    holder.wait()
    assert len(said) == 1 and "waiting for it to end" in said[0]
    with RunDir(rd).in_use(), RunDir(rd).in_use():   # re-entrant in one process
        pass


def test_a_run_directory_at_a_uri_is_held_across_machines(s3_prefix, tmp_path, monkeypatch, caplog):
    """An --overwrite ran under a live run at the same S3 run directory and deleted its records; two drivers on two
    machines could write one run. A URI run directory is held by a lease object in the bucket (kcpt.lease): a
    driver whose local lock files are elsewhere (another machine's temp dir) is refused naming the holder, while the
    holder's heartbeat keeps the lease fresh past its time to live; the lease of a process that is gone is taken
    over (here: killed on this host, or silent on another host for longer than its ttl); a clean end deletes it."""
    import json
    import logging

    from kcpt.lease import LEASE, read_holder
    from kcpt.storage import Store

    uri = f"{s3_prefix}/runs/r"
    store = Store(uri)
    (tmp_path / "machine-b").mkdir()
    holder = _holder(uri, 60, env={"TMPDIR": str(tmp_path / "machine-b"), "KCPT_LEASE_TTL_S": "2"})
    try:
        time.sleep(3)  # more than the holder's ttl of 2 s: only its heartbeat keeps the lease
        with pytest.raises(InputError, match=rf"{uri}: in use by another kcpt run \(pid {holder.pid} on .*, last "
                                             r"heartbeat \d+ s ago\).*another run name"):
            with RunDir(uri).in_use():
                pass
        assert read_holder(store).age_s <= 1  # the store's modification times count whole seconds
    finally:
        holder.kill()  # SIGKILL: no clean end, the lease stays behind
        holder.wait()
    assert read_holder(store).pid == holder.pid
    with caplog.at_level(logging.WARNING, logger="kcpt.lease"), RunDir(uri).in_use():  # its pid is gone on this host
        assert read_holder(store).pid == os.getpid()
    assert f"took over the lease of a kcpt run that is gone (pid {holder.pid}" in caplog.text
    assert not store.is_file(LEASE)  # a clean end removes it
    store.write_text(LEASE, json.dumps({"host": "node-b", "pid": 1, "token": "t", "ttl_s": 1.0}))  # another host
    with pytest.raises(InputError, match=r"pid 1 on node-b"):
        with RunDir(uri).in_use():
            pass
    time.sleep(2.2)  # no heartbeat for longer than its ttl (in whole seconds of the store's clock): gone
    with RunDir(uri).in_use():
        assert read_holder(store).pid == os.getpid()
    assert RunDir(uri).check_owned() is None  # the lease alone does not make the directory someone else's


@pytest.mark.parametrize("conditional", [True, False], ids=["s3-conditional-writes", "plain-writes"])
def test_two_drivers_that_both_read_the_lease_absent_cannot_both_take_it(s3_prefix, monkeypatch, conditional):
    """Driver A reads the lease absent, then stalls for 1 s before its write; meanwhile driver B reads it absent,
    writes it and holds it. Plain writes (GCS; an S3 server without preconditions): A's write then lands over B's
    and A holds it too — two drivers write one run (the race the settle read-back cannot see). S3's conditional
    write (``If-None-Match: *``) refuses A's: A reads again and is refused, naming B's lease. And a replace of a
    stale lease (``If-Match`` its ETag) or a heartbeat loses to a write that came between."""
    import json
    import threading

    from kcpt import lease
    from kcpt.storage import Store

    store = Store(f"{s3_prefix}/runs/r")
    if not conditional:
        monkeypatch.setattr(lease.Conditional, "of", classmethod(lambda cls, store: None))
    read = lease.read_holder

    def stalled_read(*args, **kwargs):
        got = read(*args, **kwargs)
        if threading.current_thread().name == "driver-a" and not stalled.is_set():
            stalled.set()
            time.sleep(1.5)  # A's view (absent) is out of date when it writes
        return got

    stalled = threading.Event()
    monkeypatch.setattr(lease, "read_holder", stalled_read)
    outcome: list[object] = []

    def driver_a() -> None:
        try:
            with lease.bucket_lease(store):
                outcome.append("held")
        except lease.LeaseHeld as e:
            outcome.append(e)

    a = threading.Thread(target=driver_a, name="driver-a")
    a.start()
    assert stalled.wait(5)  # A has read the lease absent
    with lease.bucket_lease(store):  # B reads it absent too, writes it and holds it while A stalls
        pass_b = read(store, aged=False).token
        a.join(10)
        if conditional:
            assert isinstance(outcome[0], lease.LeaseHeld) and outcome[0].holder.token == pass_b  # refused: B holds
            assert read(store, aged=False).token == pass_b
        else:
            assert outcome == ["held"]  # the race: A took B's live lease
    if conditional:  # a stale lease's replace, and a heartbeat, lose to a write that came first
        cond = lease.Conditional.of(store)
        tag = cond.put(json.dumps({"token": "c"}), replacing=None)
        assert tag is not None and cond.put(json.dumps({"token": "d"}), replacing=None) is None
        assert cond.put(json.dumps({"token": "e"}), replacing=tag) is not None  # replaced as read
        assert cond.put(json.dumps({"token": "f"}), replacing=tag) is None  # replaced since: refused
        assert read(store, aged=False).token == "e"


def test_a_damaged_prepared_shard_is_named_before_any_worker_starts(tmp_path):
    """A truncated shard in the prepared cache failed inside every worker with pyarrow's "Parquet magic bytes not
    found in footer", naming no file, three times over; the advice for a missing one did not work (the damaged
    cache was reused). The driver reads every shard's footer first and names the shard and what to delete."""
    from kcpt.data.prepare import prepare_all

    cfg = _cfg(tmp_path)
    ref = Path(prepare_all(cfg, ["raw_train"], progress=False)["raw_train"])
    shard = sorted(ref.glob("part-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(InputError, match=rf"{shard}: cannot read shard \(ArrowInvalid: .*\): the prepared copy of "
                                         rf"dataset 'raw_train' is damaged or incomplete; delete {ref} and run again"):
        run_plan(cfg, in_process=True)
    assert not (tmp_path / "runs" / "r" / "config.yaml").exists()   # refused on the driver, before the run began


def test_a_tune_experiment_in_use_by_another_driver_is_refused_before_anything_changes(tmp_path):
    """A second tune driver on a live experiment (a --resume while the first runs; an --overwrite under it) marked the
    first's running trials FAIL as interrupted, or deleted its files; on a bucket, from another machine, likewise.
    It is refused naming the first's pid (a lease names host and pid for a URI, kcpt.lease.held), before Ray starts
    or anything in the experiment changes."""
    import ray

    from kcpt.tune.launch import tune_stage3

    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "experiment.json").write_text("{}")  # what --overwrite deletes first
    holder = _holder(exp, 60)
    try:
        for flags in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(InputError, match=rf"{exp}: in use by another kcpt tune \(pid {holder.pid}\) on this "
                                                 r"machine: wait for it to end, or give this one another "
                                                 r"--experiment-dir"):
                # a stage the tune job accepts (an exam set, the exam objective): the lease is what refuses it
                tune_stage3(_cfg(tmp_path, "plan.0.eval_exam=qa_val", "tune.objective=exam"), experiment_dir=exp,
                            **flags)
        assert [p.name for p in exp.iterdir()] == ["experiment.json"] and not ray.is_initialized()
    finally:
        holder.kill()
        holder.wait()
