"""Tokens/s of the Ray Train stage loop against a plain single-process PyTorch loop, same model and data.

    python bench/train_loop.py [--steps 60] [--model small|medium] [--workers 1,2] [--threads 2]
    python bench/train_loop.py --gpu [--steps 30] [--peak-tflops 989]      # ~1B Llama, bf16, sdpa

Both loops train the same tiny Llama (or the ~1B config with ``--gpu``) on the same prepared demo rows (CPT
stage: raw_train, next-token CE, AdamW, clip 1.0, warmup+cosine). Reported per configuration:

- steady-state tokens/s: the Ray loop's own timer over its second half (``tokens_per_s`` of the last eval
  interval; evals and checkpoints excluded), the plain loop's over the same steps;
- end-to-end tokens/s: all trained tokens ÷ wall time including setup (``ray.init``, ``fit()`` start, model
  build, data load);
- the ratio Ray ÷ plain for both (goal ≥ 0.95 steady-state with 1 worker).

The plain loop uses ``--threads`` torch threads; the Ray loop with W workers gets ``threads / W`` CPUs per worker
(so both use the same cores). GPU mode: tokens/s/GPU and MFU = 6·N·tokens/s ÷ peak FLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = {
    "small": ["model.tiny.hidden_size=128", "model.tiny.num_layers=2", "model.tiny.num_heads=4",
              "model.tiny.intermediate_size=256"],
    "medium": ["model.tiny.hidden_size=256", "model.tiny.num_layers=4", "model.tiny.num_heads=4",
               "model.tiny.intermediate_size=512"],
    "1b": ["model.tiny.hidden_size=2048", "model.tiny.num_layers=16", "model.tiny.num_heads=16",
           "model.tiny.intermediate_size=5632", "model.dtype=bfloat16", "model.attn_implementation=sdpa"],
}


def bench_config(args: argparse.Namespace, workers: int, run_name: str, out: Path):
    from kcpt.config import load_config

    seq_len = args.seq_len
    plan = (f"[{{name: cpt, sources: {{raw_train: 1.0}}, max_steps: {args.steps}, eval_every: {args.steps // 2}, "
            f"sets_baseline: true, lr: {{peak: 0.001, warmup_steps: 5}}, stop: {{rule: max_steps}}}}]")
    ov = [*MODELS[args.model], f"data.seq_len={seq_len}", f"data.prepared_root={args.prepared_root}",
          "logging.progress=false", "logging.tensorboard=false", f"train.micro_batch_size={args.batch}",
          f"train.num_workers={workers}", f"train.cpus_per_worker={max(1, args.threads // workers)}",
          f"train.use_gpu={str(args.gpu).lower()}", "train.eval_at_start=false", "train.max_eval_rows=8",
          "train.checkpoint_every_eval=false", "train.anomaly.k_mad=1000", f"train.output_dir={out}",
          f"train.run_name={run_name}", f"plan={plan}", "tune.stage=cpt"]
    return load_config(None, ov)


def plain_loop(cfg, steps: int, device: str) -> dict[str, float]:
    """Single process, no Ray: the same model, rows, optimizer, schedule and loss as the stage loop."""
    import torch

    from kcpt.data.prepare import prepare_all
    from kcpt.model.loading import load_causal_lm
    from kcpt.model.tokenizer import pad_token_id
    from kcpt.train.batches import SourceBatches, load_packed_rows
    from kcpt.train.losses import token_ce_sum
    from kcpt.train.schedule import make_scheduler

    t_start = time.perf_counter()
    prepared = prepare_all(cfg, ["raw_train"], progress=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(prepared["raw_train"]) / "tokenizer"))
    if device == "cpu":
        torch.set_num_threads(int(cfg.train.cpus_per_worker * cfg.train.num_workers))
    model = load_causal_lm(cfg.model, vocab_size=len(tok), pad_token_id=pad_token_id(tok),
                           eos_token_id=tok.eos_token_id).to(device)
    model.train()
    stage = cfg.plan[0]
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr.peak, betas=tuple(t.adam_betas),
                            weight_decay=t.weight_decay)
    sched = make_scheduler(opt, stage.max_steps, stage.lr)
    stream = SourceBatches(load_packed_rows(prepared["raw_train"], "raw_train", cfg.data.seq_len), rank=0, world=1,
                           batch_size=t.micro_batch_size, seed=t.seed, device=device)
    half = steps // 2
    t_half = None
    for step in range(steps):
        if step == half:
            if device != "cpu":
                torch.cuda.synchronize()
            t_half = time.perf_counter()
        b = stream.next()
        out = model(input_ids=b["input_ids"], position_ids=b["position_ids"])
        s, n = token_ce_sum(out.logits, b["labels"])
        loss = s / n.clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
        opt.step()
        sched.step()
        float(loss.detach())  # the stage loop reads the loss every step too
    if device != "cpu":
        torch.cuda.synchronize()
    t_end = time.perf_counter()
    tok_step = t.micro_batch_size * cfg.data.seq_len
    return {"steady_tok_s": tok_step * (steps - half) / (t_end - t_half),
            "e2e_tok_s": tok_step * steps / (t_end - t_start), "wall_s": t_end - t_start,
            "params": sum(p.numel() for p in model.parameters())}


def ray_loop(cfg, steps: int, run_dir: Path) -> dict[str, float]:
    from kcpt.train.launch import run_plan

    t0 = time.perf_counter()
    res = run_plan(cfg, resume="never", run_dir=run_dir)
    wall = time.perf_counter() - t0
    recs = [r for r in res.metrics if r["step"] > 0]
    tokens = recs[-1]["tokens_seen"]
    return {"steady_tok_s": recs[-1]["tokens_per_s"], "e2e_tok_s": tokens / wall, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--model", choices=list(MODELS), default="small")
    p.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    p.add_argument("--threads", type=int, default=2, help="CPU threads in total (plain loop) = CPUs given to Ray")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="rows per worker per step (plain loop: × workers)")
    p.add_argument("--gpu", action="store_true", help="~1B Llama on GPU(s), bf16, sdpa; reports MFU")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU peak (H100 SXM bf16 dense: 989)")
    p.add_argument("--prepared-root", default=str(Path(tempfile.gettempdir()) / "kcpt-bench-prepared"))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.gpu:
        args.model = "1b"
        args.seq_len = max(args.seq_len, 1024)
    import ray

    from kcpt.config import load_config  # noqa: F401 - fail early on a broken install

    workers = [int(w) for w in args.workers.split(",")]
    out = Path(tempfile.mkdtemp(prefix="kcpt-bench-"))
    device = "cuda" if args.gpu else "cpu"
    rows = []
    for w in workers:
        cfg = bench_config(args, w, f"ray-{w}", out)
        # plain loop with the same global batch (w × batch rows per step) on all the cores
        plain_cfg = bench_config(args, 1, "plain", out)
        plain_cfg = plain_cfg.model_copy(update={"train": plain_cfg.train.model_copy(
            update={"micro_batch_size": args.batch * w, "cpus_per_worker": float(args.threads)})})
        base = plain_loop(plain_cfg, args.steps, device)
        ray.init(num_cpus=args.threads + 1, num_gpus=w if args.gpu else None, include_dashboard=False,
                 log_to_driver=False)
        try:
            got = ray_loop(cfg, args.steps, out / f"ray-{w}")
        finally:
            ray.shutdown()
        row = {"workers": w, "model": args.model, "params": base["params"],
               "tokens_per_step": args.batch * w * args.seq_len,
               "plain_steady_tok_s": base["steady_tok_s"], "ray_steady_tok_s": got["steady_tok_s"],
               "steady_ratio": got["steady_tok_s"] / base["steady_tok_s"],
               "plain_e2e_tok_s": base["e2e_tok_s"], "ray_e2e_tok_s": got["e2e_tok_s"],
               "e2e_ratio": got["e2e_tok_s"] / base["e2e_tok_s"], "ray_wall_s": got["wall_s"],
               "plain_wall_s": base["wall_s"]}
        if args.gpu:
            row["ray_tok_s_per_gpu"] = got["steady_tok_s"] / w
            row["mfu"] = 6 * base["params"] * row["ray_tok_s_per_gpu"] / (args.peak_tflops * 1e12)
            row["plain_mfu"] = 6 * base["params"] * base["steady_tok_s"] / (args.peak_tflops * 1e12)
        rows.append(row)
    hdr = ["workers", "plain tok/s", "ray tok/s", "ratio", "plain e2e tok/s", "ray e2e tok/s", "e2e ratio",
           "ray wall s"] + (["tok/s/GPU", "MFU"] if args.gpu else [])
    print(f"\nmodel {args.model} ({rows[0]['params'] / 1e6:.2f}M params), seq_len {args.seq_len}, {args.batch} "
          f"rows/worker/step, {args.steps} steps, {args.threads} threads")
    print(" | ".join(hdr))
    for r in rows:
        cells = [str(r["workers"]), f"{r['plain_steady_tok_s']:.0f}", f"{r['ray_steady_tok_s']:.0f}",
                 f"{r['steady_ratio']:.3f}", f"{r['plain_e2e_tok_s']:.0f}", f"{r['ray_e2e_tok_s']:.0f}",
                 f"{r['e2e_ratio']:.3f}", f"{r['ray_wall_s']:.1f}"]
        if args.gpu:
            cells += [f"{r['ray_tok_s_per_gpu']:.0f}", f"{r['mfu']:.3f}"]
        print(" | ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
