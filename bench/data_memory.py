"""Peak RSS of one training worker against corpus size, for the streaming and the in-RAM loader.

    python bench/data_memory.py [--scales 1,8,32] [--loaders ray_data,stream,memory] [--steps 20] [--json out.json]

The demo plan's CPT stage (demo model, seq_len 256, batch 8, the same ``--steps`` for every row) trains on the
demo raw corpus repeated ``k`` times (``k`` copies of ``raw_train.jsonl``, dedup off so every copy is kept;
``raw_val`` as eval set). The corpora are prepared first, in this process; then each (loader, k) trains in a
fresh child process (``run_plan(in_process=True)``: the same StageRunner a Ray Train worker runs, without Ray's
own processes), which reports its peak RSS (``getrusage`` max RSS); ``ray_data`` needs the trainer's datasets, so
it runs one Ray Train worker, whose own peak RSS is in its eval records (``host_peak_rss_mb``; Ray Data's read
tasks and object store are other processes). Printed per row: rows and tokens of the
training source, what the in-RAM loader holds for them (``rows × seq_len × 12`` bytes: three int32 arrays),
the peak RSS, and the peak ÷ the same loader's peak at the smallest scale (goal for streaming: ≤ 1.25 at 32×).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def bench_cfg(work: Path, scale: int, loader: str, steps: int, extra: list[str] = ()):
    from kcpt.config import load_config

    corpus = work / f"corpus-x{scale}"
    plan = (f"[{{name: cpt, sources: {{raw_train: 1.0}}, max_steps: {steps}, eval_every: {steps}, "
            f"sets_baseline: true, stop: {{rule: max_steps}}}}]")
    return load_config(None, [
        f"data.datasets={{raw_train: {{kind: raw, inputs: ['{corpus}']}}, "
        "raw_val: {kind: raw, inputs: ['demo:raw_val']}}",
        "data.filters.dedup=false", f"data.prepared_root={work / 'prepared'}", f"data.loader={loader}",
        f"plan={plan}", "tune.stage=cpt", "logging.progress=false", "logging.tensorboard=false",
        f"train.output_dir={work / 'runs'}", f"train.run_name={loader}-x{scale}", "train.keep_last=1", *extra])


def make_corpus(work: Path, scale: int) -> Path:
    from kcpt.data.demo import resolve_inputs

    (src,) = resolve_inputs(["demo:raw_train"])
    d = work / f"corpus-x{scale}"
    d.mkdir(parents=True, exist_ok=True)
    text = Path(src).read_text(encoding="utf-8")
    for i in range(scale):
        (d / f"copy-{i:04d}.jsonl").write_text(text, encoding="utf-8")
    return d


def child(spec: dict) -> None:
    """Train once in this process and print ``{"peak_rss_mb": ...}`` (the last line of stdout)."""
    from kcpt.train.launch import run_plan

    loader = spec["loader"]
    extra = [*spec.get("extra", []), *(["train.num_workers=1", "train.cpus_per_worker=1"] if loader == "ray_data"
                                      else [])]
    cfg = bench_cfg(Path(spec["work"]), spec["scale"], loader, spec["steps"], extra)
    if loader == "ray_data":  # needs the TorchTrainer's datasets: one Ray Train worker; its own peak is recorded
        from kcpt.train.rundir import read_metrics

        res = run_plan(cfg, resume="overwrite", console=False)
        peak_mb = max(r["host_peak_rss_mb"] for r in read_metrics(res.run_dir))
    else:
        run_plan(cfg, resume="overwrite", in_process=True)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": peak_mb}))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", default="1,8,32")
    p.add_argument("--loaders", default="ray_data,stream,memory")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--set", action="append", default=[], help="extra config overrides (key=value) for every run")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return []
    from kcpt.data.prepare import prepare_all
    from kcpt.data.shards import read_manifest

    scales = [int(s) for s in args.scales.split(",")]
    loaders = args.loaders.split(",")
    tmp = tempfile.TemporaryDirectory(prefix="kcpt-data-memory-") if args.work is None else None
    work = Path(args.work or tmp.name)
    rows_out = []
    try:
        facts = {}
        for k in scales:
            make_corpus(work, k)
            cfg = bench_cfg(work, k, loaders[0], args.steps, args.set)
            prepared = prepare_all(cfg, ["raw_train", "raw_val"], progress=False)
            m = read_manifest(prepared["raw_train"])
            facts[k] = (m["rows"], m["tokens"], m["rows"] * m["seq_len"] * 12 / 2**20)
        path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, KCPT_SCRATCH=str(work / "scratch"), PYTHONPATH=path)
        for loader in loaders:
            for k in scales:
                spec = {"work": str(work), "scale": k, "loader": loader, "steps": args.steps, "extra": args.set}
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"{loader} ×{k} failed:\n{out.stderr[-3000:]}")
                peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
                rows, tokens, held = facts[k]
                rows_out.append({"loader": loader, "scale": k, "rows": rows, "tokens": tokens,
                                 "in_ram_arrays_mb": round(held, 1), "peak_rss_mb": round(peak, 1)})
        for r in rows_out:
            base = next(x["peak_rss_mb"] for x in rows_out if x["loader"] == r["loader"] and x["scale"] == scales[0])
            r["ratio"] = round(r["peak_rss_mb"] / base, 3)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"\npeak RSS of one training worker, demo CPT, {args.steps} steps\n")
    print(f"| loader | corpus | rows | tokens | in-RAM arrays MB | peak RSS MB | ÷ peak at ×{scales[0]} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['loader']} | ×{r['scale']} | {r['rows']} | {r['tokens']} | {r['in_ram_arrays_mb']} | "
              f"{r['peak_rss_mb']} | {r['ratio']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=2))
    return rows_out


if __name__ == "__main__":
    main()
