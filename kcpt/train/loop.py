"""The stage loop: one function, run by every Ray Train worker, that trains every stage of the plan.

A stage is data (:class:`~kcpt.config.StageConfig`); CPT, stage 1, stage 2 and stage 3 differ only in their
sources, losses, KL weight, eval sets and stop rule. Per optimizer step each micro-batch comes from ONE source,
drawn by a :class:`~kcpt.train.mixture.MixtureSampler` seeded identically on every rank (ranks stay in
lockstep: same source, same number of steps, data cursors identical across ranks). The loss of a micro-batch is

    CE(source labels) + β · KL(p_ref ‖ p_θ)   (KL only on replay sources, β = stage.kl_beta)

with CE the token mean over labels ≠ -100 (raw rows: full labels; exam rows: answer-only, or full when the
stage says ``losses: {src: full}``). Gradients are clipped; the anomaly rule (all ranks decide on the
all-reduced loss and the identical DDP grad norm) skips the update, rolls back to the last stable snapshot and
lowers the LR. Every ``eval_every`` steps: raw val loss (+ exam val loss), stop rule, metrics to
metrics.jsonl / TensorBoard / ``ray.train.report`` and a checkpoint. A stage ends on its stop rule or
``max_steps``; the next stage starts from its best checkpoint (``restore``: weights_only or full).

Resume: a replacement worker group (``FailureConfig``) or a new ``run_plan`` on the same run dir loads the
last checkpoint's trainer state (optimizer, scheduler, data cursors, sampler, stop + anomaly state, plan state)
and continues exactly where it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kcpt.config import KcptConfig, StageConfig
from kcpt.errors import CheckpointError, ConfigError
from kcpt.model.loading import autocast, freeze, load_causal_lm
from kcpt.train import checkpoint as ckpt_lib
from kcpt.train.anomaly import AnomalyDetector, StableSnapshot
from kcpt.train.batches import PackedRows, SourceBatches, eval_batches, full_labels, load_packed_rows
from kcpt.train.evaluation import all_reduce_sum, eval_loss, ppl
from kcpt.train.faults import FaultInjector
from kcpt.train.losses import kl_to_reference_sum, token_ce_sum
from kcpt.train.mixture import MixtureSampler
from kcpt.train.rundir import RunDir, ScalarLogger
from kcpt.train.schedule import make_scheduler, scale_base_lr
from kcpt.train.stopping import StopDecision, StopState, update_stop

log = logging.getLogger(__name__)

METRIC_KEYS = ("stage", "step", "tokens_seen", "train_loss", "raw_val_loss", "raw_val_ppl", "exam_val_loss", "kl",
               "grad_norm", "lr", "tokens_per_s", "gate_ok", "gate_streak", "raw_ratio")
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
    """Checkpoint the current stage starts from (previous stage's best, or the run's init checkpoint)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanState:
        return cls(**d)


@dataclass
class Interval:
    """Training statistics accumulated between two evals."""

    loss_sum: float = 0.0
    steps: int = 0
    src_sum: dict[str, float] = field(default_factory=dict)
    src_n: dict[str, int] = field(default_factory=dict)
    kl_sum: float = 0.0
    kl_n: int = 0
    grad_sum: float = 0.0
    grad_max: float = 0.0
    tokens: int = 0
    seconds: float = 0.0

    def add_source(self, src: str, loss: float) -> None:
        self.src_sum[src] = self.src_sum.get(src, 0.0) + loss
        self.src_n[src] = self.src_n.get(src, 0) + 1


# --------------------------------------------------------------------------- helpers


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _unwrap(engine: torch.nn.Module) -> torch.nn.Module:
    return engine.module if hasattr(engine, "module") else engine


def stage_sources(stage: StageConfig) -> list[str]:
    """Every source the stage can draw: its ``sources`` and the names in its ``mixture_schedule``."""
    names = list(stage.sources)
    for ph in stage.mixture_schedule:
        names += [n for n in ph.weights if n not in names]
    return names


def loss_kinds(cfg: KcptConfig, stage: StageConfig) -> dict[str, str]:
    """Loss per source: ``stage.losses`` or the default by dataset kind (raw → full, exam → answer_only)."""
    return {s: stage.losses.get(s, "full" if cfg.data.datasets[s].kind == "raw" else "answer_only")
            for s in stage_sources(stage)}


def replay_sources(cfg: KcptConfig, stage: StageConfig) -> list[str]:
    """Sources whose batches get the KL term: ``stage.replay_sources`` or the stage's raw sources."""
    if stage.replay_sources is not None:
        return list(stage.replay_sources)
    return [s for s in stage_sources(stage) if cfg.data.datasets[s].kind == "raw"]


def datasets_needed(cfg: KcptConfig, stages: list[str]) -> list[str]:
    names: list[str] = []
    for name in stages:
        st = cfg.stage(name)
        for n in [*st.sources, *[k for ph in st.mixture_schedule for k in ph.weights], st.eval_raw,
                  *([st.eval_exam] if st.eval_exam else [])]:
            if n not in names:
                names.append(n)
    return names


def expected_manifest(cfg: KcptConfig, prepared: dict[str, Path]) -> dict[str, Any]:
    """Hashes a checkpoint of this run records and a full resume must match: tokenizer (from the prepared
    data's manifest), each prepared dataset's manifest, the resolved config."""
    from kcpt.data.shards import prepared_sha256, read_manifest

    first = read_manifest(next(iter(prepared.values())))
    return {"tokenizer_sha256": first["tokenizer_sha256"],
            "data_sha256": {k: prepared_sha256(v) for k, v in prepared.items()},
            "config_sha256": cfg.sha256()}


def _checkpoint_step_key(state: dict[str, Any]) -> tuple[int, int]:
    return int(state["plan"]["stage_pos"]), int(state["step"])


# --------------------------------------------------------------------------- the worker


class StageRunner:
    """Everything one worker holds while running the plan."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = KcptConfig.model_validate(config["cfg"])
        self.config = config
        self.rank, self.world = _rank_world()
        self.device = self._device()
        self.run_dir = RunDir(config["run_dir"])
        self.prepared: dict[str, str] = config["prepared"]
        self.ds = self.cfg.train.deepspeed
        if self.cfg.model.dtype == "float16" and self.ds is None:
            raise ConfigError("model.dtype float16 needs loss scaling: use train.deepspeed, or model.dtype bfloat16")
        # DeepSpeed casts the module and keeps its own fp32 master weights; otherwise autocast the forwards.
        self.amp = (contextlib.nullcontext if self.ds is not None
                    else lambda: autocast(self.cfg.model, self.device))
        self.rows: dict[str, PackedRows] = {}
        self.eval_cache: dict[str, list[dict[str, torch.Tensor]]] = {}
        self.tokenizer = self._load_tokenizer()
        self._expected: dict[str, Any] | None = None

    # ----------------------------------------------------------------- setup
    def _device(self) -> torch.device:
        if self.cfg.train.use_gpu and torch.cuda.is_available():
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
            self.rows[name] = load_packed_rows(self.prepared[name], name=name, seq_len=self.cfg.data.seq_len)
        return self.rows[name]

    def eval_set(self, name: str) -> list[dict[str, torch.Tensor]]:
        if name not in self.eval_cache:
            self.eval_cache[name] = eval_batches(self.rows_of(name), rank=self.rank, world=self.world,
                                                 batch_size=self.cfg.train.eval_batch_size,
                                                 max_rows=self.cfg.train.max_eval_rows, device=self.device)
        return self.eval_cache[name]

    def load_model(self, path: str | None, *, trained: bool = True) -> torch.nn.Module:
        """A trained model keeps float32 master weights (autocast / DeepSpeed give the compute dtype);
        a frozen reference is stored in the compute dtype."""
        from kcpt.model.tokenizer import pad_token_id

        model_dir = ckpt_lib.model_dir(path) if path is not None else None
        model = load_causal_lm(self.cfg.model, vocab_size=len(self.tokenizer), path=model_dir,
                               pad_token_id=pad_token_id(self.tokenizer), eos_token_id=self.tokenizer.eos_token_id,
                               dtype=torch.float32 if trained else None)
        return model.to(self.device)

    def build_engine(self, model: torch.nn.Module, stage: StageConfig) -> tuple[Any, Any, Any]:
        """(engine, optimizer, scheduler): DDP (world > 1), DeepSpeed (``train.deepspeed``) or the bare model."""
        t = self.cfg.train
        opt = torch.optim.AdamW(model.parameters(), lr=stage.lr.peak, betas=tuple(t.adam_betas),
                                weight_decay=t.weight_decay)
        sched = make_scheduler(opt, stage.max_steps, stage.lr)
        if self.ds is not None:
            import deepspeed

            ds_config = {
                "train_micro_batch_size_per_gpu": t.micro_batch_size,
                "gradient_accumulation_steps": t.grad_accum,
                "gradient_clipping": t.clip_grad_norm,
                "zero_optimization": {"stage": self.ds.zero_stage,
                                      **({"offload_optimizer": {"device": "cpu"}} if self.ds.offload_optimizer
                                         else {})},
                "zero_allow_untested_optimizer": True,
                "bf16": {"enabled": self.cfg.model.dtype == "bfloat16"},
                "fp16": {"enabled": self.cfg.model.dtype == "float16"},
                "steps_per_print": 10 ** 9,
                "wall_clock_breakdown": False,
            }
            engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
            return engine, opt, sched
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids), opt, sched
        return model, opt, sched

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
        return freeze(self.load_model(path, trained=False))

    # ----------------------------------------------------------------- checkpoint I/O
    def checkpoint_path(self, plan: PlanState, stage: StageConfig, step: int) -> Path:
        return self.run_dir.checkpoints / f"{plan.stage_pos:02d}-{stage.name}-step{step:06d}"

    def expected_manifest(self) -> dict[str, Any]:
        if self._expected is None:
            self._expected = expected_manifest(self.cfg, {k: Path(v) for k, v in self.prepared.items()})
        return self._expected

    def save(self, engine: Any, plan: PlanState, stage: StageConfig, state: dict[str, Any],
             metrics: dict[str, Any]) -> str:
        """Rank 0 writes ``checkpoints/<pos>-<stage>-step<k>`` (atomically); every rank gets its path."""
        path = self.checkpoint_path(plan, stage, state["step"])
        module = _unwrap(engine)
        gather = contextlib.nullcontext()
        if self.ds is not None and self.ds.zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        with gather:
            if self.rank == 0:
                manifest = ckpt_lib.build_manifest(
                    **self.expected_manifest(), base_model=self.cfg.model.name_or_path,
                    restore_mode=stage.restore, step=state["step"], stage=stage.name, stage_index=plan.stage_pos,
                    metrics=metrics)
                ckpt_lib.save_checkpoint(path, model=module, tokenizer=self.tokenizer, trainer_state=state,
                                         manifest=manifest)
        _barrier()
        return str(path)

    def resume_point(self) -> str | None:
        """The checkpoint to continue from: Ray's latest (worker group replaced) or ``resume_from``."""
        import ray.train

        ray_ckpt = ray.train.get_checkpoint()
        if ray_ckpt is not None:
            with ray_ckpt.as_directory() as d:
                pointer = json.loads((Path(d) / POINTER_FILE).read_text())
            return pointer["path"]
        return self.config.get("resume_from")

    # ----------------------------------------------------------------- the plan
    def run(self) -> None:
        plan = PlanState(stage_order=list(self.config["stages"]),
                         baseline_raw_best=self.config.get("baseline_raw_best"),
                         start_from=self.config.get("init_checkpoint"))
        resume_path = self.resume_point()
        resume_state: dict[str, Any] | None = None
        if resume_path is not None:
            resume_state = ckpt_lib.load_trainer_state(resume_path)
            plan = PlanState.from_dict(resume_state["plan"])
            if self.rank == 0:
                key = _checkpoint_step_key(resume_state)
                order = plan.stage_order
                self.run_dir.truncate_metrics(
                    lambda r: r.get("stage") not in order or (order.index(r["stage"]), r["step"]) <= key)
            log.info("rank %d resumes from %s", self.rank, resume_path)
        while plan.stage_pos < len(plan.stage_order):
            stage = self.cfg.stage(plan.stage_order[plan.stage_pos])
            state = resume_state if resume_state is not None and resume_state["stage"] == stage.name else None
            self.run_stage(stage, plan, resume_path if state is not None else None, state)
            resume_state = None
            plan.stage_pos += 1
        _barrier()

    def run_stage(self, stage: StageConfig, plan: PlanState, resume_path: str | None,
                  resume: dict[str, Any] | None) -> None:
        t = self.cfg.train
        first_stage = plan.stage_order[0]
        kinds = loss_kinds(self.cfg, stage)
        replay = set(replay_sources(self.cfg, stage))
        sources = stage_sources(stage)
        exam_sources = {s for s in sources if self.cfg.data.datasets[s].kind == "exam"}

        # ---- model, optimizer, schedule
        start = resume_path if resume is not None else plan.start_from
        model = self.load_model(start)
        engine, opt, sched = self.build_engine(model, stage)
        ref = self.reference_model(stage, plan)
        streams = {s: SourceBatches(self.rows_of(s), rank=self.rank, world=self.world,
                                    batch_size=t.micro_batch_size, seed=t.seed, device=self.device)
                   for s in sources}
        full_exam = {s for s, k in kinds.items() if k == "full" and s in exam_sources}
        for s in full_exam:  # labels from input_ids for exam rows trained with the full loss
            r = streams[s].rows
            streams[s].rows = PackedRows(r.name, r.input_ids, r.position_ids,
                                         full_labels(r.input_ids, r.position_ids, r.labels))
        sampler = MixtureSampler(stage.sources, seed=t.seed, schedule=stage.mixture_schedule,
                                 max_steps=stage.max_steps)
        detector = AnomalyDetector(t.anomaly)
        stop_state = StopState()
        faults = FaultInjector(t.faults, stage=stage.name, first_stage=first_stage, rank=self.rank,
                               marker_dir=self.run_dir.faults)
        step, tokens_seen, lr_scale = 0, 0, 1.0
        decision: StopDecision | None = None
        if resume is not None:
            step = int(resume["step"])
            tokens_seen = int(resume["tokens_seen"])
            lr_scale = float(resume["lr_scale"])
            if self.ds is None and resume.get("optimizer") is not None:
                opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            for s, st in resume["sources"].items():
                streams[s].load_state_dict(st)
            sampler.load_state_dict(resume["mixture"])
            detector.load_state_dict(resume["anomaly"])
            stop_state = StopState.from_dict(resume["stop"])
            if resume.get("decision") is not None:
                decision = StopDecision(**resume["decision"])
        elif stage.restore == "full" and plan.start_from is not None and self.ds is None:
            prev = ckpt_lib.load_trainer_state(plan.start_from)
            if prev.get("optimizer") is not None:
                try:
                    opt.load_state_dict(prev["optimizer"])
                    sched = make_scheduler(opt, stage.max_steps, stage.lr)  # re-warm this stage's schedule
                except ValueError as e:
                    raise CheckpointError(f"{plan.start_from}: optimizer state does not fit the model: {e}") from None

        is_gpu = self.device.type == "cuda"
        step_tokens = t.micro_batch_size * self.cfg.data.seq_len * t.grad_accum * self.world  # row positions/step
        tb = ScalarLogger(self.run_dir, stage.name, self.cfg.logging.tensorboard and self.rank == 0,
                          purge_step=step + 1 if resume is not None else None)
        snapshot = StableSnapshot()
        if self.ds is None:
            snapshot.capture(engine, opt, sched, step)
        interval = Interval()
        good_steps = int((resume or {}).get("good_steps", 0))
        saved: dict[int, str] = {int(k): v for k, v in (resume or {}).get("saved", {}).items()}

        def evaluate_and_record(final: bool, initial: bool = False) -> StopDecision | None:
            nonlocal decision
            module = _unwrap(engine)
            with self.amp():
                raw = eval_loss(module, self.eval_set(stage.eval_raw), self.device)["loss"]
                exam = (eval_loss(module, self.eval_set(stage.eval_exam), self.device)["loss"]
                        if stage.eval_exam else None)
            d = None
            if not initial:
                d = update_stop(stop_state, stage.stop, step=step, raw=raw, exam=exam,
                                baseline_raw_best=plan.baseline_raw_best, final=final)
                decision = d
            base = plan.baseline_raw_best
            metrics: dict[str, Any] = {
                "stage": stage.name, "step": step, "tokens_seen": tokens_seen,
                "train_loss": interval.loss_sum / interval.steps if interval.steps else None,
                "raw_val_loss": raw, "raw_val_ppl": ppl(raw), "exam_val_loss": exam,
                "eval_raw": stage.eval_raw, "eval_exam": stage.eval_exam,
                "kl": interval.kl_sum / interval.kl_n if interval.kl_n else None,
                "grad_norm": interval.grad_sum / interval.steps if interval.steps else None,
                "grad_norm_max": interval.grad_max if interval.steps else None,
                "lr": opt.param_groups[0]["lr"],
                "tokens_per_s": interval.tokens / interval.seconds if interval.seconds > 0 else None,
                "gate_ok": d.gate_ok if d else None, "gate_streak": d.gate_streak if d else 0,
                "raw_ratio": raw / base if base else None, "baseline_raw_best": base,
                "rollbacks": detector.rollbacks, "epoch": {s: round(b.epoch, 4) for s, b in streams.items()},
                "stop": d.stop if d else False, "stop_reason": d.reason if d else "",
                "new_best": d.new_best if d else False,
            }
            for s in sources:
                n = interval.src_n.get(s, 0)
                metrics[f"train_loss_{s}"] = interval.src_sum[s] / n if n else None
            ckpt_path = None
            if d is not None and (t.checkpoint_every_eval or d.new_best or d.stop):
                state = {"plan": plan.to_dict(), "stage": stage.name, "step": step, "tokens_seen": tokens_seen,
                         "lr_scale": lr_scale, "good_steps": good_steps,
                         "optimizer": opt.state_dict() if self.ds is None else None,
                         "scheduler": sched.state_dict(),
                         "sources": {s: b.state_dict() for s, b in streams.items()},
                         "mixture": sampler.state_dict(), "anomaly": detector.state_dict(),
                         "stop": stop_state.to_dict(), "decision": d.to_dict(),
                         "saved": {**saved, step: str(self.checkpoint_path(plan, stage, step))}}
                ckpt_path = self.save(engine, plan, stage, state,
                                      {k: v for k, v in metrics.items() if isinstance(v, int | float | str | None)})
                saved[step] = ckpt_path
            metrics["checkpoint"] = ckpt_path
            self.report(metrics, ckpt_path, tb, step)
            interval.__init__()
            return d

        if resume is None and t.eval_at_start:
            evaluate_and_record(final=False, initial=True)

        engine.train()
        stopped = decision is not None and decision.stop
        while not stopped and step < stage.max_steps:
            step += 1
            faults.maybe_crash(step)
            t0 = time.perf_counter()
            if self.ds is None:
                opt.zero_grad(set_to_none=True)
            step_loss, ds_skipped = 0.0, 0
            for micro in range(t.grad_accum):
                src = sampler.sample(step - 1)
                batch = streams[src].next()
                sync = contextlib.nullcontext()
                if self.ds is None and self.world > 1 and micro < t.grad_accum - 1:
                    sync = engine.no_sync()
                with sync:
                    with self.amp():
                        out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
                    ce_sum, ce_n = token_ce_sum(out.logits, batch["labels"])
                    ce = ce_sum / ce_n.clamp(min=1)
                    loss = ce
                    if ref is not None and src in replay:
                        with torch.no_grad(), autocast(self.cfg.model, self.device):
                            ref_logits = ref(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
                        kl_sum, kl_n = kl_to_reference_sum(out.logits, ref_logits, batch["labels"])
                        kl = kl_sum / kl_n.clamp(min=1)
                        loss = loss + stage.kl_beta * kl
                        interval.kl_sum += float(kl.detach())
                        interval.kl_n += 1
                    loss = faults.perturb_loss(loss, step)
                    if self.ds is not None:
                        # DeepSpeed applies the update inside engine.step(): a micro-batch whose loss is not
                        # finite on any rank is skipped (no backward, no step) and counted as a rollback.
                        micro_loss = all_reduce_sum([float(loss.detach())], self.device)[0]
                        if math.isfinite(micro_loss):
                            engine.backward(loss)
                            engine.step()
                        else:
                            ds_skipped += 1
                    else:
                        (loss / t.grad_accum).backward()
                step_loss += float(loss.detach()) / t.grad_accum
                interval.add_source(src, float(ce.detach()))
            mean_loss = all_reduce_sum([step_loss], self.device)[0] / self.world
            if self.ds is not None:
                gn = engine.get_global_grad_norm()
                grad_norm = float(gn) if gn is not None else float("nan")
                if ds_skipped:
                    ds_skipped = 0
                    detector.record_rollback(f"loss is not finite ({mean_loss}); DeepSpeed step skipped")
                else:
                    sched.step()
                    if math.isfinite(grad_norm):
                        detector.accept(grad_norm)
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(engine.parameters(), t.clip_grad_norm))
                reason = detector.check(mean_loss, grad_norm)
                if reason is not None:
                    opt.zero_grad(set_to_none=True)
                    snapshot.restore(engine, opt, sched)
                    lr_scale *= t.anomaly.lr_factor
                    scale_base_lr(sched, stage.lr.peak * lr_scale / sched.base_lrs[0])
                    if self.rank == 0:
                        log.warning("stage %s step %d: %s; rolled back to step %s, LR × %g", stage.name, step,
                                    reason, snapshot.step, lr_scale)
                    detector.record_rollback(reason)
                else:
                    opt.step()
                    sched.step()
                    detector.accept(grad_norm)
                    good_steps += 1
                    if good_steps % t.anomaly.stable_every == 0:
                        snapshot.capture(engine, opt, sched, step)
            if is_gpu:
                torch.cuda.synchronize()
            tokens_seen += step_tokens
            interval.seconds += time.perf_counter() - t0
            interval.tokens += step_tokens
            if math.isfinite(mean_loss):
                interval.loss_sum += mean_loss
                interval.steps += 1
                if math.isfinite(grad_norm):
                    interval.grad_sum += grad_norm
                    interval.grad_max = max(interval.grad_max, grad_norm)
            final = step >= stage.max_steps
            if step % stage.eval_every == 0 or final:
                d = evaluate_and_record(final=final)
                stopped = d is not None and d.stop
        tb.close()
        self.finish_stage(stage, plan, stop_state, decision, step, tokens_seen, detector.rollbacks, saved)

    # ----------------------------------------------------------------- reporting
    def report(self, metrics: dict[str, Any], ckpt_path: str | None, tb: ScalarLogger, step: int) -> None:
        import ray.train

        if self.rank == 0:
            self.run_dir.append_metrics(metrics)
            tb.log({k: v for k, v in metrics.items() if k not in ("step", "stage")}, step)
            if self.cfg.logging.progress:  # the process's own stdout (Ray forwards it to the driver once;
                sys.__stdout__.write(eval_line(metrics) + "\n")  # Train V2's patched print() would tee it twice)
                sys.__stdout__.flush()
        flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
        if ckpt_path is not None and self.rank == 0:
            with tempfile.TemporaryDirectory(prefix="kcpt-ptr-") as d:
                (Path(d) / POINTER_FILE).write_text(json.dumps({"path": ckpt_path}))
                ray.train.report(flat, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(flat)

    def finish_stage(self, stage: StageConfig, plan: PlanState, stop_state: StopState, decision: StopDecision | None,
                     step: int, tokens_seen: int, rollbacks: int, saved: dict[int, str]) -> None:
        """Record the stage summary, pick its best checkpoint, update the baseline and the next start."""
        hist = stop_state.history
        best_step = stop_state.best_step
        best_path = saved.get(best_step) if best_step is not None else None
        if best_path is None:  # no eligible eval: continue from the last checkpoint of the stage
            best_step = max(saved) if saved else None
            best_path = saved.get(best_step) if best_step is not None else None
        best_rec = next((h for h in hist if h["step"] == best_step), None)
        if stage.sets_baseline and stop_state.best_raw is not None:
            plan.baseline_raw_best = stop_state.best_raw
            plan.cpt_best = saved.get(stop_state.best_raw_step, best_path)
        summary = {
            "stage": stage.name, "steps": step, "tokens_seen": tokens_seen,
            "stop_reason": decision.reason if decision else "", "passed": bool(decision and decision.passed),
            "best_step": best_step, "best_checkpoint": best_path,
            "best_raw_val_loss": best_rec["raw"] if best_rec else None,
            "best_exam_val_loss": best_rec["exam"] if best_rec else None,
            "min_raw_val_loss": stop_state.best_raw, "min_exam_val_loss": stop_state.best_exam,
            "final_raw_val_loss": hist[-1]["raw"] if hist else None,
            "final_exam_val_loss": hist[-1]["exam"] if hist else None,
            "baseline_raw_best": plan.baseline_raw_best, "gate_streak": decision.gate_streak if decision else 0,
            "rollbacks": rollbacks, "evals": len(hist),
        }
        plan.summaries[stage.name] = summary
        plan.best[stage.name] = best_path
        plan.start_from = best_path or plan.start_from
        if self.rank == 0:
            s = self.run_dir.read_summary()
            s.setdefault("stages", {})[stage.name] = summary
            order = s.setdefault("stage_order", [])
            if stage.name not in order:
                order.append(stage.name)
            s["baseline_raw_best"] = plan.baseline_raw_best
            s["cpt_best"] = plan.cpt_best
            self.run_dir.write_summary(s)
            ckpt_lib.prune_checkpoints(self.run_dir.checkpoints, self.cfg.train.keep_last,
                                       keep=[p for p in [*plan.best.values(), plan.cpt_best, plan.start_from] if p])
        _barrier()


def eval_line(m: dict[str, Any]) -> str:
    """One human line per eval (printed by rank 0; Ray forwards it to the driver)."""
    def f(key: str, fmt: str = ".4f") -> str:
        v = m.get(key)
        return "-" if v is None else format(v, fmt)

    gate = "" if m.get("gate_ok") is None else f"  gate {'ok' if m['gate_ok'] else 'no'} ×{m.get('gate_streak', 0)}"
    stop = f"  → {m['stop_reason']}" if m.get("stop") else ""
    return (f"[{m['stage']}] step {m['step']:>5}  train {f('train_loss')}  raw {f('raw_val_loss')} "
            f"(×{f('raw_ratio', '.3f')})  exam {f('exam_val_loss')}  kl {f('kl')}  lr {f('lr', '.2e')}  "
            f"{f('tokens_per_s', '.0f')} tok/s{gate}{stop}")


def stage_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``: run the stages ``config["stages"]`` of ``config["cfg"]``.

    ``config`` keys: ``cfg`` (KcptConfig as JSON dict), ``stages`` (names, in order), ``prepared`` (dataset
    name → prepared dir), ``run_dir``, and optional ``init_checkpoint``, ``baseline_raw_best``,
    ``reference_checkpoint``, ``resume_from`` (a kcpt checkpoint to continue exactly).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_worker_logs()
    StageRunner(config).run()


def _quiet_worker_logs() -> None:
    """No per-model-load progress bars, and no echo of every ``ray.train.report`` payload at INFO."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        import ray.train.v2._internal.execution.context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: keep its logging as it is
        pass
