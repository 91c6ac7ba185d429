"""Peak memory of the training loss (CE + β·KL to a reference, forward + backward): logits path vs fused chunks.

    python bench/loss_memory.py                       # vocab 128256, 4×2048 tokens, hidden 256, CPU, float32
    python bench/loss_memory.py --seqs 256,512,2048 --vocab 128256 --batch 4

Each variant runs in its own process: the inputs (final hidden states of the model and of the reference, head
weights, labels) are built first, the peak resident set size is reset (``/proc/self/clear_refs``), then the loss of
one micro-batch exactly as the loop computes it runs forward + backward; the figure is VmHWM − RSS before the loss
(the memory the loss itself needed). Variants:

- ``logits``: today's path — ``hidden @ W.T`` (full logits), :func:`kcpt.train.losses.token_ce_sum` and
  :func:`~kcpt.train.losses.kl_to_reference_sum` against the reference's full logits;
- ``fused``: :func:`kcpt.train.fused_loss.fused_ce_kl` (chunks over tokens, no full-vocabulary logits).

Both write CE, KL and the gradients; the parent checks they agree (CE/KL relative 1e-5, gradients max |Δ|)
and prints the ratio. The logits path at 4×2048 × 128k needs ~30 GB (several float32 copies of 4.2 GB); where
the machine has not that much available, it is skipped at that size (said in the table) and the ratio is given
at the sizes where both ran — the logits path's memory grows linearly with tokens, the fused path's does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kcpt (children too)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(args: argparse.Namespace) -> None:
    import torch

    from kcpt.train.fused_loss import fused_ce_kl
    from kcpt.train.losses import kl_to_reference_sum, token_ce_sum

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, T, H, V = args.batch, args.seq, args.hidden, args.vocab
    h = (torch.randn(B, T, H, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.05).requires_grad_()
    rh, rw = torch.randn(B, T, H, generator=g) * 0.5, torch.randn(V, H, generator=g) * 0.05
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, : T // 8] = -100
    n = float((labels[:, 1:] != -100).sum())
    beta = 0.1
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    if args.variant == "logits":
        logits = h @ w.t()
        ce, _ = token_ce_sum(logits, labels)
        with torch.no_grad():
            ref_logits = rh @ rw.t()
        kl, _ = kl_to_reference_sum(logits, ref_logits, labels)
        (ce / n + beta * kl / n).backward()
        del logits, ref_logits
    else:
        obj, ce, _, kl = fused_ce_kl(h, w, labels, ce_scale=1 / n, ref_hidden=rh, ref_weight=rw, kl_scale=beta / n,
                                     chunk_tokens=args.chunk)
        obj.backward()
    peak = _status("VmHWM") - before
    torch.save({"ce": float(ce.detach()), "kl": float(kl.detach()), "gh": h.grad, "gw": w.grad}, args.out)
    print(json.dumps({"peak_bytes": peak}))


def run_variant(args: argparse.Namespace, variant: str, seq: int, out: Path) -> int:
    cmd = [sys.executable, __file__, "--child", variant, "--seq", str(seq), "--batch", str(args.batch),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--threads", str(args.threads),
           "--out", str(out)] + (["--chunk", str(args.chunk)] if args.chunk else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="2048")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunk", type=int, default=None, help="fused chunk tokens (default: ~64 MiB of logits)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=["logits", "fused"])
    p.add_argument("--out")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.child:
        args.variant = args.child
        child(args)
        return []
    import torch

    avail = _meminfo("MemAvailable")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="kcpt-lossmem-"))
    for seq in [int(s) for s in args.seqs.split(",")]:
        n_tok = args.batch * seq
        need_logits = 8 * n_tok * args.vocab * 4  # ~8 float32 [N, V] copies live at the peak
        row: dict = {"tokens": f"{args.batch}x{seq}", "vocab": args.vocab, "hidden": args.hidden}
        row["fused_mb"] = run_variant(args, "fused", seq, tmp / "fused.pt") / 2 ** 20
        if need_logits > 0.7 * avail:
            row["logits_mb"] = None
            row["note"] = (f"skipped: needs ~{need_logits / 2 ** 30:.0f} GiB, "
                           f"{avail / 2 ** 30:.0f} GiB available")
        else:
            row["logits_mb"] = run_variant(args, "logits", seq, tmp / "logits.pt") / 2 ** 20
            a, b = torch.load(tmp / "logits.pt"), torch.load(tmp / "fused.pt")
            row["ratio"] = row["logits_mb"] / row["fused_mb"]
            row["ce_rel_diff"] = abs(a["ce"] - b["ce"]) / abs(a["ce"])
            row["kl_rel_diff"] = abs(a["kl"] - b["kl"]) / max(abs(a["kl"]), 1e-30)
            row["grad_max_abs_diff"] = max(float((a["gh"] - b["gh"]).abs().max()),
                                           float((a["gw"] - b["gw"]).abs().max()))
            row["grad_scale"] = max(float(a["gh"].abs().max()), float(a["gw"].abs().max()))
        rows.append(row)
    print(f"\nloss memory: CE + 0.1·KL forward+backward, vocab {args.vocab}, hidden {args.hidden}, float32, CPU")
    print("| tokens | logits path MiB | fused MiB | ratio | CE rel Δ | KL rel Δ | grad max abs Δ (scale) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["logits_mb"] is None:
            print(f"| {r['tokens']} | – ({r['note']}) | {r['fused_mb']:.0f} | – | – | – | – |")
        else:
            print(f"| {r['tokens']} | {r['logits_mb']:.0f} | {r['fused_mb']:.0f} | {r['ratio']:.1f}× | "
                  f"{r['ce_rel_diff']:.1e} | {r['kl_rel_diff']:.1e} | {r['grad_max_abs_diff']:.1e} "
                  f"({r['grad_scale']:.1e}) |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
    sys.exit(0)
