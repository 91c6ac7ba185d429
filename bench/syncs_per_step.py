"""Device→host syncs per optimizer step of the real stage loop (in-process, tiny model, CPU), counted by op.

    python bench/syncs_per_step.py [--steps 8] [--eval-every 4] [--grad-accum 2] [--set key=value ...]

Runs ``run_plan(cfg, in_process=True)`` (the same StageRunner as on Ray) with every ``StageRunner.train_step``
under :class:`kcpt.train.syncs.SyncCounter` (torch AdamW's own host-side step counters excluded: they are CPU
tensors on a GPU too) and prints the syncs of each step, by kind, and the steps that had an eval after them.
The counter is loaded from this checkout by file path, so ``PYTHONPATH=<an older checkout>`` measures that code.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _counter_class():
    path = Path(__file__).resolve().parents[1] / "kcpt" / "train" / "syncs.py"
    spec = importlib.util.spec_from_file_location("kcpt_syncs_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SyncCounter


BASE = ["data.seq_len=64", "logging.progress=false", "logging.tensorboard=false", "model.tiny.hidden_size=32",
        "model.tiny.num_layers=1", "model.tiny.num_heads=2", "model.tiny.intermediate_size=64",
        "train.micro_batch_size=4", "train.eval_batch_size=16", "train.max_eval_rows=32", "train.num_workers=1",
        "train.anomaly.stable_every=3", "train.eval_at_start=false", "tune.stage=s"]


def per_step_syncs(prepared_root: Path, out: Path, *, steps: int = 8, eval_every: int = 4, grad_accum: int = 2,
                   extra: list[str] | None = None) -> list[dict]:
    """``[{step, total, kinds}]`` for every optimizer step of a stage mixing raw (with KL) and exam sources."""
    import torch

    from kcpt.config import load_config
    from kcpt.train import loop
    from kcpt.train.launch import run_plan

    SyncCounter = _counter_class()
    plan = (f"[{{name: s, sources: {{raw_train: 0.5, qa_train: 0.5}}, max_steps: {steps}, eval_every: {eval_every},"
            " kl_beta: 0.1, kl_reference: base, stop: {rule: max_steps}}]")
    cfg = load_config(None, [*BASE, f"data.prepared_root={prepared_root}", f"train.output_dir={out}",
                             "train.run_name=r", f"plan={plan}", f"train.grad_accum={grad_accum}", *(extra or [])])
    records: list[dict] = []
    orig_step, orig_opt = loop.StageRunner.train_step, torch.optim.AdamW.step
    state: dict = {}

    def opt_step(self, *a, **k):
        c = state.get("counter")
        if c is None:
            return orig_opt(self, *a, **k)
        with c.ignore():
            return orig_opt(self, *a, **k)

    def train_step(self, run, interval):
        with SyncCounter() as c:
            state["counter"] = c
            try:
                orig_step(self, run, interval)
            finally:
                state["counter"] = None
        records.append({"step": run.step, "total": c.total, "kinds": dict(c.counts)})

    loop.StageRunner.train_step, torch.optim.AdamW.step = train_step, opt_step
    try:
        run_plan(cfg, resume="overwrite", in_process=True)
    finally:
        loop.StageRunner.train_step, torch.optim.AdamW.step = orig_step, orig_opt
    return records


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--prepared-root", default=str(Path(tempfile.gettempdir()) / "kcpt-syncs-prepared"))
    p.add_argument("--json")
    args = p.parse_args()
    recs = per_step_syncs(Path(args.prepared_root), Path(tempfile.mkdtemp(prefix="kcpt-syncs-")), steps=args.steps,
                          eval_every=args.eval_every, grad_accum=args.grad_accum, extra=args.set)
    for r in recs:
        print(f"step {r['step']:>3}: {r['total']} syncs  {r['kinds']}")
    print(f"max per step: {max(r['total'] for r in recs)}  (grad_accum {args.grad_accum}, KL on raw micro-batches)")
    if args.json:
        Path(args.json).write_text(json.dumps(recs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
