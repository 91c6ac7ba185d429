"""The stage loop: one function, run by every Ray Train worker, that trains every stage of the plan.

A stage is data (:class:`~kcpt.config.StageConfig`); CPT, stage 1, stage 2 and stage 3 differ only in their
sources, losses, KL weight, eval sets and stop rule. The backend (DDP or DeepSpeed) is behind
:class:`~kcpt.train.engine.Engine`: this file has no backend branch.

One optimizer step (:meth:`StageRunner.train_step`): the ``grad_accum`` micro-batches of the step are drawn
first — all from ONE source chosen by the :class:`~kcpt.train.mixture.MixtureSampler` at the current step,
seeded identically on every rank, so that every layout of the step's rows (workers × ``grad_accum``) trains
the same — and the step's token counts are known before any backward:
``N_ce`` = targets (labels ≠ -100, after the causal shift) and ``N_kl`` = targets of replay micro-batches, both
summed over every micro-batch and all-reduced over ranks. The optimizer then minimises exactly

    Σ CE_sum / N_ce  +  β · Σ KL_sum / N_kl          (sums over the step's micro-batches on all ranks)

— the token mean of one big batch, whatever ``grad_accum`` and the world size (KL(p_ref ‖ p_θ) only on
replay sources, β = ``stage.kl_beta``). The LR is :func:`~kcpt.train.schedule.lr_at` of the step times the
rollback scale. After the update the anomaly rule (on the all-reduced objective and the global grad norm) may
roll the engine back to its last rollback point and lower the LR scale. Every ``eval_every`` steps: raw val
loss (+ exam val loss), both token-weighted over all ranks; the stop rule; metrics; a checkpoint.

A stage ends on its stop rule or ``max_steps``; the next stage starts from the checkpoint its ``start_from``
picks among the previous stage's (best, Pareto-front ends, knee, last), restored ``weights_only`` or ``full``.
Resume: a replacement worker group (``FailureConfig``) or a new ``run_plan`` on the same run dir loads the
last checkpoint (weights, engine state, data cursors, sampler, stop + anomaly state, plan state, every rank's
RNG) and continues exactly where it was. A deterministic abort (too many rollbacks) ends the run once: it is
written to ``aborted.json`` and the launcher raises it — it is not a worker failure to retry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kcpt.config import KcptConfig, StageConfig
from kcpt.console import Throttle, eval_line  # noqa: F401 - eval_line: re-exported
from kcpt.data.shards import fetch_prepared
from kcpt.errors import ConfigError, TrainingAborted
from kcpt.model.attention import model_inputs
from kcpt.model.loading import autocast, compile_layers, load_causal_lm
from kcpt.train import checkpoint as ckpt_lib
from kcpt.train import fused_loss, universal
from kcpt.train.anomaly import AnomalyDetector
from kcpt.train.batches import PackedRows, SourceBatches, eval_batches, full_labels, mapped_packed_rows
from kcpt.train.checkpoint import ENGINE_DIR
from kcpt.train.engine import (
    DS_TAG,
    DeepSpeedEngine,
    Engine,
    TorchEngine,
    all_reduce_,
    barrier,
    deepspeed_config,
    engine_kind,
    frozen_reference,
    gathered_head,
    make_adamw,
    rank_world,
)
from kcpt.train.evaluation import eval_loss, ppl
from kcpt.train.faults import FaultInjector
from kcpt.train.handoff import handoff_candidates, keep_list
from kcpt.train.layout import PaddingBatches, step_layout
from kcpt.train.losses import kl_to_reference_sum, token_ce_sum
from kcpt.train.mixture import MixtureSampler
from kcpt.train.plan import (  # noqa: F401 - re-exported: the plan-level helpers live in the light module
    check_baselines,
    datasets_needed,
    expected_manifest,
    loss_kinds,
    replay_sources,
    stage_sources,
)
from kcpt.train.ray_stream import RayDataBatches, shard_paths
from kcpt.train.rundir import RunDir, ScalarLogger
from kcpt.train.schedule import lr_at
from kcpt.train.stopping import NO_GAIN, StopDecision, StopState, baseline_of, record_start, update_stop
from kcpt.train.streams import ShardReader, StreamBatches
from kcpt.train.worker_errors import run_recording

log = logging.getLogger(__name__)

METRIC_KEYS = ("stage", "step", "tokens_seen", "train_loss", "raw_val_loss", "raw_val_ppl", "exam_val_loss",
               "exam_acc", "exam_em", "exam_f1", "kl", "grad_norm", "lr", "tokens_per_s", "gate_ok", "gate_streak",
               "raw_ratio")
"""Keys every eval record carries (besides ``train_loss_<source>``, ``rollbacks``, ``checkpoint``, ...)."""

POINTER_FILE = "kcpt_checkpoint.json"
"""The Ray Train checkpoint is a pointer to the kcpt checkpoint in the run directory (no second copy)."""


# --------------------------------------------------------------------------- plan state


@dataclass
class PlanState:
    """What carries from one stage to the next (and is checkpointed with every trainer state)."""

    stage_order: list[str]
    stage_pos: int = 0
    baseline_raw_best: float | None = None
    best: dict[str, str | None] = field(default_factory=dict)
    """Stage name → its best checkpoint path."""
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    cpt_best: str | None = None
    """Best checkpoint of the (last) stage that ``sets_baseline``: the default KL reference."""
    start_from: str | None = None
    """Checkpoint the current stage starts from (chosen from the previous stage, or the run's init checkpoint)."""
    handoff: dict[str, dict[str, str | None]] = field(default_factory=dict)
    """Stage name → ``start_from`` choice → checkpoint (see :func:`kcpt.train.handoff.handoff_candidates`)."""
    fronts: dict[str, list[str]] = field(default_factory=dict)
    """Stage name → checkpoints on its (raw, exam) Pareto front (kept on disk)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanState:
        return cls(**d)


class Interval:
    """Training statistics between two evals, as device tensors (reduced over ranks once, at the eval)."""

    def __init__(self, sources: list[str], device: torch.device) -> None:
        self.sources = sources
        # [objective sum over accepted steps, accepted steps, KL sum, KL positions, grad-norm sum, grad-norm max]
        self.acc = torch.zeros(6, dtype=torch.float64, device=device)
        # per source: [CE sum, CE tokens] (this rank's; all-reduced at the eval)
        self.src = torch.zeros(len(sources), 2, dtype=torch.float64, device=device)
        self.tokens = 0
        self.seconds = 0.0

    def summary(self) -> dict[str, Any]:
        src = all_reduce_(self.src.clone()).tolist()
        acc = self.acc.tolist()
        steps = acc[1]
        out: dict[str, Any] = {
            "train_loss": acc[0] / steps if steps else None,
            "kl": acc[2] / acc[3] if acc[3] else None,
            "grad_norm": acc[4] / steps if steps else None,
            "grad_norm_max": acc[5] if steps else None,
            "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else None,
            # label positions (≠ -100) of the interval's micro-batches, every rank (as train_loss_<source>);
            # tokens_seen counts every row position, padding and prompts included
            "label_tokens": sum(n for _, n in src),
        }
        for s, (total, n) in zip(self.sources, src, strict=True):
            out[f"train_loss_{s}"] = total / n if n else None
        return out


@dataclass
class StageRun:
    """Everything one stage holds while it runs (checkpointed through :meth:`StageRunner.trainer_state`)."""

    stage: StageConfig
    engine: Engine
    ref: torch.nn.Module | None
    streams: dict[str, SourceBatches | StreamBatches | RayDataBatches | PaddingBatches]
    sampler: MixtureSampler
    detector: AnomalyDetector
    faults: FaultInjector
    sources: list[str]
    replay: set[str]
    stop_state: StopState = field(default_factory=StopState)
    decision: StopDecision | None = None
    step: int = 0
    tokens_seen: int = 0
    lr_scale: float = 1.0
    good_steps: int = 0
    tokens_to_gate: int | None = None
    """``tokens_seen`` at the eval where the gate first held ``stop.consecutive`` evals in a row (None: not yet)."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Per eval with a checkpoint: ``{step, raw, exam, checkpoint}`` (Pareto front and hand-off)."""

    @property
    def saved(self) -> dict[int, str]:
        """Eval step → checkpoint saved at it."""
        return {int(e["step"]): e["checkpoint"] for e in self.evals}


# --------------------------------------------------------------------------- helpers


def _checkpoint_step_key(state: dict[str, Any]) -> tuple[int, int]:
    return int(state["plan"]["stage_pos"]), int(state["step"])


def _broadcast(obj: Any) -> Any:
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _gather(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


# --------------------------------------------------------------------------- the token-weighted step


@dataclass
class StepSums:
    """What :func:`accumulate_step` returns (this rank's values; device tensors, nothing synced to the host)."""

    objective: torch.Tensor
    """This rank's share of the step objective (float64 scalar; all-reduce → the objective)."""
    kl_sum: torch.Tensor
    """This rank's KL sum over replay positions (float64 scalar)."""
    counts: torch.Tensor
    """``[N_ce, N_kl]`` of the whole step, already all-reduced (float64)."""
    ce: list[torch.Tensor]
    """Per micro-batch ``[CE sum, CE targets]`` (float64 [2])."""


def accumulate_step(engine: Engine, micro: list[tuple[dict[str, torch.Tensor], bool]], *,
                    ref: torch.nn.Module | None, kl_beta: float,
                    amp: Any = contextlib.nullcontext, ref_amp: Any = contextlib.nullcontext,
                    perturb: Any = None, fused: bool = False, chunk_tokens: int | None = None) -> StepSums:
    """Forward + backward of one optimizer step's micro-batches ``[(batch, with_kl), ...]`` (this rank's).

    Counts first: ``N_ce`` = targets of every micro-batch (labels ≠ -100 after the causal shift) and ``N_kl`` =
    targets of the ``with_kl`` ones, all-reduced over ranks; then each micro-batch backpropagates
    ``(CE_sum/N_ce + β·KL_sum/N_kl) · engine.grad_world``. Since the backends average gradients over ranks,
    the accumulated gradient is that of ``Σ CE/N_ce + β·Σ KL/N_kl`` over the step's rows on all ranks — one
    big batch's token mean. ``perturb(loss)`` (fault injection) may replace each micro-batch's loss.

    ``fused``: the losses come from the final hidden states in chunks (:mod:`kcpt.train.fused_loss`: no
    full-vocabulary logits, of the model or of the reference); else from the logits (:mod:`kcpt.train.losses`).
    Nothing here reads a device value on the host.
    """
    device = micro[0][0]["labels"].device
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for batch, kl in micro:
        n = (batch["labels"][:, 1:] != -100).sum()
        counts[0] += n
        if kl:
            counts[1] += n
    all_reduce_(counts)
    n_ce, n_kl = counts.clamp(min=1.0).float()
    objective = torch.zeros((), dtype=torch.float64, device=device)
    kl_total = torch.zeros((), dtype=torch.float64, device=device)
    ce_parts = []
    if fused and ref is not None and not fused_loss.has_loss_head(ref):
        raise TypeError("the fused loss needs the KL reference's final hidden states: pass a LossHeadLM "
                        "(kcpt.train.engine.frozen_reference), not the bare LM")
    for i, (batch, kl) in enumerate(micro):
        attn: dict[str, Any] = {}  # packed attention inputs, built once per micro-batch (model and reference)
        with engine.accumulate(last=i == len(micro) - 1):
            if fused:
                spec: dict[str, Any] = {"labels": batch["labels"], "ce_scale": 1.0 / n_ce,
                                        "chunk_tokens": chunk_tokens}
                ref_ctx: Any = contextlib.nullcontext()
                if kl:
                    assert ref is not None
                    with torch.no_grad(), ref_amp():
                        spec["ref_hidden"] = ref(**model_inputs(ref, batch, attn), kcpt_hidden=True)
                    ref_ctx = gathered_head(ref)
                with ref_ctx as ref_w:
                    if kl:
                        spec.update(ref_weight=ref_w, kl_scale=kl_beta / n_kl)
                    with amp():
                        loss, ce_sum, ce_n, kl_sum = engine.forward_loss(batch, spec, attn)
                if kl:
                    kl_total += kl_sum.detach()
            else:
                with amp():
                    logits = engine.forward(batch, attn)
                ce_sum, ce_n = token_ce_sum(logits, batch["labels"])
                loss = ce_sum / n_ce
                if kl:
                    assert ref is not None
                    with torch.no_grad(), ref_amp():
                        ref_logits = ref(**model_inputs(ref, batch, attn)).logits
                    kl_sum, _ = kl_to_reference_sum(logits, ref_logits, batch["labels"])
                    loss = loss + kl_beta * kl_sum / n_kl
                    kl_total += kl_sum.detach()
            if perturb is not None:
                loss = perturb(loss)
            engine.backward(loss * engine.grad_world)
        objective += loss.detach()
        ce_parts.append(torch.stack([ce_sum.detach().double(), ce_n.double()]))
    return StepSums(objective=objective, kl_sum=kl_total, counts=counts, ce=ce_parts)


# --------------------------------------------------------------------------- sessions


class RaySession:
    """Reports to Ray Train (with a checkpoint: a pointer into the run dir, for Ray's and Tune's bookkeeping)."""

    def dataset_shard(self, name: str) -> Any:
        """This worker's ``DataIterator`` of the trainer's dataset ``name`` (``data.loader: ray_data``)."""
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict[str, Any], ckpt_path: str | None, rank: int) -> None:
        import ray.train

        if ckpt_path is not None and rank == 0:
            with tempfile.TemporaryDirectory(prefix="kcpt-ptr-") as d:
                (Path(d) / POINTER_FILE).write_text(json.dumps({"path": ckpt_path}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


class LocalSession:
    """No Ray Train: one worker in this process (``run_plan(in_process=True)``: debugging, fast wiring tests, and a
    Tune trial at world size 1 in its own actor). ``on_report(metrics, checkpoint_path)``, when given, receives each
    report as it is made (rank 0's flat eval metrics; the checkpoint's path once it is complete, else None)."""

    def __init__(self, on_report: Callable[[dict[str, Any], str | None], None] | None = None) -> None:
        self.reports: list[dict[str, Any]] = []
        self._on_report = on_report

    def dataset_shard(self, name: str) -> Any:
        """No trainer datasets in-process: ``data.loader: ray_data`` reads like ``stream`` here."""
        return None

    def report(self, metrics: dict[str, Any], ckpt_path: str | None, rank: int) -> None:
        self.reports.append(dict(metrics, checkpoint=ckpt_path))
        if self._on_report is not None:
            self._on_report(metrics, ckpt_path)


# --------------------------------------------------------------------------- the worker


class StageRunner:
    """Everything one worker holds while running the plan."""

    def __init__(self, config: dict[str, Any], session: RaySession | LocalSession | None = None) -> None:
        self.cfg = KcptConfig.model_validate(config["cfg"])
        self.config = config
        self.session = session or RaySession()
        self.rank, self.world = rank_world()
        self.layout = step_layout(self.cfg, self.world)
        """How each step's micro-batches lie on this world (elastic runs: :mod:`kcpt.train.layout`)."""
        self.device = self._device()
        self.use_fused = self.cfg.train.fused_loss
        """``train.fused_loss``, unless the model's logits are more than ``hidden @ head.T`` (:meth:`build_engine`)."""
        self.run_dir = RunDir(config["run_dir"])
        stale = self.run_dir.drop_stale_node_copies()
        if stale:
            log.info("freed %.1f MB of this run's copies left in node scratch by a Ray node that is gone", stale / 1e6)
        if self.rank == 0:
            self.run_dir.pull()  # a run directory at a URI: this node's mirror starts from the published files
        # prepared datasets given as URIs: the memory loader downloads them once per node (file lock) into
        # node-local scratch; the stream loader fetches manifest + tokenizer only and reads shards from the URI
        self.streaming = self.cfg.data.loader in ("stream", "ray_data")
        self.prepared: dict[str, str] = {k: str(fetch_prepared(v, shards=not self.streaming))
                                         for k, v in config["prepared"].items()}
        # the driver's console (kcpt.console.console_feed): rank 0 sends it stage/progress/eval events
        self.feed = config.get("console") if self.rank == 0 else None
        self._progress_due = Throttle()
        self.ds_config = (deepspeed_config(self.cfg, grad_accum=self.layout.grad_accum)
                          if self.cfg.train.deepspeed is not None else None)
        self._hf_ds = None
        if self.ds_config is not None and self.ds_config["zero_optimization"]["stage"] == 3:
            # from_pretrained then builds the model partitioned (zero.Init) instead of whole on every rank
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(self.ds_config)
        # DeepSpeed casts the module and keeps its own fp32 master weights; otherwise autocast the forwards.
        self.amp = (contextlib.nullcontext if self.ds_config is not None
                    else lambda: autocast(self.cfg.model, self.device))
        self.rows: dict[str, PackedRows] = {}
        self.eval_cache: dict[str, list[dict[str, torch.Tensor]]] = {}
        self.exam_item_cache: dict[str, list[Any] | None] = {}
        self.tokenizer = self._load_tokenizer()
        self._expected: dict[str, Any] | None = None
        # asynchronous checkpoints (train.async_checkpoint): host copy buffers, the write in flight, the Ray
        # report that names it (sent once it is complete: join_checkpoint)
        self._host_snapshot = ckpt_lib.HostSnapshot()
        self._write_pending = False
        self._held_report: tuple[dict[str, Any], str | None] | None = None
        self._writer_faults: FaultInjector | None = None
        # every rank's torch RNG starts from (seed, rank): dropout is reproducible run to run
        torch.manual_seed(self.cfg.train.seed * 1000 + self.rank)

    # ----------------------------------------------------------------- setup
    def _device(self) -> torch.device:
        if self.cfg.train.use_gpu and torch.cuda.is_available():
            if isinstance(self.session, LocalSession):  # in-process: this process's current GPU
                torch.cuda.set_device(torch.cuda.current_device())
                return torch.device("cuda", torch.cuda.current_device())
            import ray.train.torch

            dev = ray.train.torch.get_device()
            torch.cuda.set_device(dev)
            return dev
        torch.set_num_threads(max(1, int(self.cfg.train.cpus_per_worker)))
        return torch.device("cpu")

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        first = Path(next(iter(self.prepared.values())))
        tok_dir = first / "tokenizer"
        if not tok_dir.is_dir() and (first / "manifest.json").is_file():
            tok_dir = Path(json.loads((first / "manifest.json").read_text()).get("tokenizer_dir") or tok_dir)
        if tok_dir.is_dir():
            return AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=self.cfg.model.trust_remote_code)
        from kcpt.model.tokenizer import load_tokenizer

        return load_tokenizer(self.cfg.tokenizer, trust_remote_code=self.cfg.model.trust_remote_code)

    def rows_of(self, name: str) -> PackedRows:
        if name not in self.rows:
            self.rows[name] = mapped_packed_rows(self.prepared[name], name=name, seq_len=self.cfg.data.seq_len)
        return self.rows[name]

    def reader_of(self, name: str) -> ShardReader:
        return ShardReader(self.config["prepared"][name], seq_len=self.cfg.data.seq_len, name=name)

    def stream_of(self, name: str, kind: str,
                  batch_size: int) -> SourceBatches | StreamBatches | RayDataBatches | PaddingBatches:
        """This rank's batches (``batch_size`` rows each) of training source ``name`` under ``data.loader``;
        ``kind`` its loss (``full`` on an exam source rebuilds the labels from ``input_ids``). The loaders split
        each epoch over the layout's reading ranks; a spare rank gets padding micro-batches."""
        t = self.cfg.train
        if not self.layout.reads(self.rank):
            return PaddingBatches(name, batch_size=batch_size, seq_len=self.cfg.data.seq_len, device=self.device)
        readers = self.layout.active
        relabel = kind == "full" and self.cfg.data.datasets[name].kind == "exam"
        shard = self.session.dataset_shard(name) if self.cfg.data.loader == "ray_data" else None
        if shard is not None:
            return RayDataBatches(shard, name=name, rank=self.rank, world=readers, batch_size=batch_size,
                                  seed=t.seed, shuffle_rows=self.cfg.data.stream_window_rows,
                                  source_rows=shard_paths(self.config["prepared"][name])[1], device=self.device,
                                  transform=(lambda a: (a[0], a[1], full_labels(*a))) if relabel else None,
                                  on_stall=self.tell)
        if self.streaming:
            return StreamBatches(self.reader_of(name), rank=self.rank, world=readers,
                                 batch_size=batch_size, seed=t.seed,
                                 window_rows=self.cfg.data.stream_window_rows, device=self.device,
                                 transform=(lambda a: (a[0], a[1], full_labels(*a))) if relabel else None)
        rows = self.rows_of(name)
        if relabel:
            rows = PackedRows(rows.name, rows.input_ids, rows.position_ids,
                              full_labels(rows.input_ids, rows.position_ids, rows.labels))
        return SourceBatches(rows, rank=self.rank, world=readers, batch_size=batch_size, seed=t.seed,
                             device=self.device)

    def eval_rows(self, name: str) -> PackedRows:
        """An eval set's rows: under the stream loader only the first ``train.max_eval_rows`` are read."""
        if self.streaming:
            reader = self.reader_of(name)
            cap = self.cfg.train.max_eval_rows
            return reader.head(reader.rows if cap is None else cap)
        return self.rows_of(name)

    def eval_set(self, name: str) -> list[dict[str, torch.Tensor]]:
        if name not in self.eval_cache:
            self.eval_cache[name] = eval_batches(self.eval_rows(name), rank=self.rank, world=self.world,
                                                 batch_size=self.cfg.train.eval_batch_size,
                                                 max_rows=self.cfg.train.max_eval_rows, device=self.device)
        return self.eval_cache[name]

    def exam_items(self, name: str) -> list[Any] | None:
        """This rank's share of the held-out exam items of eval set ``name`` (the prepared dataset's
        ``items.jsonl``, fetched with its manifest on every node; capped at ``eval.exam_accuracy_max_items``);
        None, with a warning, for a dataset prepared before kcpt wrote items (prepare it again)."""
        if name not in self.exam_item_cache:
            from kcpt.data.exam_io import ITEMS_FILE, read_items_file
            from kcpt.eval.exam_scoring import check_items, rank_slice

            path = Path(self.prepared[name]) / ITEMS_FILE
            if not path.is_file():
                if self.rank == 0:
                    log.warning("eval set %s has no %s (prepared by an older kcpt): no exam accuracy; prepare it "
                                "again", name, ITEMS_FILE)
                self.exam_item_cache[name] = None
            else:
                items = read_items_file(path)
                check_items(items)  # every rank checks every item: an error is raised on all ranks together
                self.exam_item_cache[name] = rank_slice(items, self.rank, self.world,
                                                        self.cfg.eval.exam_accuracy_max_items)
        return self.exam_item_cache[name]

    def exam_accuracy(self, module: torch.nn.Module, name: str) -> dict[str, float | int | None]:
        """``exam_acc`` / ``exam_em`` / ``exam_f1`` (+ item counts) of eval set ``name`` over all ranks: each rank
        scores its disjoint share (:func:`kcpt.eval.exam_scoring.score_exam`, collective), the results are
        gathered. Empty when ``eval.exam_accuracy`` is off or the set has no items file."""
        items = self.exam_items(name) if self.cfg.eval.exam_accuracy else None
        if items is None:
            return {}
        from kcpt.eval.exam_scoring import gather_scores, score_exam

        ev = self.cfg.eval
        local = score_exam(module, self.tokenizer, items, self.cfg.data.template, device=self.device,
                           batch_size=ev.exam_batch_size or self.cfg.train.eval_batch_size,
                           max_new_tokens=ev.exam_max_new_tokens,
                           length_norm=ev.exam_length_norm)
        s = gather_scores(local)
        return {"exam_acc": s.accuracy, "exam_em": s.exact_match, "exam_f1": s.f1, "exam_items_mc": s.n_mc,
                "exam_items_short": s.n_short}

    def load_model(self, path: str | None, *, trained: bool = True) -> torch.nn.Module:
        """A trained model keeps float32 master weights (autocast / DeepSpeed give the compute dtype);
        a frozen reference is stored in the compute dtype. Under ZeRO-3 a model loaded from a directory comes
        back partitioned (HfDeepSpeedConfig); the built-in tiny model is built whole (it is tiny)."""
        from kcpt.model.tokenizer import pad_token_id

        model_dir = ckpt_lib.model_dir(ckpt_lib.fetch(path, engine=False)) if path is not None else None
        model = load_causal_lm(self.cfg.model, vocab_size=len(self.tokenizer), path=model_dir,
                               pad_token_id=pad_token_id(self.tokenizer), eos_token_id=self.tokenizer.eos_token_id,
                               dtype=torch.float32 if trained else None)
        if trained and self.cfg.train.compile:  # not with ZeRO-3: refused when the config loads
            compile_layers(model)
        if self._hf_ds is None:
            return model.to(self.device)
        if model_dir is not None and not any(hasattr(p, "ds_id") for p in model.parameters()):
            raise RuntimeError(f"ZeRO-3: {model_dir} was loaded whole, not partitioned (HfDeepSpeedConfig not seen by "
                               "transformers)")
        return model

    def build_engine(self, model: torch.nn.Module, stage: StageConfig) -> Engine:
        t = self.cfg.train

        def optimizer(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            return make_adamw(groups, lr=stage.lr.peak, betas=tuple(t.adam_betas), fused=t.fused_optimizer)

        kernel = fused_loss.resolve_kernel(t.fused_loss_kernel, self.device)  # ConfigError before any step
        why = fused_loss.unfused_reason(model)
        self.use_fused = t.fused_loss and why is None
        if t.fused_loss and why is not None and self.rank == 0:
            log.warning("stage %s: train.fused_loss is off for this model: %s, which the fused loss leaves out; "
                        "the losses come from the model's logits", stage.name, why)
        if self.ds_config is not None:
            key = f"{abs(hash(str(self.run_dir.root.resolve()))):x}-{stage.name}-{os.getpid()}"
            key = _broadcast(key)
            ds_config = deepspeed_config(self.cfg, micro_batch=self.cfg.micro_batch(stage),
                                         grad_accum=self.layout.grad_accum)
            return DeepSpeedEngine(model, optimizer, ds_config=ds_config, weight_decay=t.weight_decay,
                                   scratch_key=key, loss_kernel=kernel)
        return TorchEngine(model, optimizer, clip=t.clip_grad_norm, weight_decay=t.weight_decay, device=self.device,
                           loss_kernel=kernel)

    def reference_model(self, stage: StageConfig, plan: PlanState) -> torch.nn.Module | None:
        if stage.kl_beta <= 0:
            return None
        path: str | None = None
        if stage.kl_reference == "cpt_best":
            path = plan.cpt_best or self.config.get("reference_checkpoint")
            if path is None:
                path = self.config.get("init_checkpoint")
                if path is None:
                    raise ConfigError(f"stage '{stage.name}': kl_reference 'cpt_best' but no stage of this run set "
                                      "a baseline and no reference/init checkpoint was given; use "
                                      "kl_reference: base or pass reference_checkpoint")
                log.warning("stage %s: no CPT best in this run; the KL reference is the init checkpoint %s",
                            stage.name, path)
        return frozen_reference(self.load_model(path, trained=False), self.cfg)

    # ----------------------------------------------------------------- checkpoint I/O
    def checkpoint_path(self, plan: PlanState, stage: StageConfig, step: int) -> Path:
        return self.run_dir.checkpoints / f"{plan.stage_pos:02d}-{stage.name}-step{step:06d}"

    def expected_manifest(self) -> dict[str, Any]:
        if self._expected is None:
            self._expected = expected_manifest(self.cfg, {k: Path(v) for k, v in self.prepared.items()})
        return self._expected

    def save(self, run: StageRun, plan: PlanState, state: dict[str, Any], metrics: dict[str, Any]) -> str:
        """Collective: every rank writes its engine state into its node's staging dir (rank 0's, when they share a
        filesystem), then rank 0 publishes the checkpoint ``checkpoints/<pos>-<stage>-step<k>`` atomically (at a
        URI: ranks on other nodes upload their own files first, rank 0 the rest with the manifest last); every
        rank gets the checkpoint's ref (path or URI)."""
        path = self.checkpoint_path(plan, run.stage, run.step)
        rank0_staging = _broadcast(str(ckpt_lib.staging_path(path)) if self.rank == 0 else None)
        staging = path.parent / Path(rank0_staging).name  # this node's mirror (== rank 0's on a shared FS)
        shared = str(staging) == rank0_staging
        if self.rank == 0:
            if self.run_dir.remote is not None:
                self.run_dir.retract_checkpoint(path.name)  # a re-save: never complete while half replaced
            staging.mkdir(parents=True)
        barrier()
        if not shared:
            staging.mkdir(parents=True, exist_ok=True)
        write_async = self.cfg.train.async_checkpoint and run.engine.async_state
        if write_async:
            engine_state = run.engine.state_snapshot()  # rank 0's (live references; copied to the host below)
        else:
            run.engine.save_state(staging / ENGINE_DIR)
        state["rng_per_rank"] = _gather(ckpt_lib.capture_rng_state())
        uploaded: dict[str, int] = {}
        sums: dict[str, str] = {}
        if not shared and self.run_dir.remote is not None:  # another node: publish what this rank wrote
            files = [f for f in staging.rglob("*") if f.is_file()]
            uploaded = {f.relative_to(staging).as_posix(): f.stat().st_size for f in files}
            if self.cfg.train.checkpoint_checksums:  # rank 0's manifest lists them: their checksums too
                sums = {f.relative_to(staging).as_posix(): ckpt_lib.file_crc32(f) for f in files}
            self.run_dir.remote.upload_tree(staging, f"checkpoints/{path.name}")
            shutil.rmtree(staging, ignore_errors=True)
        gathered = _gather((uploaded, sums))
        extra = {k: v for d, _ in gathered for k, v in d.items()}
        extra_sums = {k: v for _, d in gathered for k, v in d.items()}
        module = run.engine.module
        gather = contextlib.nullcontext()
        if self.ds_config is not None and self.ds_config["zero_optimization"]["stage"] == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        with gather:
            if self.rank == 0:
                manifest = ckpt_lib.build_manifest(
                    **self.expected_manifest(), base_model=self.cfg.model.name_or_path,
                    restore_mode=run.stage.restore, step=run.step, stage=run.stage.name,
                    stage_index=plan.stage_pos, metrics=metrics, engine=engine_kind(self.ds_config))
                if write_async:
                    self._write_async(run, path, staging, state, manifest, engine_state, extra, extra_sums)
                else:
                    ckpt_lib.save_checkpoint(path, model=module, tokenizer=self.tokenizer, trainer_state=state,
                                             manifest=manifest, staging=staging, include_rng=False,
                                             extra_files=extra, checksums=self.cfg.train.checkpoint_checksums,
                                             extra_checksums=extra_sums)
                    # at a URI: uploaded by a background thread while training goes on (joined at the next eval,
                    # the end of the stage and of the run); visible once its manifest, sent last, is there
                    self.run_dir.publish_checkpoint(path.name, keep_remote=set(extra), background=True)
        barrier()
        self._write_pending = write_async
        return self.run_dir.checkpoint_ref(path.name)

    def _write_async(self, run: StageRun, path: Path, staging: Path, state: dict[str, Any],
                     manifest: dict[str, Any], engine_state: Any, extra: dict[str, int],
                     extra_sums: dict[str, str]) -> None:
        """Rank 0: copy weights, optimizer and trainer state to the host (the only part the next training steps
        wait for), then write + fsync + verify + publish them in the run directory's writer thread
        (:meth:`RunDir.write_checkpoint_async`; joined by :meth:`join_checkpoint`)."""
        module, tokenizer = run.engine.module, self.tokenizer
        snap = self._host_snapshot.take({"model": ckpt_lib.unwrap_model(module).state_dict(),
                                         "engine": engine_state, "state": ckpt_lib.to_safe_state(state)})
        gate = run.faults.checkpoint_write_gate(run.step, path)
        self._writer_faults = run.faults

        def write() -> None:
            data = snap.wait()
            gate()
            run.engine.write_state(data["engine"], staging / ENGINE_DIR)
            ckpt_lib.save_checkpoint(path, model=module, tokenizer=tokenizer, trainer_state=data["state"],
                                     manifest=manifest, staging=staging, include_rng=False, extra_files=extra,
                                     save_model_fn=ckpt_lib.state_dict_saver(data["model"]),
                                     checksums=self.cfg.train.checkpoint_checksums, extra_checksums=extra_sums)

        self.run_dir.write_checkpoint_async(path.name, write, keep_remote=set(extra))

    def join_checkpoint(self) -> None:
        """Collective: wait for the checkpoint write in flight (rank 0's writer thread; its failure is raised
        here, naming the checkpoint), then send Ray the report held back until that checkpoint was complete.
        Called at each eval, at the stage end and when the plan ends."""
        if self._writer_faults is not None:
            self._writer_faults.release_writes()
        if self.rank == 0:
            self.run_dir.wait_published()
        self._write_pending = False
        held, self._held_report = self._held_report, None
        if held is not None:
            self.session.report(*held, self.rank)

    # ----------------------------------------------------------------- the plan
    def run(self) -> None:
        """Run the plan; a deterministic abort is recorded in ``aborted.json`` and ends the run cleanly."""
        try:
            self._run_plan()
        except TrainingAborted as e:
            if self.rank == 0:
                if self._writer_faults is not None:
                    self._writer_faults.release_writes()
                self.run_dir.wait_published()
                self.run_dir.write_aborted(str(e))
            barrier()
            self._drop_local_checkpoints()
        except BaseException:
            # a write in flight still completes (a good checkpoint to resume from); its own error is secondary
            if self._writer_faults is not None:
                self._writer_faults.release_writes()
            if self.rank == 0:
                with contextlib.suppress(Exception):
                    self.run_dir.wait_published()
            raise
        else:
            self._drop_local_checkpoints()

    def _drop_local_checkpoints(self) -> None:
        """After the plan (every rank past its last barrier): free this node's copies of the run's checkpoints when
        the run directory is a URI (:meth:`RunDir.drop_local_checkpoints`). A failed attempt keeps them: the
        retried worker group on this node resumes from them without a download."""
        freed = self.run_dir.drop_local_checkpoints()
        if freed:
            log.info("rank %d freed %.1f MB of this node's copies of checkpoints published at %s", self.rank,
                     freed / 2**20, self.run_dir.location)

    def _restore_checkpoint_record(self, state: dict[str, Any], ref: str, local: Path) -> None:
        """The eval record of the checkpoint a run resumes from, when ``metrics.jsonl`` lost it (a last line cut
        short by a kill, which reading skips): put back from the checkpoint's manifest, with a warning."""
        key = (state["stage"], state["step"])
        if any((r.get("stage"), r.get("step")) == key for r in self.run_dir.read_metrics()):
            return
        saved = ckpt_lib.read_manifest(local, check_files=False).get("metrics")
        if not isinstance(saved, dict) or not saved:
            return
        self.run_dir.append_metrics({**saved, "stage": state["stage"], "step": state["step"], "checkpoint": ref})
        log.warning("%s lacked the record of the checkpoint it resumes from (%s): put back from its manifest",
                    self.run_dir.metrics_path.name, ref)

    def _run_plan(self) -> None:
        t = self.cfg.train
        if t.min_workers is not None and self.world != t.num_workers and self.rank == 0:
            self.tell(self.layout.describe(t.num_workers))
        plan = PlanState(stage_order=list(self.config["stages"]),
                         baseline_raw_best=self.config.get("baseline_raw_best"),
                         start_from=self.config.get("init_checkpoint"))
        # the run directory is the source of truth: its most advanced checkpoint (complete by construction) is
        # where a replaced worker group continues — Ray registers reported checkpoints asynchronously, so its own
        # "latest" can lag behind a checkpoint written just before a node died
        latest = self.run_dir.latest_checkpoint(plan.stage_order)
        resume_path = latest if latest is not None else self.config.get("resume_from")
        resume_state: dict[str, Any] | None = None
        if resume_path is not None:
            fetched = ckpt_lib.fetch(resume_path, engine=False)
            resume_state = ckpt_lib.load_trainer_state(fetched)
            moved = ckpt_lib.moved_prefixes(resume_state, str(resume_path))  # a copied or moved run directory
            if moved is not None:
                resume_state = ckpt_lib.reroot_paths(resume_state, *moved)
                log.warning("rank %d: the run directory was copied or moved from %s: its checkpoints are named where "
                            "they are now", self.rank, moved[0])
            plan = PlanState.from_dict(resume_state["plan"])
            if self.rank == 0:
                key = _checkpoint_step_key(resume_state)
                order = plan.stage_order
                self.run_dir.truncate_metrics(
                    lambda r: r.get("stage") not in order or (order.index(r["stage"]), r["step"]) <= key,
                    rewrite=None if moved is None else (lambda r: ckpt_lib.reroot_paths(r, *moved)))
                if moved is not None and self.run_dir.summary_path.is_file():
                    self.run_dir.write_summary(ckpt_lib.reroot_paths(self.run_dir.read_summary(), *moved))
                self._restore_checkpoint_record(resume_state, str(resume_path), fetched)
            log.info("rank %d resumes from %s", self.rank, resume_path)
            if latest is not None and latest != self.config.get("resume_from"):  # not where the run began: a restart
                why = ("a worker or its node died, or the elastic run resized" if self.cfg.train.min_workers
                       else "a worker or its node died; train.max_failures")
                self.emit({"kind": "line", "text": f"[{resume_state['stage']}] restarted after a failure ({why}): "
                           f"resuming from {latest}, step {resume_state['step']}"})
        elif self.rank == 0:
            # no checkpoint of this run yet: a restart before the first one (a replaced worker group, a retried task)
            # runs its evals again — the first attempt's records of these stages go
            order = plan.stage_order
            self.run_dir.truncate_metrics(lambda r: r.get("stage") not in order)
        while plan.stage_pos < len(plan.stage_order):
            stage = self.cfg.stage(plan.stage_order[plan.stage_pos])
            state = resume_state if resume_state is not None and resume_state["stage"] == stage.name else None
            self.run_stage(stage, plan, resume_path if state is not None else None, state)
            resume_state = None
            plan.stage_pos += 1
        barrier()

    def start_stage(self, stage: StageConfig, plan: PlanState, resume_path: str | None,
                    resume: dict[str, Any] | None) -> StageRun:
        """Model, engine, reference, streams and rule state of a stage: fresh, or exactly as a checkpoint left them."""
        t = self.cfg.train
        if stage.stop.needs_baseline and plan.baseline_raw_best is None:
            raise ConfigError(f"stage '{stage.name}': stop rule '{stage.stop.rule}' needs baseline_raw_best")
        if resume is None and plan.stage_pos > 0:
            prev = plan.stage_order[plan.stage_pos - 1]
            chosen = plan.handoff.get(prev, {}).get(stage.start_from)
            plan.start_from = chosen or plan.start_from
        kinds = loss_kinds(self.cfg, stage)
        sources = stage_sources(stage)
        start = resume_path if resume is not None else plan.start_from
        engine = self.build_engine(self.load_model(start), stage)
        streams = {s: self.stream_of(s, kinds[s], self.cfg.micro_batch(stage)) for s in sources}
        run = StageRun(
            stage=stage, engine=engine, ref=self.reference_model(stage, plan), streams=streams,
            sampler=MixtureSampler(stage.sources, seed=t.seed, schedule=stage.mixture_schedule,
                                   max_steps=stage.max_steps, mode=stage.mixture_mode),
            detector=AnomalyDetector(t.anomaly),
            faults=FaultInjector(t.faults, stage=stage.name, first_stage=plan.stage_order[0], rank=self.rank,
                                 markers=self.run_dir),
            sources=sources, replay=set(replay_sources(self.cfg, stage)))
        if resume is not None:
            run.step, run.tokens_seen = int(resume["step"]), int(resume["tokens_seen"])
            run.lr_scale, run.good_steps = float(resume["lr_scale"]), int(resume.get("good_steps", 0))
            run.tokens_to_gate = resume.get("tokens_to_gate")
            self.load_engine_state(engine, resume_path)
            for s, st in resume["sources"].items():
                streams[s].load_state_dict(st)
            run.sampler.load_state_dict(resume["mixture"])
            run.detector.load_state_dict(resume["anomaly"])
            run.stop_state = StopState.from_dict(resume["stop"])
            if resume.get("decision") is not None:
                run.decision = StopDecision(**resume["decision"])
            run.evals = list(resume.get("evals", []))
        elif stage.restore == "full" and plan.start_from is not None:
            if not self.load_engine_state(engine, plan.start_from, optional=True):  # optimizer moments
                log.warning("stage %s: restore full, but %s has no engine state; optimizer starts fresh",
                            stage.name, plan.start_from)
        engine.mark_stable(run.step)
        if resume is not None:
            rngs = resume.get("rng_per_rank") or []
            if len(rngs) == self.world:
                ckpt_lib.restore_rng_state(rngs[self.rank])
            elif rngs:
                log.warning("resume on %d workers from a checkpoint of %d: RNG states not restored",
                            self.world, len(rngs))
            before = step_layout(self.cfg, len(rngs)).active if rngs else self.layout.active
            if (self.cfg.data.loader == "ray_data" and self.cfg.train.min_workers is not None
                    and before != self.layout.active and self.rank == 0):  # (a fixed run's: said by the driver)
                line = (f"stage {stage.name}: data.loader ray_data splits each source's current epoch anew over "
                        f"{self.layout.active} reading worker{'s' if self.layout.active != 1 else ''} (the "
                        f"checkpoint's {before}): rows of it already read may come again, others wait for the next "
                        "epoch")
                self.tell(line)
        return run

    def load_engine_state(self, engine: Engine, ref: str, *, optional: bool = False) -> bool:
        """Load checkpoint ``ref``'s engine state (optimizer; ZeRO partitions) into ``engine`` (collective);
        ``optional``: a checkpoint without one is ``False``, not an error. ZeRO state written at another world size
        is converted once per node to its universal form (:mod:`kcpt.train.universal`), which every rank loads its
        new partition from; the converted copy is removed once all have."""
        saved = ckpt_lib.saved_zero_world(ref)
        if saved is None or saved == self.world:
            state = ckpt_lib.fetch(ref, rank=self.rank) / ENGINE_DIR
            if optional and not state.is_dir():
                return False
            engine.load_state(state)
            return True
        local = ckpt_lib.fetch(ref)  # every rank's partition
        if self.rank == 0:
            log.info("%s: ZeRO state of %d ranks re-partitioned for %d (universal checkpoint)", ref, saved, self.world)
        converted = universal.universal_dir(local, DS_TAG)
        engine.load_state(converted, universal=True)  # ends in a barrier: every rank has loaded
        shutil.rmtree(converted, ignore_errors=True)  # the node's ranks race: ignore_errors
        return True

    def run_stage(self, stage: StageConfig, plan: PlanState, resume_path: str | None,
                  resume: dict[str, Any] | None) -> None:
        run = self.start_stage(stage, plan, resume_path, resume)
        self.emit({"kind": "stage_start", "stage": stage.name, "step": run.step, "max_steps": stage.max_steps})
        tb = ScalarLogger(self.run_dir, stage.name, self.cfg.logging.tensorboard and self.rank == 0,
                          purge_step=run.step + 1 if resume is not None else None)
        interval = Interval(run.sources, self.device)
        if resume is None and self.cfg.train.eval_at_start:
            self.evaluate(run, plan, interval, tb, initial=True)
        run.engine.train()
        stopped = run.decision is not None and run.decision.stop
        ended = False
        try:
            while not stopped and run.step < stage.max_steps:
                run.step += 1
                self.train_step(run, interval)
                final = run.step >= stage.max_steps
                if run.step % stage.eval_every == 0 or final:
                    interval = self.evaluate(run, plan, interval, tb, final=final)
                    stopped = run.decision is not None and run.decision.stop
            ended = True
        finally:
            tb.close()
            # leaving on an error raised by this rank alone, another rank may wait in a collective of the step: no
            # barrier here (it hung both ranks under ZeRO-2), this process ends and Ray Train replaces the group
            run.engine.close(collective=ended)
            for s in run.streams.values():
                if isinstance(s, StreamBatches | RayDataBatches):
                    s.close()
        self.finish_stage(run, plan)

    # ----------------------------------------------------------------- one optimizer step
    def train_step(self, run: StageRun, interval: Interval) -> None:
        """One optimizer step of ``grad_accum`` micro-batches (:func:`accumulate_step`), the anomaly rule, the
        rollback point."""
        t, stage, engine = self.cfg.train, run.stage, run.engine
        run.faults.progress(run.step)
        run.faults.maybe_crash(run.step)
        t0 = time.perf_counter()
        # one source for the whole step, on every rank: the step's objective is then the same on every layout of
        # its micro-batches (a draw per micro-batch mixed sources inside a step only when grad_accum > 1, where
        # raw rows' ~250 targets outweigh an exam row's few in the token mean)
        src = run.sampler.sample(run.step - 1)
        kl = run.ref is not None and src in run.replay
        micro = [(src, run.streams[src].next(), kl) for _ in range(self.layout.grad_accum)]
        engine.set_lr(lr_at(run.step - 1, stage.max_steps, stage.lr, run.lr_scale))
        sums = accumulate_step(engine, [(b, kl) for _, b, kl in micro], ref=run.ref, kl_beta=stage.kl_beta,
                               amp=self.amp, ref_amp=lambda: autocast(self.cfg.model, self.device),
                               perturb=lambda loss: run.faults.perturb_loss(loss, run.step),
                               fused=self.use_fused, chunk_tokens=t.loss_chunk_tokens)
        for (src, _, _), ce in zip(micro, sums.ce, strict=True):
            interval.src[run.sources.index(src)] += ce
        grad_norm = engine.step().to(device=self.device, dtype=torch.float64)
        # objective and KL summed over ranks; the norm is already global: only rank 0 adds it (exact)
        reduced = all_reduce_(torch.stack([sums.objective, sums.kl_sum, grad_norm * float(self.rank == 0)]))
        obj, kl_total, norm = reduced.tolist()  # the step's one device→host sync (the anomaly rule needs them)
        reason = run.detector.check(obj, norm)
        if reason is not None:
            back_to = engine.rollback()
            run.lr_scale = run.detector.next_lr_scale(run.lr_scale)
            if self.rank == 0:
                log.warning("stage %s step %d: %s; rolled back to step %s, LR scale %g", stage.name, run.step,
                            reason, back_to, run.lr_scale)
            run.detector.record_rollback(reason)
        else:
            run.detector.accept(norm)
            run.good_steps += 1
            # interval sums stay on the device (read once, at the eval); KL positions of every step count,
            # 0 without replay micro-batches
            one = torch.ones((), dtype=torch.float64, device=self.device)
            interval.acc[:5] += torch.stack([reduced[0], one, reduced[1], sums.counts[1], reduced[2]])
            interval.acc[5] = torch.maximum(interval.acc[5], reduced[2])
            if run.good_steps % t.anomaly.stable_every == 0:
                engine.mark_stable(run.step)
        # row positions of the step's real micro-batches (a spare rank's padding is none)
        step_tokens = self.cfg.micro_batch(stage) * self.cfg.data.seq_len * self.layout.micro_batches
        run.tokens_seen += step_tokens
        interval.tokens += step_tokens
        interval.seconds += time.perf_counter() - t0
        if self.feed is not None and self.feed.wants_progress and self._progress_due():
            self.emit({"kind": "progress", "stage": stage.name, "step": run.step, "tokens": run.tokens_seen})

    # ----------------------------------------------------------------- eval, stop rule, checkpoint
    def evaluate(self, run: StageRun, plan: PlanState, interval: Interval, tb: ScalarLogger, *,
                 final: bool = False, initial: bool = False) -> Interval:
        """Raw (+ exam) val loss, the stop rule, metrics, and a checkpoint when due; returns a fresh interval."""
        stage, t = run.stage, self.cfg.train
        self.join_checkpoint()  # the previous eval's checkpoint (written while the steps ran) is complete
        module = run.engine.loss_module  # under ZeRO-3 the head weight is gathered in this wrapper's forward
        t0 = time.perf_counter()
        with self.amp():
            raw = eval_loss(module, self.eval_set(stage.eval_raw), self.device, fused=self.use_fused)["loss"]
            exam = (eval_loss(module, self.eval_set(stage.eval_exam), self.device, fused=self.use_fused)["loss"]
                    if stage.eval_exam else None)
        t1 = time.perf_counter()
        with self.amp():
            acc = self.exam_accuracy(run.engine.module, stage.eval_exam) if stage.eval_exam else {}
        timing = {"eval_loss_s": t1 - t0, "exam_acc_s": time.perf_counter() - t1 if acc else None}
        gate_exam = acc.get("exam_acc") if stage.stop.exam_metric == "accuracy" else exam
        if gate_exam is None and stage.stop.exam_metric == "accuracy" and stage.stop.rule in ("exam", "gate"):
            raise ConfigError(f"stage '{stage.name}': stop.exam_metric is accuracy, but eval set '{stage.eval_exam}' "
                              "gave no exam accuracy: it has no multiple-choice items (or no items.jsonl: prepare "
                              "it again). Use stop.exam_metric: loss or an eval_exam set with choices")
        d = None
        if initial:
            record_start(run.stop_state, raw=raw, exam=gate_exam)
        else:
            d = update_stop(run.stop_state, stage.stop, step=run.step, raw=raw, exam=gate_exam,
                            baseline_raw_best=plan.baseline_raw_best, final=final,
                            record={"exam_loss": exam, "exam_acc": acc.get("exam_acc")})
            run.decision = d
            if run.tokens_to_gate is None and stage.stop.rule == "gate" and d.gate_ok \
                    and d.gate_streak >= stage.stop.consecutive:
                run.tokens_to_gate = run.tokens_seen
        base = plan.baseline_raw_best
        metrics: dict[str, Any] = {
            "stage": stage.name, "step": run.step, "tokens_seen": run.tokens_seen, "workers": self.world,
            "raw_val_loss": raw, "raw_val_ppl": ppl(raw), "exam_val_loss": exam,
            "exam_acc": acc.get("exam_acc"), "exam_em": acc.get("exam_em"), "exam_f1": acc.get("exam_f1"),
            **{k: v for k, v in acc.items() if k.startswith("exam_items")}, **timing,
            "eval_raw": stage.eval_raw, "eval_exam": stage.eval_exam,
            "lr": None if initial else run.engine.lr,  # the LR of the step before (none at the stage's start)
            **interval.summary(),
            # the gate (raw bound AND exam done) of an exam or gate stage; a plateau / max_steps stage has none
            "gate_ok": d.gate_ok if d and stage.stop.rule in ("exam", "gate") else None,
            "gate_streak": d.gate_streak if d else 0,
            "raw_ratio": raw / base if base else None, "baseline_raw_best": base,
            "rollbacks": run.detector.rollbacks, "lr_scale": run.lr_scale,
            "epoch": {s: round(b.epoch, 4) for s, b in run.streams.items()},
            "host_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "stop": d.stop if d else False, "stop_reason": d.reason if d else "",
            "new_best": d.new_best if d else False,
            "tokens_to_gate": run.tokens_to_gate, "plan_tokens_to_gate": self.plan_tokens(plan, run.tokens_to_gate),
        }
        ckpt_path = None
        on_front = d is not None and _joins_front(run.evals, raw, exam)
        # weights whose eval is not finite (e.g. from a damaged optimizer state) never become the newest
        # checkpoint: a resume would take them, and every later one would fail the same way
        finite = math.isfinite(raw) and (exam is None or math.isfinite(exam))
        if d is not None and not finite and self.rank == 0:
            log.warning("stage %s step %d: eval losses not finite (raw %s, exam %s): no checkpoint saved",
                        stage.name, run.step, raw, exam)
        if d is not None and finite and checkpoint_due(t, stage, run.step, new_best=d.new_best, stop=d.stop,
                                                       on_front=on_front):
            path = self.run_dir.checkpoint_ref(self.checkpoint_path(plan, stage, run.step).name)
            evals = [*run.evals, {"step": run.step, "raw": raw, "exam": exam, "checkpoint": path}]
            state = {"plan": plan.to_dict(), "stage": stage.name, "step": run.step, "tokens_seen": run.tokens_seen,
                     "lr_scale": run.lr_scale, "good_steps": run.good_steps, "tokens_to_gate": run.tokens_to_gate,
                     "sources": {s: b.state_dict() for s, b in run.streams.items()},
                     "mixture": run.sampler.state_dict(), "anomaly": run.detector.state_dict(),
                     "stop": run.stop_state.to_dict(), "decision": d.to_dict(), "evals": evals}
            ckpt_path = self.save(run, plan, state,
                                  {k: v for k, v in metrics.items() if isinstance(v, int | float | str | None)})
            run.evals = evals
            if not d.stop:  # a resume from this checkpoint takes its rollback point here: so does the run going on,
                run.engine.mark_stable(run.step)  # and a rollback after either returns to the same state and step
        metrics["checkpoint"] = ckpt_path
        self.report(metrics, ckpt_path, tb, run.step)
        return Interval(run.sources, self.device)

    def plan_tokens(self, plan: PlanState, stage_tokens: int | None) -> int | None:
        """Training tokens of this run from its start (the base model for a whole plan) to ``stage_tokens`` into
        the current stage: the stages it finished before, plus ``stage_tokens``. None when that is None. (A tune
        trial runs one stage from the prerequisites' checkpoint; its trials.parquet row adds their tokens.)"""
        if stage_tokens is None:
            return None
        return sum(int(s.get("tokens_seen") or 0) for s in plan.summaries.values()) + stage_tokens

    # ----------------------------------------------------------------- reporting
    def report(self, metrics: dict[str, Any], ckpt_path: str | None, tb: ScalarLogger, step: int) -> None:
        if self.rank == 0:
            self.run_dir.append_metrics(metrics)
            tb.log({k: v for k, v in metrics.items() if k not in ("step", "stage")}, step)
            self.emit({"kind": "eval", "metrics": {k: v for k, v in metrics.items() if not isinstance(v, dict)}})
        flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
        if self._write_pending:  # Ray is told of a checkpoint only once it is complete (join_checkpoint)
            self._held_report = (flat, ckpt_path)
        else:
            self.session.report(flat, ckpt_path, self.rank)

    def tell(self, line: str) -> None:
        """A warning for the log, and (rank 0) for the console."""
        log.warning(line)
        self.emit({"kind": "line", "text": line})

    def emit(self, event: dict[str, Any]) -> None:
        """Send a console event to the driver (rank 0 only, when the driver listens)."""
        if self.feed is not None:
            self.feed.send(event)

    def finish_stage(self, run: StageRun, plan: PlanState) -> None:
        """Record the stage summary, its best checkpoint and Pareto front, the baseline, the hand-off choices."""
        self.join_checkpoint()  # the stage's last checkpoint is complete (and reported) before it is named
        stage, stop_state, decision, saved = run.stage, run.stop_state, run.decision, run.saved
        hist = stop_state.history
        best_step = stop_state.best_step
        best_path = saved.get(best_step) if best_step is not None else None
        if best_path is None:  # no eligible eval: continue from the last checkpoint of the stage
            best_step = max(saved) if saved else None
            best_path = saved.get(best_step) if best_step is not None else None
        best_rec = next((h for h in hist if h["step"] == best_step), None)
        if stage.sets_baseline and (baseline := baseline_of(stop_state)) is not None:
            plan.baseline_raw_best = baseline
            plan.cpt_best = saved.get(stop_state.best_raw_step, best_path)
        cands, front = handoff_candidates(run.evals, best=best_path)
        plan.handoff[stage.name] = cands
        plan.fronts[stage.name] = front
        summary = {
            "stage": stage.name, "steps": run.step, "tokens_seen": run.tokens_seen,
            "stop_reason": decision.reason if decision else "", "passed": bool(decision and decision.passed),
            "best_step": best_step, "best_checkpoint": best_path,
            "best_raw_val_loss": best_rec["raw"] if best_rec else None,
            "best_exam_val_loss": _exam_loss(best_rec) if best_rec else None,
            "best_exam_acc": best_rec.get("exam_acc") if best_rec else None,
            "exam_metric": stage.stop.exam_metric,
            "min_raw_val_loss": stop_state.best_raw,
            "min_exam_val_loss": min((x for h in hist if (x := _exam_loss(h)) is not None), default=None),
            "max_exam_acc": max((h["exam_acc"] for h in hist if h.get("exam_acc") is not None), default=None),
            "final_raw_val_loss": hist[-1]["raw"] if hist else None,
            "final_exam_val_loss": _exam_loss(hist[-1]) if hist else None,
            "final_exam_acc": hist[-1].get("exam_acc") if hist else None,
            "baseline_raw_best": plan.baseline_raw_best, "gate_streak": decision.gate_streak if decision else 0,
            "rollbacks": run.detector.rollbacks, "lr_scale": run.lr_scale, "evals": len(hist),
            "pareto_front": front, "handoff": cands,
            "tokens_to_gate": run.tokens_to_gate, "plan_tokens_to_gate": self.plan_tokens(plan, run.tokens_to_gate),
        }
        summary["start_raw_val_loss"], summary["start_exam"] = stop_state.start_raw, stop_state.start_exam
        no_gain = no_gain_text(stage, stop_state, decision)
        kept = (f"baseline_raw_best stays the start's {stop_state.start_raw:.4f}: the later stages must keep what "
                "the starting model knew." if stop_state.start_raw is not None else
                "no baseline_raw_best is set (no finite raw val loss, at the start or since).")
        summary["warning"] = (no_gain + (f" {kept}" if stage.sets_baseline else "")) if no_gain else None
        if summary["warning"] and self.rank == 0:
            log.warning("%s", summary["warning"])
        plan.summaries[stage.name] = summary
        plan.best[stage.name] = best_path
        if self.rank == 0:
            self.run_dir.wait_published()  # the summary names only checkpoints that are complete at the URI
            s = self.run_dir.read_summary()
            s.setdefault("stages", {})[stage.name] = summary
            order = s.setdefault("stage_order", [])
            if stage.name not in order:
                order.append(stage.name)
            s["baseline_raw_best"] = plan.baseline_raw_best
            s["cpt_best"] = plan.cpt_best
            if run.tokens_to_gate is not None and not s.get("first_gate"):  # whole plan: base model → first pass
                s["first_gate"] = {"stage": stage.name, "tokens_to_gate": run.tokens_to_gate,
                                   "plan_tokens_to_gate": summary["plan_tokens_to_gate"]}
            self.run_dir.write_summary(s)
            self.run_dir.prune_checkpoints(self.cfg.train.keep_last, keep_list(plan))
            self.emit({"kind": "stage_end", "summary": {**{k: v for k, v in summary.items()
                                                              if isinstance(v, int | float | str | bool | None)},
                                                           "sets_baseline": stage.sets_baseline}})
        barrier()
        later = plan.stage_order[plan.stage_pos + 1:]
        if no_gain and stage.sets_baseline and later and self.cfg.train.stop_plan_without_gain:
            raise TrainingAborted(f"{no_gain} The plan stops before '{later[0]}': the later stages would start from "
                                  "a worse model than this stage began with and be held to its start's raw loss "
                                  "(train.stop_plan_without_gain: false goes on anyway).")


def no_gain_text(stage: StageConfig, state: StopState, decision: StopDecision | None) -> str | None:
    """What to tell the user when the stage ended without gaining on its start (reason ``…: no gain on the
    start``, see :mod:`kcpt.train.stopping`): the start, the best, the LR to lower; None otherwise."""
    if decision is None or not decision.reason.endswith(NO_GAIN):
        return None
    if stage.stop.rule == "plateau":
        what, start, best, step = "raw val loss", state.start_raw, state.best_raw, state.best_raw_step
    else:
        what, start, best, step = f"exam {stage.stop.exam_metric}", state.start_exam, state.best_exam, \
            state.best_exam_step
    best_text = f"best {best:.4f} at step {step}" if best is not None else "no eval gave a finite value"
    start_text = f"the starting weights' {start:.4f}" if start is not None else "its start (not measured)"
    return (f"stage '{stage.name}': its {what} never got better than {start_text} "
            f"({best_text}). Try a lower lr.peak (now {stage.lr.peak:.2e}) or check the stage's data.")


def _exam_loss(h: dict[str, Any]) -> float | None:
    """The exam val loss of a stop-history entry (``exam`` is in ``stop.exam_metric`` units; entries of older
    checkpoints have no ``exam_loss`` and always held the loss)."""
    return h["exam_loss"] if "exam_loss" in h else h.get("exam")


def checkpoint_due(t: Any, stage: StageConfig, step: int, *, new_best: bool, stop: bool, on_front: bool) -> bool:
    """Whether the eval at ``step`` saves a checkpoint: a new best, the stop, a new Pareto-front point, or the
    periodic one (every ``train.checkpoint_every_evals``-th eval of the stage, when ``checkpoint_every_eval``)."""
    periodic = t.checkpoint_every_eval and (step // stage.eval_every) % t.checkpoint_every_evals == 0
    return bool(periodic or new_best or stop or on_front)


def _joins_front(evals: list[dict[str, Any]], raw: float, exam: float | None) -> bool:
    """(raw, exam) is not dominated by an eval already saved (a new point of the stage's Pareto front)."""
    for e in evals:
        ex_le = exam is None or (e["exam"] is not None and e["exam"] <= exam)
        if e["raw"] <= raw and ex_le and (e["raw"] < raw or (exam is not None and e["exam"] < exam)):
            return False
    return True


def stage_loop_per_worker(config: dict[str, Any], session: RaySession | LocalSession | None = None) -> None:
    """Ray Train ``train_loop_per_worker``: run the stages ``config["stages"]`` of ``config["cfg"]``.

    ``config`` keys: ``cfg`` (KcptConfig as JSON dict), ``stages`` (names, in order), ``prepared`` (dataset
    name → prepared dir), ``run_dir``, and optional ``init_checkpoint``, ``baseline_raw_best``,
    ``reference_checkpoint``, ``resume_from`` (a kcpt checkpoint to continue exactly), ``console`` (a console
    feed), ``errors`` (an :class:`~kcpt.train.worker_errors.ErrorBox`).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_worker_logs()
    # Ray Train: a KcptError ends the run once, not retried (kcpt.train.worker_errors)
    run_recording(config.get("errors"), rank_world()[0], lambda: StageRunner(config, session).run())


def _quiet_worker_logs() -> None:
    """No per-model-load progress bars, and no echo of every ``ray.train.report`` payload at INFO."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        import ray.train.v2._internal.execution.context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: keep its logging as it is
        pass
