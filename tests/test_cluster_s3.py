"""The demo plan on a 2-node Ray cluster with every root on S3 (moto's server on 127.0.0.1), against the same plan
run plainly on local paths, back to back.

Nothing is shared between the nodes but the object store: each node's processes keep their scratch under
``$KCPT_SCRATCH/node-<id>/`` (kcpt.storage), the driver runs in a directory outputs must not go to, and a worker
on the second node is killed mid-stage. The run must end with the same metrics as the local one (1e-6), every
output in the bucket, and the report readable from ``s3://``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")

from kcpt.config import load_config  # noqa: E402
from kcpt.storage import Store  # noqa: E402
from kcpt.train.launch import run_plan  # noqa: E402
from kcpt.train.rundir import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow

COMPARED = ("raw_val_loss", "exam_val_loss", "train_loss", "kl", "grad_norm", "lr", "tokens_seen", "gate_streak",
            "rollbacks", "lr_scale")
CRASH = ("train.faults.stage=stage1", "train.faults.crash_at_step=15", "train.faults.crash_rank=1")
TIMES: dict[str, float] = {}


def demo_cfg(output_dir: str, prepared_root: str, *extra: str):
    return load_config(None, [f"train.output_dir={output_dir}", f"data.prepared_root={prepared_root}",
                              "logging.progress=false", *extra])


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The demo plan on local paths, one-node Ray (the reference)."""
    root = tmp_path_factory.mktemp("local")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        res = run_plan(demo_cfg(str(root / "runs"), str(root / "prepared")), resume="never")
        TIMES["local"] = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return res


@pytest.fixture(scope="module")
def two_nodes(s3_server, tmp_path_factory):
    """A Ray cluster of two nodes (1 CPU each: the 2 training workers must spread) whose processes see the S3
    endpoint through the standard AWS_* variables and keep per-node scratch under KCPT_SCRATCH."""
    from ray.cluster_utils import Cluster

    scratch = tmp_path_factory.mktemp("scratch")
    old = os.environ.get("KCPT_SCRATCH")
    os.environ["KCPT_SCRATCH"] = str(scratch)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
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


def test_demo_plan_on_s3_and_two_nodes_survives_a_worker_kill(local_run, two_nodes, s3_prefix, tmp_path,
                                                              monkeypatch):
    cwd = tmp_path / "driver-cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    cfg = demo_cfg(f"{s3_prefix}/runs", f"{s3_prefix}/prepared", *CRASH)
    t0 = time.perf_counter()
    res = run_plan(cfg, resume="never")
    TIMES["s3_two_nodes"] = time.perf_counter() - t0
    print(f"\ndemo plan: local {TIMES['local']:.0f} s, S3 + 2 nodes (incl. one worker kill) "
          f"{TIMES['s3_two_nodes']:.0f} s")

    run_uri = f"{s3_prefix}/runs/demo"
    assert res.run_dir == run_uri
    store = Store(run_uri)
    assert store.is_file("faults/crash-stage1-15")  # the worker on the other node really died at stage-1 step 15
    # the same metrics as the uninterrupted local run: no eval lost or recorded twice, values within 1e-6
    got = {(r["stage"], r["step"]): r for r in read_metrics(run_uri)}
    want = {(r["stage"], r["step"]): r for r in read_metrics(local_run.run_dir)}
    assert got.keys() == want.keys()
    for key, w in want.items():
        for k in COMPARED:
            if w.get(k) is None:
                assert got[key].get(k) is None, (key, k)
            else:
                assert got[key][k] == pytest.approx(w[k], abs=1e-6, rel=0), (key, k)
    assert res.summaries["stage3"]["passed"] == local_run.summaries["stage3"]["passed"]
    # every output is in the bucket: run files, published checkpoints (manifest present), TensorBoard, Ray's own
    assert {"metrics.jsonl", "summary.json", "config.yaml", "kcpt-run.json", "checkpoints", "tb", "ray"} <= \
        set(store.listdir())
    for stage, ref in res.best_checkpoints.items():
        assert ref.startswith(run_uri + "/checkpoints/") and Store(ref).is_file("manifest.json"), stage
    assert any(n.startswith("raw_train-") for n in Store(f"{s3_prefix}/prepared").listdir())
    assert list(cwd.iterdir()) == []  # nothing went to the driver's working directory
    # both nodes' workers worked from their own scratch (downloaded data), not from a shared directory
    nodes = [p.name for p in two_nodes.iterdir() if p.name.startswith("node-")]
    assert len(nodes) == 2, nodes
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
