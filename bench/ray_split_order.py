"""Does a rank get the same rows run to run from Ray Data's ``streaming_split`` (what ``DataConfig`` /
``get_dataset_shard`` use)? A minimal check, kept to document why kcpt's streaming loader reads shards itself.

    python bench/ray_split_order.py [--runs 4] [--rows 400] [--blocks 20]

Each run splits ``ray.data.range(rows)`` (``preserve_order``, ``equal=True``) in two and consumes both halves
from two threads, one of them (alternating from run to run) slower by a random few ms per batch (as ranks
differ in step time); printed per run: how many rows each split got and a hash of split 0's row ids.

Measured (Ray 2.60, 2 CPUs, 4 runs): split 0 got the same 200 rows in every run, whichever split was slower —
the split assignment itself was reproducible here. What the split does not give is a position to resume from
(ray#48224: resuming after ``k`` rows means reading and discarding ``k`` rows), see docs/training.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def one_run(rows: int, blocks: int, seed: int, slow: int) -> tuple[list[int], list[int]]:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ds = ray.data.range(rows, override_num_blocks=blocks)
    its = ds.streaming_split(2, equal=True)
    got: list[list[int]] = [[], []]
    rng = random.Random(seed)
    delays = [rng.uniform(0, 0.01) for _ in range(rows)]

    def consume(i: int) -> None:
        for k, b in enumerate(its[i].iter_batches(batch_size=4, batch_format="numpy")):
            got[i] += [int(x) for x in b["id"]]
            if i == slow:
                time.sleep(delays[k])

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got[0], got[1]


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--blocks", type=int, default=20)
    args = p.parse_args(argv)
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    hashes = []
    try:
        for r in range(args.runs):
            slow = r % 2  # which rank is the slower one alternates, as it may from run to run on a cluster
            a, b = one_run(args.rows, args.blocks, seed=r, slow=slow)
            h = hashlib.sha256(str(a).encode()).hexdigest()[:12]
            hashes.append(h)
            print(f"run {r} (split {slow} slower): split 0 got {len(a)} rows (first {a[:6]}), split 1 got "
                  f"{len(b)}; split 0 ids sha {h}")
    finally:
        if started:
            ray.shutdown()
    print("split 0 saw the same rows in every run" if len(set(hashes)) == 1
          else f"split 0 saw {len(set(hashes))} different row sets in {args.runs} runs: not reproducible")
    return hashes


if __name__ == "__main__":
    main()
