"""Tokens/s of the Ray Train stage loop against a plain single-process PyTorch loop, same model and data.

    python bench/train_loop.py [--steps 60] [--model small|medium] [--workers 1,2] [--threads 2]
                               [--loaders ray_data,stream,memory] [--repeat 1]
    python bench/train_loop.py --gpu [--steps 20] [--peak-tflops auto]     # Llama-3.2-1B shape, seq 2048, bf16
    python bench/train_loop.py --options [--steps 12]                      # the same option table on the CPU

Both loops train the same tiny Llama (or the ~1B config with ``--gpu``) on the same prepared demo rows (CPT
stage: raw_train, next-token CE, AdamW, clip 1.0, warmup+cosine). Reported per configuration:

- steady-state tokens/s: the Ray loop's own timer over its second half (``tokens_per_s`` of the last eval
  interval; evals and checkpoints excluded), the plain loop's over the same steps;
- end-to-end tokens/s: all trained tokens ÷ wall time including setup (``ray.init``, ``fit()`` start, model
  build, data load);
- the ratio Ray ÷ plain for both (goal ≥ 0.95 steady-state with 1 worker);
- per ``data.loader`` (``--loaders``; each Ray configuration runs once per loader, round-robin ``--repeat``
  times, medians shown): each streaming loader's steady tokens/s ÷ the in-RAM loader's (goal ≥ 0.95).

The plain loop uses ``--threads`` torch threads; the Ray loop with W workers gets ``threads / W`` CPUs per worker
(so both use the same cores).

``--gpu`` (and ``--options`` on the CPU, small shapes): the training-speed options, each alone and all together,
in one run — a Llama-3.2-1B-shaped model built from config (vocab 128256, hidden 2048, 16 layers, 32 heads / 8 KV
heads, MLP 8192, tied embeddings; random init, no download), packed rows of seq 2048 (documents of random
lengths), bf16 autocast over fp32 master weights, no gradient checkpointing, the loop's own step
(:func:`kcpt.train.loop.accumulate_step` + the engine's clip/step + the one host read per step). Printed per
variant: tokens/s/GPU, MFU = 6·N·tokens/s ÷ the GPU's bf16 dense peak, peak memory. Variants: ``today`` (logits
path, sdpa, foreach AdamW, eager), ``+fused_loss`` (torch chunks), ``+fused_loss (liger)`` (where liger_kernel
is installed), ``+flash_attention_2`` / ``+flex_attention`` (where available), ``+fused_adamw``, ``+compile``,
``all`` (and ``all (torch loss)`` when Liger is in ``all``); with 2+ GPUs also ``all`` on 2 GPUs under DDP (NCCL).
Without CUDA ``--gpu`` prints that it skipped and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def bench_config(args: argparse.Namespace, workers: int, run_name: str, out: Path, loader: str = "stream"):
    from kcpt.config import load_config

    seq_len = args.seq_len
    plan = (f"[{{name: cpt, sources: {{raw_train: 1.0}}, max_steps: {args.steps}, eval_every: {args.steps // 2}, "
            f"sets_baseline: true, lr: {{peak: 0.001, warmup_steps: 5}}, stop: {{rule: max_steps}}}}]")
    ov = [*MODELS[args.model], f"data.seq_len={seq_len}", f"data.prepared_root={args.prepared_root}",
          "logging.progress=false", "logging.tensorboard=false", f"train.micro_batch_size={args.batch}",
          f"train.num_workers={workers}", f"train.cpus_per_worker={max(1, args.threads // workers)}",
          f"train.use_gpu={str(args.gpu).lower()}", "train.eval_at_start=false", "train.max_eval_rows=8",
          "train.checkpoint_every_eval=false", "train.anomaly.k_mad=1000", f"train.output_dir={out}",
          f"train.run_name={run_name}", f"plan={plan}", "tune.stage=cpt", f"data.loader={loader}"]
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
    res = run_plan(cfg, resume="overwrite", run_dir=run_dir)
    wall = time.perf_counter() - t0
    recs = [r for r in res.metrics if r["step"] > 0]
    tokens = recs[-1]["tokens_seen"]
    return {"steady_tok_s": recs[-1]["tokens_per_s"], "e2e_tok_s": tokens / wall, "wall_s": wall}


# --------------------------------------------------------------------------- option variants (GPU MFU table)

LLAMA_1B = {"vocab_size": 128256, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 8192, "tie_word_embeddings": True,
            "rope_theta": 500000.0, "max_position_embeddings": 8192}
SMALL = {"vocab_size": 8192, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "intermediate_size": 768, "tie_word_embeddings": False,
         "max_position_embeddings": 1024}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def gpu_peak_tflops(name: str) -> float | None:
    for key, v in PEAK_TFLOPS.items():
        if key in name:
            return v
    return None


def variants(device: str) -> list[tuple[str, dict]]:
    """(name, options) of the table: today's path, each option alone, all together (unavailable ones left out).
    ``loss_kernel``: the fused loss's kernel (``torch`` chunks; ``liger`` where liger_kernel imports on CUDA —
    then also ``+fused_loss (liger)`` alone and ``all`` with the torch chunks, since Liger's CE adds one host
    sync per micro-batch: the table shows which is faster)."""
    import torch

    from kcpt.model.attention import available
    from kcpt.train.fused_loss import resolve_kernel

    liger = resolve_kernel("auto", torch.device(device)) == "liger"
    today = {"fused_loss": False, "loss_kernel": "torch", "attn": "sdpa", "fused_adamw": False, "compile": False}
    fast_attn = next((a for a in ("flash_attention_3", "flash_attention_2", "flex_attention")
                      if available(a) is None and (a != "flex_attention" or device != "cpu")), None)
    out = [("today", today), ("+fused_loss", {**today, "fused_loss": True})]
    if liger:
        out.append(("+fused_loss (liger)", {**today, "fused_loss": True, "loss_kernel": "liger"}))
    if fast_attn is not None:
        out.append((f"+{fast_attn}", {**today, "attn": fast_attn}))
    if device != "cpu":
        out.append(("+fused_adamw", {**today, "fused_adamw": True}))
    out.append(("+compile", {**today, "compile": True}))
    every = {"fused_loss": True, "attn": fast_attn or "sdpa", "fused_adamw": device != "cpu", "compile": True}
    out.append(("all", {**every, "loss_kernel": "liger" if liger else "torch"}))
    if liger:
        out.append(("all (torch loss)", {**every, "loss_kernel": "torch"}))
    return out


def _packed_batch(g, vocab: int, batch: int, seq: int, device: str) -> dict:
    """Rows of documents of random lengths (16..seq/2 tokens), position ids restarting at each one."""
    import numpy as np
    import torch

    from kcpt.model.attention import host_cu_seqlens

    pos = np.zeros((batch, seq), dtype=np.int64)
    for r in range(batch):
        t = 0
        while t < seq:
            n = int(g.integers(16, max(17, seq // 2)))
            pos[r, t:t + n] = np.arange(min(n, seq - t))
            t += n
    ids = torch.from_numpy(g.integers(0, vocab, (batch, seq)))
    cu, max_len = host_cu_seqlens(pos)
    return {"input_ids": ids.to(device), "labels": ids.to(device), "position_ids": torch.from_numpy(pos).to(device),
            "cu_seqlens": torch.from_numpy(cu).to(device), "max_seqlen": torch.tensor(max_len)}


def run_variant(opts: dict, *, shape: dict, device: str, batch: int, seq: int, grad_accum: int, steps: int,
                warmup: int, dtype: str = "bfloat16") -> dict:
    """Train ``steps`` timed optimizer steps (after ``warmup``) with the loop's step code; tokens/s and memory."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kcpt.config import ModelConfig
    from kcpt.model.loading import autocast, compile_layers
    from kcpt.train.engine import TorchEngine, all_reduce_, make_adamw, rank_world
    from kcpt.train.loop import accumulate_step

    rank, world = rank_world()
    torch.manual_seed(0)
    config = LlamaConfig(**shape, use_cache=False, attn_implementation=opts["attn"])
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    if opts["compile"]:
        compile_layers(model)
    n_params = sum(p.numel() for p in model.parameters())
    engine = TorchEngine(model, lambda g: make_adamw(g, lr=1e-4, betas=(0.9, 0.95), fused=opts["fused_adamw"]),
                         clip=1.0, weight_decay=0.1, device=torch.device(device),
                         loss_kernel=opts.get("loss_kernel", "torch"))
    mc = ModelConfig(dtype=dtype)
    dev = torch.device(device)
    g = np.random.default_rng(rank)
    data = [_packed_batch(g, shape["vocab_size"], batch, seq, device) for _ in range(grad_accum * 2)]
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    t0 = c0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
        micro = [(data[(step * grad_accum + i) % len(data)], False) for i in range(grad_accum)]
        sums = accumulate_step(engine, micro, ref=None, kl_beta=0.0, amp=lambda: autocast(mc, dev),
                               fused=opts["fused_loss"])
        norm = engine.step().double()
        all_reduce_(torch.stack([sums.objective, norm])).tolist()  # the loop's one host read per step
    sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tok_s = steps * grad_accum * batch * seq / wall
    return {"params": n_params, "tok_s": tok_s, "step_s": wall / steps,
            "tok_per_cpu_s": steps * grad_accum * batch * seq / cpu,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if device != "cpu" else None}


def _ddp_worker(rank: int, world: int, port: int, opts: dict, kw: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        res = run_variant(opts, device=f"cuda:{rank}", **kw)
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def _release(gpu: bool) -> None:
    """Free one variant's model before the next: compiled layers keep their modules alive in dynamo's caches
    (a 1B model + AdamW state is ~20 GB per variant on the GPU)."""
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()


def options_table(args: argparse.Namespace) -> list[dict]:
    import torch

    gpu = args.gpu
    if gpu and not torch.cuda.is_available():
        print("bench/train_loop.py --gpu: skipped, no CUDA device here")
        return []
    device = "cuda" if gpu else "cpu"
    if not gpu:
        torch.set_num_threads(args.threads)
    shape = LLAMA_1B if gpu else SMALL
    kw = {"shape": shape, "batch": args.batch if not gpu else args.gpu_batch, "seq": 2048 if gpu else args.seq_len,
          "grad_accum": args.grad_accum, "steps": args.steps, "warmup": args.warmup}
    peak = args.peak_tflops
    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    if gpu and peak is None:
        peak = gpu_peak_tflops(name) or 989.0
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):  # round-robin over the variants: drifting load hits them all alike
        for vname, opts in variants(device):
            r = run_variant(opts, device=device, **kw)
            r.update(variant=vname, gpus=1, **opts)
            runs.setdefault(vname, []).append(r)
            _release(gpu)
    rows = []
    for rs in runs.values():  # the median run (by tokens/s) of each variant
        rs = sorted(rs, key=lambda r: r["tok_s"])
        rows.append(dict(rs[len(rs) // 2], all_tok_s=[round(r["tok_s"]) for r in rs]))
    if gpu and torch.cuda.device_count() >= 2:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = Path(tempfile.mkdtemp()) / "ddp.json"
        opts = dict(variants(device))["all"]
        mp.start_processes(_ddp_worker, args=(2, port, opts, kw, str(out)), nprocs=2, join=True, start_method="spawn")
        r = json.loads(out.read_text())
        r.update(variant="all, 2-GPU DDP", gpus=2, **opts)
        rows.append(r)
    n = rows[0]["params"]
    print(f"\n{name}: {n / 1e9:.3f}B params, {kw['batch']}×{kw['seq']} tokens × grad_accum {kw['grad_accum']} per "
          f"GPU per step, {args.steps} timed steps, median of {args.repeat} round-robin runs"
          + (f", peak {peak:.0f} TFLOP/s bf16 dense" if gpu else ""))
    hdr = ("| variant | tokens/s/GPU | step s |" + (" MFU (6N) | peak mem GiB |" if gpu else
                                                  " tokens per CPU-second (all threads) |")
           + (" all runs tok/s |" if args.repeat > 1 else ""))
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        cells = [r["variant"], f"{r['tok_s']:.0f}", f"{r['step_s']:.3f}"]
        if gpu:
            r["mfu"] = 6 * r["params"] * r["tok_s"] / (peak * 1e12)
            cells += [f"{100 * r['mfu']:.1f} %", f"{r['peak_mem_gb']:.1f}"]
        else:
            cells.append(f"{r['tok_per_cpu_s']:.0f}")
        if args.repeat > 1:
            cells.append(", ".join(map(str, r["all_tok_s"])))
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--model", choices=list(MODELS), default="small")
    p.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    p.add_argument("--threads", type=int, default=2, help="CPU threads in total (plain loop) = CPUs given to Ray")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="rows per worker per step (plain loop: × workers)")
    p.add_argument("--gpu", action="store_true", help="Llama-3.2-1B shape on GPU(s): option table with MFU")
    p.add_argument("--options", action="store_true", help="the option table on the CPU (small model)")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-GPU bf16 dense peak (default: by GPU name)")
    p.add_argument("--gpu-batch", type=int, default=4, help="--gpu: rows of 2048 tokens per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=1, help="runs of every variant, round-robin; the median is shown")
    p.add_argument("--prepared-root", default=str(Path(tempfile.gettempdir()) / "kcpt-bench-prepared"))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--loaders", default="ray_data,stream,memory", help="data.loader values to run the Ray loop with")
    args = p.parse_args(argv)
    if args.gpu or args.options:
        options_table(args)
        return 0
    import ray

    from kcpt.config import load_config  # noqa: F401 - fail early on a broken install

    workers = [int(w) for w in args.workers.split(",")]
    out = Path(tempfile.mkdtemp(prefix="kcpt-bench-"))
    device = "cuda" if args.gpu else "cpu"
    rows = []
    for w in workers:
        # plain loop with the same global batch (w × batch rows per step) on all the cores
        plain_cfg = bench_config(args, 1, "plain", out)
        plain_cfg = plain_cfg.model_copy(update={"train": plain_cfg.train.model_copy(
            update={"micro_batch_size": args.batch * w, "cpus_per_worker": float(args.threads)})})
        base = plain_loop(plain_cfg, args.steps, device)
        ray.init(address="local", num_cpus=args.threads + 1, num_gpus=w if args.gpu else None, include_dashboard=False,
                 log_to_driver=False)
        loaders = args.loaders.split(",")
        runs: dict[str, list[dict[str, float]]] = {ld: [] for ld in loaders}
        try:
            for _ in range(args.repeat):
                for ld in loaders:
                    runs[ld].append(ray_loop(bench_config(args, w, f"ray-{w}-{ld}", out, ld), args.steps,
                                             out / f"ray-{w}-{ld}"))
        finally:
            ray.shutdown()
        for ld in loaders:
            got = {k: statistics.median(r[k] for r in runs[ld]) for k in runs[ld][0]}
            rows.append(_row(args, w, ld, base, got))
        if "memory" in runs:
            mem = next(r for r in rows if r["workers"] == w and r["loader"] == "memory")
            for r in rows:
                if r["workers"] == w:
                    r["vs_memory"] = r["ray_steady_tok_s"] / mem["ray_steady_tok_s"]
    hdr = ["workers", "loader", "plain tok/s", "ray tok/s", "ratio", "vs memory", "plain e2e tok/s", "ray e2e tok/s",
           "e2e ratio", "ray wall s"] + (["tok/s/GPU", "MFU"] if args.gpu else [])
    print(f"\nmodel {args.model} ({rows[0]['params'] / 1e6:.2f}M params), seq_len {args.seq_len}, {args.batch} "
          f"rows/worker/step, {args.steps} steps, {args.threads} threads, {args.repeat} run(s) per loader")
    print(" | ".join(hdr))
    for r in rows:
        vs = r.get("vs_memory")
        cells = [str(r["workers"]), r["loader"], f"{r['plain_steady_tok_s']:.0f}", f"{r['ray_steady_tok_s']:.0f}",
                 f"{r['steady_ratio']:.3f}", "-" if vs is None else f"{vs:.3f}", f"{r['plain_e2e_tok_s']:.0f}",
                 f"{r['ray_e2e_tok_s']:.0f}", f"{r['e2e_ratio']:.3f}", f"{r['ray_wall_s']:.1f}"]
        if args.gpu:
            cells += [f"{r['ray_tok_s_per_gpu']:.0f}", f"{r['mfu']:.3f}"]
        print(" | ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _row(args: argparse.Namespace, w: int, loader: str, base: dict, got: dict) -> dict:
    row = {"workers": w, "loader": loader, "model": args.model, "params": base["params"],
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
    return row


if __name__ == "__main__":
    sys.exit(main())
