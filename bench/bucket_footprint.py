"""What runs at a bucket URI leave on a node's disk, and what a driver downloads to check a checkpoint.

    python bench/bucket_footprint.py                 # 3 runs of the demo's CPT + stage 1, S3 on 127.0.0.1
    python bench/bucket_footprint.py --runs 5 --steps 8

S3: the endpoint of ``AWS_ENDPOINT_URL`` (with the standard ``AWS_*`` credentials) when it is set, else moto's
server started here on 127.0.0.1 (``moto[server]``, a dev dependency) with bucket ``kcpt-bench``.

``--runs`` short in-process runs of the built-in demo (CPT ``--steps`` steps, stage 1 half as many; checkpoint at
every eval), each under its own run name in the bucket — as tune trials are — and one node scratch
(``KCPT_SCRATCH``) for all of them. Two tables, each against its baseline measured in the same invocation:

1. **node scratch after each run**: bytes of checkpoints left in the scratch, against the checkpoints that run
   keeps in the bucket — what the scratch held when a run's copies stayed (its mirror was pruned exactly as the
   bucket); cumulative over the runs;
2. **a driver's check of a checkpoint before a resume** (the last run's latest, full state: weights + optimizer),
   each into an empty scratch: :func:`kcpt.train.checkpoint.inspect` (what the driver does) against
   :func:`kcpt.train.checkpoint.fetch` (the whole checkpoint: what it did before), bytes and wall time;
3. **a fresh node resuming a run stopped in stage 1** (an injected error after stage 1's first checkpoint): bytes
   downloaded (:data:`kcpt.storage.FETCHED`: the driver's check and the worker's reads, one process here) against
   the whole of every checkpoint it touched (the resumed one, the CPT best as KL reference and hand-off) —
   what a node downloaded before it fetched only the parts it reads.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kcpt


def _du(root: Path, only_checkpoints: bool = False) -> int:
    """Bytes of the files under ``root`` (``only_checkpoints``: those inside a ``checkpoints`` directory)."""
    return sum(p.stat().st_size for p in Path(root).rglob("*")
               if p.is_file() and (not only_checkpoints or "checkpoints" in p.parts))


def _start_moto(log: Path) -> subprocess.Popen:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    import boto3

    boto3.client("s3").create_bucket(Bucket="kcpt-bench")
    return proc


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="CPT steps per run (stage 1: half, at least 2)")
    ap.add_argument("--bucket", default=None, help="s3://bucket/prefix to write under (default: moto's kcpt-bench)")
    ap.add_argument("--set", action="append", default=[], help="extra config override (key=value)")
    ap.add_argument("--work", default=None, help="directory for the node scratch and logs (default: a new temp dir)")
    args = ap.parse_args(argv)

    from kcpt import storage
    from kcpt.config import load_config
    from kcpt.train import checkpoint as ckpt_lib
    from kcpt.train.launch import run_plan
    from kcpt.train.rundir import RunDir

    work = Path(tempfile.mkdtemp(prefix="kcpt-bucket-footprint-", dir=args.work))
    moto = None if os.environ.get("AWS_ENDPOINT_URL") or args.bucket else _start_moto(work / "moto.log")
    bucket = (args.bucket or "s3://kcpt-bench").rstrip("/") + f"/{work.name}"
    old_scratch = os.environ.get("KCPT_SCRATCH")
    rows: list[dict] = []
    try:
        os.environ["KCPT_SCRATCH"] = str(work / "node")
        s1 = max(2, args.steps // 2)
        sets = [f"train.output_dir={bucket}/runs", f"data.prepared_root={bucket}/prepared", "logging.progress=false",
                f"plan.0.max_steps={args.steps}", f"plan.0.eval_every={max(1, args.steps // 2)}",
                f"plan.1.max_steps={s1}", f"plan.1.eval_every={max(1, s1 // 2)}", "train.checkpoint_every_eval=true",
                *args.set]
        kept_total = 0
        last = None
        for i in range(args.runs):
            cfg = load_config(None, [*sets, f"train.run_name=run{i}"])
            t0 = time.perf_counter()
            res = run_plan(cfg, stages=["cpt", "stage1"], resume="never", in_process=True)
            rd = RunDir(res.run_dir)
            kept = sum(rd.remote.walk("checkpoints").values())
            kept_total += kept
            left = _du(work / "node", only_checkpoints=True)
            rows.append({"table": "scratch", "run": i + 1, "wall_s": time.perf_counter() - t0, "kept_in_bucket": kept,
                         "scratch_before": kept_total, "scratch_now": left})
            last = rd.latest_checkpoint(["cpt", "stage1"])
        assert last is not None
        for name, fn in (("fetch (whole checkpoint: before)", ckpt_lib.fetch),
                         ("inspect (the driver's check: now)", ckpt_lib.inspect)):
            os.environ["KCPT_SCRATCH"] = str(work / f"driver-{name.split()[0]}")
            t0 = time.perf_counter()
            fn(last)
            rows.append({"table": "driver", "how": name, "bytes": _du(work / f"driver-{name.split()[0]}"),
                         "wall_s": time.perf_counter() - t0})
        full = storage.Store(last).walk()
        # a run stopped in stage 1, resumed on a fresh node
        cfg = load_config(None, [*sets, "train.run_name=stopped"])
        stop = ["train.faults.stage=stage1", f"train.faults.raise_at_step={s1}", "train.max_failures=0"]
        try:
            run_plan(load_config(None, [*sets, "train.run_name=stopped", *stop]), stages=["cpt", "stage1"],
                     resume="never", in_process=True)
        except RuntimeError as e:
            if "injected fault" not in str(e):
                raise
        os.environ["KCPT_SCRATCH"] = str(work / "fresh-node")
        before = (storage.FETCHED.whole, storage.FETCHED.downloaded)
        t0 = time.perf_counter()
        run_plan(cfg, stages=["cpt", "stage1"], resume="auto", in_process=True, force=True)
        rows.append({"table": "resume", "whole": storage.FETCHED.whole - before[0],
                     "downloaded": storage.FETCHED.downloaded - before[1], "wall_s": time.perf_counter() - t0})
    finally:
        if old_scratch is None:
            os.environ.pop("KCPT_SCRATCH", None)
        else:
            os.environ["KCPT_SCRATCH"] = old_scratch
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)

    mb = 2**20
    print("\n| run | wall s | checkpoints kept in the bucket (MB) | node scratch: copies kept (before, cumulative "
          "MB) | node scratch now (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["table"] == "scratch":
            print(f"| {r['run']} | {r['wall_s']:.0f} | {r['kept_in_bucket'] / mb:.1f} | "
                  f"{r['scratch_before'] / mb:.1f} | {r['scratch_now'] / mb:.1f} |")
    engine = sum(v for k, v in full.items() if k.startswith(f"{ckpt_lib.ENGINE_DIR}/"))
    weights = sum(v for k, v in full.items() if k.endswith(".safetensors"))
    print(f"\ndriver's check of {last} ({sum(full.values()) / mb:.1f} MB: weights {weights / mb:.1f}, "
          f"optimizer state {engine / mb:.1f}):")
    print("| how | downloaded (MB) | wall s | vs fetch |")
    print("|---|---|---|---|")
    base = next(r for r in rows if r["table"] == "driver")
    for r in rows:
        if r["table"] == "driver":
            print(f"| {r['how']} | {r['bytes'] / mb:.2f} | {r['wall_s']:.2f} | {r['bytes'] / base['bytes']:.3f} |")
    r = next(r for r in rows if r["table"] == "resume")
    print("\na fresh node resuming a run stopped in stage 1 (checkpoints read: the resumed one, the CPT best):")
    print("| how | downloaded (MB) | vs whole |")
    print("|---|---|---|")
    print(f"| whole checkpoints (before) | {r['whole'] / mb:.2f} | 1.000 |")
    print(f"| the parts read (now) | {r['downloaded'] / mb:.2f} | {r['downloaded'] / max(r['whole'], 1):.3f} |")
    print(f"\nwork dir {work}")
    return rows


if __name__ == "__main__":
    main()
