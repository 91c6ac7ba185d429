"""The demo plan on a 2-node Ray cluster with every root on S3 (moto's server on 127.0.0.1), a 1-trial tune with
every root on S3 on the same cluster, and an elastic run that loses the second node.

Nothing is shared between the nodes but the object store: each node's processes keep their scratch under
``$KCPT_SCRATCH/node-<id>/`` (kcpt.storage), and the driver runs in a directory outputs must not go to. The demo run
must pass the stage-3 gate, leave every output in the bucket, and its report must read from ``s3://``. The elastic
run loses the second node mid-CPT (a worker that stops answering, then its node removed): resumed across nodes from
the bucket, it must record the same metrics as a run into a local directory in this process (1e-6). (A worker killed
in a fixed-size run is test_train_ray.py's: the group is replaced the same way on one node or two.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from kcpt.config import load_config  # noqa: E402
from kcpt.storage import Store  # noqa: E402
from kcpt.train.launch import run_plan  # noqa: E402
from kcpt.train.rundir import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow

CLUSTER: dict[str, object] = {}
"""The two-node cluster of :func:`two_nodes` (``"cluster"``, ``"worker_node"``: the node that is not the head)."""


def demo_cfg(output_dir: str, prepared_root: str, *extra: str):
    return load_config(None, [f"train.output_dir={output_dir}", f"data.prepared_root={prepared_root}",
                              "logging.progress=false", *extra])


@pytest.fixture(scope="module")
def two_nodes(s3_server, tmp_path_factory):
    """A Ray cluster of two nodes (1 CPU each: the 2 training workers must spread) whose processes see the S3
    endpoint through the standard AWS_* variables and keep per-node scratch under KCPT_SCRATCH."""
    from ray.cluster_utils import Cluster

    scratch = tmp_path_factory.mktemp("scratch")
    old = os.environ.get("KCPT_SCRATCH")
    os.environ["KCPT_SCRATCH"] = str(scratch)
    # a node that is gone is known after ~3 s (3 failed health checks 1 s apart; default 5 x 3 s), so that the
    # elastic test's restart finds 1 node; a live node's check still has the default 10 s to answer
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    CLUSTER.update(cluster=cluster, worker_node=cluster.add_node(num_cpus=1))
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield scratch
    finally:
        ray.shutdown()
        cluster.shutdown()
        if old is None:
            os.environ.pop("KCPT_SCRATCH", None)
        else:
            os.environ["KCPT_SCRATCH"] = old


def test_demo_plan_on_s3_and_two_nodes_passes_its_gate(two_nodes, s3_prefix, tmp_path, monkeypatch):
    cwd = tmp_path / "driver-cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    cfg = demo_cfg(f"{s3_prefix}/runs", f"{s3_prefix}/prepared")
    # a copy of this run that a killed earlier attempt left under the key of a Ray node that is gone
    gone = two_nodes / "node-0000dead0000dead"
    stale = gone.joinpath("uri", "s3", *f"{s3_prefix}/runs/demo".removeprefix("s3://").split("/"))
    (stale / "checkpoints" / "00-cpt-step000010").mkdir(parents=True)
    (stale / "checkpoints" / "00-cpt-step000010" / "manifest.json").write_text("{}")
    t0 = time.perf_counter()
    res = run_plan(cfg, resume="never")
    print(f"\ndemo plan on S3 + 2 nodes, all stages: {time.perf_counter() - t0:.0f} s")
    # the demo plan end to end, as `python jobs/train_stages.py` runs it (2 workers, seq_len 256): every stage
    # stops on its own rule, stage 3 passes its gate, the exam loss ends far below where exam training started
    # while the raw val loss stays within tolerance of the CPT baseline
    s = res.summaries
    assert list(s) == ["cpt", "stage1", "stage2", "stage3"]
    assert res.baseline_raw_best == pytest.approx(s["cpt"]["min_raw_val_loss"])
    stop3 = load_config(None, []).stage("stage3").stop
    assert s["stage3"]["passed"] and s["stage3"]["stop_reason"] == "gate"
    assert s["stage3"]["best_exam_val_loss"] <= stop3.exam_target
    assert s["stage3"]["best_raw_val_loss"] <= res.baseline_raw_best * (1 + stop3.raw_tolerance)

    run_uri = f"{s3_prefix}/runs/demo"
    assert res.run_dir == run_uri
    store = Store(run_uri)
    recs = read_metrics(run_uri)
    exam_start = next(r["exam_val_loss"] for r in recs if r["stage"] == "stage1" and r["step"] == 0)
    assert exam_start - s["stage3"]["best_exam_val_loss"] > 1.0  # nats, on the same exam_val set
    assert all(r["rollbacks"] == 0 for r in recs)
    # every stage's evals, each once, at its eval_every until it stopped
    for st in load_config(None, []).plan:
        steps = [r["step"] for r in recs if r["stage"] == st.name]
        assert steps == list(range(0, s[st.name]["steps"] + 1, st.eval_every)), (st.name, steps)
    # exam accuracy at every exam eval: all of exam_val's items reached both nodes' workers from the bucket
    # (items.jsonl, split between the ranks and gathered)
    from kcpt.data.exam_io import ITEMS_FILE

    prepared = Store(f"{s3_prefix}/prepared")
    exam_val = next(n for n in prepared.listdir() if n.startswith("exam_val-"))
    items = [json.loads(ln) for ln in Store(f"{s3_prefix}/prepared/{exam_val}").read_text(ITEMS_FILE).splitlines()]
    n_mc = sum(bool(it["choices"]) for it in items)  # multiple choice: items with choices; short answer: the rest
    assert 0 < n_mc < len(items)
    exam_evals = [r for r in recs if r.get("eval_exam")]
    assert {r["stage"] for r in exam_evals} == {"stage1", "stage2", "stage3"}
    assert all((r["exam_items_mc"], r["exam_items_short"]) == (n_mc, len(items) - n_mc) and r["exam_acc"] is not None
               for r in exam_evals)
    # every output is in the bucket: run files, published checkpoints (manifest present), TensorBoard, Ray's own
    assert {"metrics.jsonl", "summary.json", "config.yaml", "kcpt-run.json", "checkpoints", "tb", "ray"} <= \
        set(store.listdir())
    for stage, ref in res.best_checkpoints.items():
        assert ref.startswith(run_uri + "/checkpoints/") and Store(ref).is_file("manifest.json"), stage
    assert any(n.startswith("raw_train-") for n in Store(f"{s3_prefix}/prepared").listdir())
    assert list(cwd.iterdir()) == []  # nothing went to the driver's working directory
    # both nodes' workers worked from their own scratch (downloaded data), not from a shared directory
    nodes = [p for p in two_nodes.iterdir() if p.name.startswith("node-") and p != gone]
    assert len(nodes) == 2, nodes
    assert not stale.exists()  # the workers freed what the gone node's attempt had left on this machine
    # and left no copy of a checkpoint there once it ended: the bucket holds them (a node's disk would fill up
    # run after run, tune trial after tune trial)
    from conftest import checkpoint_copies

    assert [c for n in nodes for c in checkpoint_copies(n)] == []
    # the report reads the run from S3, as a user would
    out = subprocess.run([sys.executable, "-m", "kcpt.cli", "report", run_uri], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "stage3" in out.stdout and run_uri in out.stdout
    summary = json.loads(store.read_text("summary.json"))
    assert summary["stage_order"] == ["cpt", "stage1", "stage2", "stage3"]


def test_relative_local_path_on_a_multi_node_cluster_is_refused(two_nodes, tmp_path, monkeypatch):
    from kcpt.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    cfg = demo_cfg("runs", str(tmp_path / "prepared"))
    with pytest.raises(ConfigError, match=r"train.output_dir: 'runs' is a relative local path.*s3://"):
        run_plan(cfg, resume="never")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "prepared").exists()


def test_tune_with_every_root_on_s3_and_reading_results_from_there(two_nodes, s3_prefix, tmp_path, monkeypatch):
    """A 1-trial tune on the 2-node cluster, its trial a TorchTrainer of 2 workers (``tune.num_workers=2``: the
    nested Ray Train path; world-size-1 trials elsewhere run in their Tune actor): prerequisites, Tune's state, the
    trials' run dirs, trials.parquet, best_config.yaml and the study snapshot all land in the bucket; `kcpt report`
    and the notebook read them back from s3:// in a fresh scratch (as another machine would)."""
    import nbformat
    from conftest import TUNE_TEST_OVERRIDES
    from nbclient import NotebookClient

    from kcpt.tune.launch import tune_stage3

    monkeypatch.chdir(tmp_path)
    exp_uri = f"{s3_prefix}/experiments/e1"
    short = ["plan.0.max_steps=6", "plan.0.eval_every=3", "plan.1.max_steps=4", "plan.1.eval_every=2",
             "plan.2.max_steps=4", "plan.2.eval_every=2", "tune.stage_overrides.max_steps=8",
             "tune.stage_overrides.eval_every=4",  # the wiring, not the search: a few steps per stage
             "tune.stage_overrides.stop.consecutive=2"]
    cfg = load_config(None, [*TUNE_TEST_OVERRIDES, *short, f"train.output_dir={s3_prefix}/runs",
                             f"data.prepared_root={s3_prefix}/prepared", f"tune.experiment_dir={s3_prefix}/experiments",
                             "tune.num_samples=1", "tune.num_workers=2",
                             "train.cpus_per_worker=0.5"])  # 2 nodes x 1 CPU: the trial's actor + 2 workers
    res = tune_stage3(cfg, experiment_dir=exp_uri, verbose=0)
    assert res.extra["experiment_uri"] == exp_uri
    exp = Store(exp_uri)
    names = set(exp.listdir())
    assert {"experiment.json", "config.yaml", "optuna.db", "trials.parquet", "best_trial.json", "tune", "runs"} <= names
    assert ("best_config.yaml" in names) == (res.best is not None)
    manifest = json.loads(exp.read_text("experiment.json"))
    assert manifest["runs_dir"] == f"{exp_uri}/runs" and manifest["prereq_run_dir"].startswith(f"{s3_prefix}/runs/")
    assert manifest["trial_workers"] == 2 and manifest["trial_in_actor"] is False
    (trial_run,) = exp.listdir("runs")  # one run directory per trial, in the bucket
    assert "ray" in exp.listdir(f"runs/{trial_run}")  # its TorchTrainer's storage (Ray Train wrote there)
    trial_cfg = yaml.safe_load(exp.read_text(f"runs/{trial_run}/config.yaml"))
    assert trial_cfg["train"]["num_workers"] == 2

    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "reader"))  # another machine: nothing local
    out = subprocess.run([sys.executable, "-m", "kcpt.cli", "report", exp_uri], capture_output=True, text=True,
                         timeout=120, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert "exam@sel" in out.stdout
    from kcpt.analysis import trials as kt

    study = kt.load_study(exp_uri)  # the published study snapshot, opened from the fresh mirror
    assert len(study.trials) == 1 and len(kt.load_trials(exp_uri)) == 1
    nb = nbformat.read(Path(__file__).resolve().parents[1] / "notebooks" / "inspect_trials.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    params[0].source = f"EXPERIMENT_DIR = {exp_uri!r}"
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "exam@sel" in text


def test_an_elastic_run_that_loses_a_node_goes_on_with_every_step_the_same(two_nodes, s3_prefix, tmp_path,
                                                                         monkeypatch, capsys):
    """Elastic training (``train.min_workers``; runs last: it removes the second node), under ZeRO-2, run dir in
    the bucket.
    ``num_workers`` 3 on 2 nodes of 1 CPU: Ray Train starts the 2 workers there is room for, so each step's 3
    micro-batches lie on 1 reading worker × 3 and a spare one that runs weightless padding. Rank 1 stops responding
    at step 6 and its node is removed (a preempted node): the run goes on on 1 worker from its step-4 checkpoint in
    the bucket — both nodes' ZeRO partitions, re-partitioned for 1 rank — and ends. Every eval equals the in-process
    run's into a local run directory (one worker, the same 3 micro-batches per step; losses to 1e-6): the padding
    weighs nothing, the restart on the smaller world resumes exactly, across nodes and from the bucket. The
    partition the lost node uploaded is checksummed in rank 0's manifest, and a copy changed in the bucket is
    refused naming it."""
    import threading

    monkeypatch.chdir(tmp_path)
    tiny = ["data.seq_len=64", "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
            "model.tiny.intermediate_size=64", "plan.0.max_steps=8", "plan.0.eval_every=4", "train.num_workers=3",
            "train.min_workers=1", "train.run_name=elastic", "train.keep_last=5"]
    want = read_metrics(run_plan(demo_cfg(str(tmp_path / "runs"), f"{s3_prefix}/prepared", *tiny), stages=["cpt"],
                                 resume="never", in_process=True, console=False).run_dir)  # a local run directory
    run_uri = f"{s3_prefix}/runs/elastic"
    cluster, node = CLUSTER["cluster"], CLUSTER["worker_node"]
    # the driver-side actors of a run (the error box, the console queue) live on the driver's node, where losing a
    # worker node cannot take them along
    from ray.util.queue import Queue

    from kcpt.raystart import on_this_node
    from kcpt.train.worker_errors import ErrorBox

    here = ray.get_runtime_context().get_node_id()
    boxes = [ErrorBox() for _ in range(3)]
    queues = [Queue(actor_options={"num_cpus": 0, **on_this_node()}) for _ in range(3)]
    actors = [b.actor for b in boxes] + [q.actor for q in queues]
    where = ray.get([a.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()) for a in actors])
    assert set(where) == {here}
    for b in boxes:
        b.close()
    for q in queues:
        q.shutdown()
    removed = threading.Event()

    def remove_the_node_when_rank_1_hangs() -> None:
        store = Store(run_uri)
        for _ in range(1200):
            if store.is_file("faults/hang-cpt-6"):
                cluster.remove_node(node, allow_graceful=False)
                removed.set()
                return
            time.sleep(0.1)

    # Ray's view of the cluster lags a lost node: the first restart asks for 2 workers again and waits this long
    # for them (60 s by default) before it starts the 1 there is room for
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    watcher = threading.Thread(target=remove_the_node_when_rank_1_hangs, daemon=True)
    watcher.start()
    crash = ("train.faults.stage=cpt", "train.faults.hang_at_step=6", "train.faults.crash_rank=1",
             "train.max_failures=3", "train.async_checkpoint=false")  # the step-4 checkpoint is complete at step 5
    run_plan(demo_cfg(f"{s3_prefix}/runs", f"{s3_prefix}/prepared", *tiny, *crash, "train.deepspeed={zero_stage: 2}"),
             stages=["cpt"], resume="never")
    watcher.join(timeout=5)
    assert removed.is_set() and len([n for n in ray.nodes() if n["Alive"]]) == 1
    out = capsys.readouterr().out
    assert "elastic: 2 of 3 workers; each step's 3 micro-batches as 1 reading worker × 3, 1 worker running " \
           "padding micro-batches" in out
    assert "elastic: 1 of 3 workers; each step's 3 micro-batches as 1 reading worker × 3" in out
    got = read_metrics(run_uri)
    assert [(r["step"], r["workers"]) for r in got] == [(0, 2), (4, 2), (8, 1)]
    assert [r["step"] for r in want] == [0, 4, 8]
    for g, w in zip(got, want, strict=True):
        for k in ("raw_val_loss", "train_loss", "grad_norm", "lr", "tokens_seen"):
            if w.get(k) is None:
                assert g.get(k) is None, (g["step"], k)
            else:  # the norm of ZeRO's partitioned gradients against the bare module's clip_grad_norm_
                assert g[k] == pytest.approx(w[k], abs=1e-6, rel=1e-4 if k == "grad_norm" else 0), (g["step"], k)
    # the restart on 1 worker re-partitioned the step-4 ZeRO-2 state of both nodes' ranks, from the bucket; the
    # checkpoints after it hold one partition
    from kcpt.errors import CheckpointError
    from kcpt.train import checkpoint as ckpt_lib

    manifests = {step: json.loads(Store(f"{run_uri}/checkpoints/00-cpt-step{step:06d}").read_text(ckpt_lib.MANIFEST))
                 for step in (4, 8)}
    assert (ckpt_lib.zero_world(manifests[4]), ckpt_lib.zero_world(manifests[8])) == (2, 1)
    # the partition the rank on the lost node uploaded has its CRC-32 in rank 0's manifest too (it had none: a
    # same-size change of it was loaded into the optimizer without a word); changed in the bucket, the fetch a
    # resume's rank makes of it is refused naming it
    parts = {n: int(m[1]) for n in manifests[4]["files"] if (m := ckpt_lib._ZERO_PARTITION.search(n))}
    assert sorted(parts.values()) == [0, 1], manifests[4]["files"]
    assert set(parts) <= set(manifests[4][ckpt_lib.CHECKSUMS]), manifests[4][ckpt_lib.CHECKSUMS]
    ckpt = f"{run_uri}/checkpoints/00-cpt-step000004"
    other = next(n for n, r in parts.items() if r == 1)
    data = bytearray(Store(ckpt).read_bytes(other))
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # the same size, other bytes
    Store(ckpt).write_bytes(other, bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt}: file {other} does not match its checksum")):
        ckpt_lib.fetch(ckpt, rank=1)
