"""Training engines: one small interface over DDP (or a bare module) and DeepSpeed ZeRO-2/3.

The stage loop talks to an :class:`Engine` only, so every rule (token-weighted losses, the anomaly rule and its
rollback, the LR schedule, full-state checkpoints) is the same code on both backends. Per optimizer step:

    with engine.accumulate(last=...):        # DDP: no gradient all-reduce before the last micro-batch
        logits = engine.forward(batch)
        engine.backward(loss)                # loss already scaled: see ``grad_world`` below
    grad_norm = engine.step()                # clip + apply; returns the global pre-clip L2 norm (tensor)
    engine.rollback()  /  engine.mark_stable(step)

Both backends *average* gradients over the data-parallel ranks, so a loss that is a token sum ``S_i`` of
micro-batch ``i`` becomes ``S_i · grad_world / N`` (``N`` = the step's token count over every micro-batch and
rank): the applied gradient is then exactly ``∇ Σ S / N``, the token mean of one big batch, whatever the
accumulation and the world size. DeepSpeed's own division by the accumulation steps is switched off
(``scale_wrt_gas=False``) and its micro-batch counter advances on every micro-batch (``step()`` is called per
micro-batch, as DeepSpeed requires), so its accumulation boundary is always the loop's.

The update is applied before the anomaly verdict (DeepSpeed computes the norm inside its step); a rejected step
is undone by :meth:`Engine.rollback`, which restores weights *and* optimizer state of the last rollback point,
so "skip the update and roll back" and "apply it, then roll back" leave the same state.

Rollback points: the DDP engine keeps an in-memory CPU copy (weights + optimizer, ~3× the fp32 parameters; one
copy per ``stable_every`` accepted steps); the DeepSpeed engine saves its own partitioned checkpoint
(``save_checkpoint``; each rank writes only its shard) to node-local scratch and loads it back.

Full state (``save_state`` / ``load_state``, collective): DDP — rank 0 writes ``optimizer.pt``; DeepSpeed —
``engine.save_checkpoint`` of every rank (partitioned optimizer + fp32 master weights). The kcpt checkpoint
holds it under ``engine/`` beside the HF weights, bound by the same manifest. The DDP engine also splits it
(``state_snapshot`` on the training thread, ``write_state`` in the checkpoint writer thread: asynchronous
checkpoints); DeepSpeed's ``save_checkpoint`` is a collective of every rank and stays synchronous.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kcpt.config import KcptConfig, get_dotted
from kcpt.errors import CheckpointError, ConfigError
from kcpt.model.attention import model_inputs
from kcpt.train import fused_loss
from kcpt.train.checkpoint import ENGINE_DIR

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"
DS_TAG = "state"

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity without a process group); returns ``t``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters (frozen ones are left out): matrices with ``weight_decay``;
    norms, biases (every parameter of fewer than 2 dimensions) and embedding tables (``nn.Embedding``, also when
    the output head is tied to one) without. Under ZeRO-3 the shape is the parameter's full ``ds_shape``."""
    emb = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters(recurse=False)}
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or id(p) in emb else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_adamw(groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float], fused: bool
               ) -> torch.optim.Optimizer:
    """torch AdamW; ``fused=True`` (one kernel for all parameters, no per-parameter host work) is taken only when
    every parameter lives on CUDA — elsewhere the default (foreach) implementation."""
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=bool(fused and on_cuda) or None)


class Engine(ABC):
    """What the stage loop needs from a training backend (see the module docstring)."""

    module: torch.nn.Module
    """The (unwrapped) HF model: saving, the reference for parameter counts."""
    loss_module: fused_loss.LossHeadLM
    """The HF model with the fused-loss forward modes, inside the backend's wrapper (evals call it)."""
    grad_world: int
    """Ranks the backend averages gradients over: the factor a token-summed loss is multiplied by."""
    stable_step: int | None = None
    """Step of the current rollback point (``None`` before the first)."""

    def __init__(self) -> None:
        self.rank, self.world = rank_world()

    def forward(self, batch: dict[str, torch.Tensor], cache: dict[str, Any] | None = None) -> torch.Tensor:
        """Logits float[B, T, V] of a packed batch (``input_ids``, ``position_ids`` and the packed attention
        inputs of :func:`kcpt.model.attention.model_inputs`)."""
        return self._call(**model_inputs(self.module, batch, cache)).logits

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward + backward; ``last``: the step's final micro-batch."""
        return contextlib.nullcontext()

    def forward_loss(self, batch: dict[str, torch.Tensor], spec: dict[str, Any],
                     cache: dict[str, Any] | None = None) -> tuple[torch.Tensor, ...]:
        """``(objective, ce_sum, ce_count, kl_sum)`` of a packed batch from the final hidden states, in chunks
        (:func:`kcpt.train.fused_loss.fused_ce_kl` with ``spec``), through the wrapper like :meth:`forward`."""
        return self._call(**model_inputs(self.module, batch, cache), kcpt_loss=spec)

    def _call(self, **kwargs: Any) -> Any:
        raise NotImplementedError

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of ``loss`` (already scaled by the caller)."""

    @abstractmethod
    def step(self) -> torch.Tensor:
        """Clip and apply the accumulated gradient; the global pre-clip L2 norm (0-dim tensor). Grads are zeroed."""

    @abstractmethod
    def set_lr(self, lr: float) -> None: ...

    @property
    @abstractmethod
    def lr(self) -> float: ...

    @abstractmethod
    def mark_stable(self, step: int) -> None:
        """Make the current state the rollback point (collective)."""

    @abstractmethod
    def rollback(self) -> int:
        """Restore the rollback point (weights + optimizer state); returns its step (collective)."""

    @abstractmethod
    def save_state(self, directory: Path) -> None:
        """Write the optimizer state (every rank calls; each writes what it owns)."""

    @abstractmethod
    def load_state(self, directory: Path, *, universal: bool = False) -> None:
        """Load what :meth:`save_state` wrote (every rank calls); ``universal``: its DeepSpeed universal form,
        written at another world size (:mod:`kcpt.train.universal`)."""

    async_state: bool = False
    """Whether :meth:`state_snapshot` / :meth:`write_state` split :meth:`save_state` into a snapshot on the
    training thread and a write elsewhere (asynchronous checkpoints); else the loop saves synchronously."""

    def state_snapshot(self) -> Any:
        """What :meth:`write_state` needs (live references: the caller copies it to the host at once)."""
        raise NotImplementedError

    def write_state(self, snapshot: Any, directory: Path) -> None:
        """Write a host copy of :meth:`state_snapshot` as :meth:`save_state` would (any thread)."""
        raise NotImplementedError

    def train(self) -> None:
        self.module.train()

    def close(self, *, collective: bool = True) -> None:  # noqa: B027 - optional hook: engines with scratch space
        """Release scratch space (rollback points). ``collective`` False: leaving on an error, without a
        collective (another rank may be inside one and never reach it)."""


# --------------------------------------------------------------------------- DDP / bare module


class TorchEngine(Engine):
    """A bare module (one worker) or DDP; torch AdamW (``fused`` on CUDA); in-memory rollback point."""

    def __init__(self, model: torch.nn.Module, optimizer_factory: OptimizerFactory, *, clip: float,
                 weight_decay: float, device: torch.device, loss_kernel: str = "torch") -> None:
        super().__init__()
        self.module = model
        self.loss_module = fused_loss.LossHeadLM(model, loss_kernel)
        self.clip = clip
        self.optimizer = optimizer_factory(param_groups(model, weight_decay))
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.wrapped: torch.nn.Module = DistributedDataParallel(self.loss_module, device_ids=ids)
        else:
            self.wrapped = self.loss_module
        self.grad_world = self.world
        self._snapshot: tuple[list[torch.Tensor], list[tuple[int, str]], list[Any]] | None = None

    def _call(self, **kwargs: Any) -> Any:
        return self.wrapped(**kwargs)

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        if self.world > 1 and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self._wait_copy()  # the rollback point's copy must have read the weights before they change
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _live(self) -> tuple[list[torch.Tensor], list[tuple[int, str]]]:
        """The tensors a rollback point holds: parameters and buffers, then every optimizer state tensor (keyed
        by (parameter index, state key), so a point taken before the first step restores an empty state)."""
        params = list(self.module.parameters())
        tensors = [p.data for p in params] + [b for b in self.module.buffers()]
        keys: list[tuple[int, str]] = []
        for i, p in enumerate(params):
            for k, v in sorted(self.optimizer.state.get(p, {}).items()):
                if isinstance(v, torch.Tensor):
                    tensors.append(v)
                    keys.append((i, k))
        return tensors, keys

    def mark_stable(self, step: int) -> None:
        """Copy weights, buffers and optimizer state into preallocated host buffers (pinned on CUDA, copied on a
        side stream with ``non_blocking``: no allocation, no host stall; the next optimizer step waits for the
        copy on the device). Cost: ≈ 3× the fp32 parameters of host memory (once) and of copy traffic every
        ``anomaly.stable_every`` accepted steps."""
        tensors, keys = self._live()
        shapes = [(t.shape, t.dtype, t.device) for t in tensors]
        if self._snapshot is None or self._snapshot[1] != keys or self._snapshot[2] != shapes:
            pin = any(t.is_cuda for t in tensors)
            bufs = [torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin and t.is_cuda)
                    for t in tensors]
            self._snapshot = (bufs, keys, shapes)
        bufs = self._snapshot[0]
        if any(t.is_cuda for t in tensors):
            cur = torch.cuda.current_stream()
            self._copy_stream = getattr(self, "_copy_stream", None) or torch.cuda.Stream()
            self._copy_stream.wait_stream(cur)
            with torch.no_grad(), torch.cuda.stream(self._copy_stream):
                for b, t in zip(bufs, tensors, strict=True):
                    b.copy_(t, non_blocking=True)
            self._copy_done = self._copy_stream.record_event()
        else:
            with torch.no_grad():
                for b, t in zip(bufs, tensors, strict=True):
                    b.copy_(t)
        self.stable_step = step

    def _wait_copy(self) -> None:
        ev = getattr(self, "_copy_done", None)
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)  # device-side wait: the host goes on
            self._copy_done = None

    def rollback(self) -> int:
        if self._snapshot is None or self.stable_step is None:
            raise RuntimeError("no rollback point: call mark_stable before the first step")
        self._wait_copy()
        bufs, keys, shapes = self._snapshot
        params = list(self.module.parameters())
        n_fixed = len(params) + len(list(self.module.buffers()))
        with torch.no_grad():
            for p in params:  # state created after the point (e.g. the first step's moments) is dropped
                self.optimizer.state.pop(p, None)
            fixed = [p.data for p in params] + list(self.module.buffers())
            for b, t in zip(bufs[:n_fixed], fixed, strict=True):
                t.copy_(b, non_blocking=True)
            for b, (i, k), (_, _, dev) in zip(bufs[n_fixed:], keys, shapes[n_fixed:], strict=True):
                self.optimizer.state.setdefault(params[i], {})[k] = b.to(dev, copy=True)
        self.optimizer.zero_grad(set_to_none=True)
        return self.stable_step

    async_state = True

    def save_state(self, directory: Path) -> None:
        if self.rank == 0:
            self.write_state(self.optimizer.state_dict(), directory)

    def state_snapshot(self) -> Any:
        """Rank 0: the optimizer's state dict (references to the live moments); other ranks: None."""
        return self.optimizer.state_dict() if self.rank == 0 else None

    def write_state(self, snapshot: Any, directory: Path) -> None:
        if snapshot is not None:
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(snapshot, directory / OPTIMIZER_FILE)

    def load_state(self, directory: Path, *, universal: bool = False) -> None:
        f = directory / OPTIMIZER_FILE
        if not f.is_file():
            raise CheckpointError(f"{directory.parent}: no DDP optimizer state ({f.name}); start from it with "
                                  "restore: weights_only (the optimizer starts fresh)")
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
            lr = self.lr
            self.optimizer.load_state_dict(state)
            self.set_lr(lr)
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: optimizer state does not fit the model: {e}") from None


# --------------------------------------------------------------------------- DeepSpeed

REQUIRED_DS_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                    "bf16", "fp16", "zero_optimization.stage", "zero_optimization.offload_optimizer",
                    "zero_optimization.offload_param")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def engine_kind(ds_config: dict[str, Any] | None) -> str:
    """The engine a run trains with (``ds_config``: its :func:`deepspeed_config`, None without DeepSpeed), as
    checkpoint manifests record it (``engine``): ``ddp`` or ``deepspeed-zero<stage>``. Each reads only its own
    full state (optimizer moments, partitions)."""
    return "ddp" if ds_config is None else f"deepspeed-zero{ds_config['zero_optimization']['stage']}"


def checkpoint_engine(manifest: dict[str, Any]) -> str | None:
    """The engine whose state checkpoint ``manifest`` holds: its ``engine`` entry, or, for a checkpoint of an older
    kcpt, ``ddp`` / ``deepspeed`` from its files; None when it holds no engine state."""
    if manifest.get("engine"):
        return str(manifest["engine"])
    files = manifest.get("files") or {}
    if f"{ENGINE_DIR}/{OPTIMIZER_FILE}" in files:
        return "ddp"
    return "deepspeed" if any(n.startswith(f"{ENGINE_DIR}/") for n in files) else None


def _engine_name(kind: str) -> str:
    if kind == "ddp":
        return "DDP (no train.deepspeed)"
    stage = kind.removeprefix("deepspeed-zero")
    return "DeepSpeed" + (f" ZeRO-{stage} (train.deepspeed.zero_stage {stage})" if stage != kind else "")


def check_engine_state(ref: str | Path, manifest: dict[str, Any], cfg: KcptConfig, *, fix: str) -> None:
    """A checkpoint whose engine state another engine wrote is refused before any worker starts (not even
    ``--force`` can load it: DDP finds no ``optimizer.pt`` in a DeepSpeed state, DeepSpeed asserts on another ZeRO
    stage's files, inside every worker); ``fix`` says what to do instead."""
    saved = checkpoint_engine(manifest)
    now = engine_kind(deepspeed_config(cfg) if cfg.train.deepspeed is not None else None)
    if saved is None or saved == now or (saved == "deepspeed" and now.startswith("deepspeed-")):
        return
    raise CheckpointError(f"{ref}: its optimizer state was written by {_engine_name(saved)} and this run trains with "
                          f"{_engine_name(now)}, which cannot read it: {fix}")


def deepspeed_config(cfg: KcptConfig, micro_batch: int | None = None,
                     grad_accum: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a run (of a stage with its own ``micro_batch``; default
    ``train.micro_batch_size``; ``grad_accum`` micro-batches per rank and step, default ``train.grad_accum``: an
    elastic run's on fewer workers, :func:`kcpt.train.layout.step_layout`): the user's ``train.deepspeed.config``
    JSON (if any) under kcpt's required keys.
    A user file that sets a required key to another value raises :class:`ConfigError` naming it."""
    t, ds = cfg.train, cfg.train.deepspeed
    assert ds is not None
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        if ds.zero_stage != 3:
            raise ConfigError("train.deepspeed.offload_params needs zero_stage 3")
        zero["offload_param"] = {"device": "cpu"}
    required: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch or t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum or t.grad_accum,
        "gradient_clipping": t.clip_grad_norm,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "zero_optimization": zero,
    }
    user: dict[str, Any] = {}
    if ds.config is not None:
        try:
            user = json.loads(Path(ds.config).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"train.deepspeed.config: cannot read {ds.config}: {e}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{ds.config}: line {e.lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"{ds.config}: the top level must be a JSON object")
        for key in REQUIRED_DS_KEYS:
            theirs, ours = get_dotted(user, key), get_dotted(required, key)
            if theirs is not None and theirs != "auto" and ours is not None and theirs != ours:
                raise ConfigError(f"{ds.config}: {key} = {theirs!r}, but kcpt sets {ours!r} from the kcpt config "
                                  "(train.micro_batch_size or the stage's, grad_accum, clip_grad_norm, model.dtype, "
                                  "train.deepspeed): remove it from the JSON or change the kcpt config")
            if theirs == "auto":
                _drop_dotted(user, key)
    merged = _merge(user, required)
    merged.setdefault("steps_per_print", 10 ** 9)
    merged.setdefault("wall_clock_breakdown", False)
    # torch AdamW on the partitions (also when they are offloaded to CPU): no DeepSpeed-only optimizer needed
    merged.setdefault("zero_allow_untested_optimizer", True)
    merged.setdefault("zero_force_ds_cpu_optimizer", False)
    # every node's local rank 0 writes the module states, so a rollback point in node-local scratch loads on
    # every node (no shared filesystem needed)
    merged.setdefault("checkpoint", {}).setdefault("use_node_local_storage", True)
    return merged


def _drop_dotted(d: dict[str, Any], dotted: str) -> None:
    *head, last = dotted.split(".")
    cur: Any = d
    for k in head:
        cur = cur.get(k) if isinstance(cur, dict) else None
    if isinstance(cur, dict):
        cur.pop(last, None)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-2/3 engine; rollback points are DeepSpeed checkpoints in node-local scratch."""

    def __init__(self, model: torch.nn.Module, optimizer_factory: OptimizerFactory, *, ds_config: dict[str, Any],
                 weight_decay: float, scratch_key: str, loss_kernel: str = "torch") -> None:
        import deepspeed

        super().__init__()
        wrapper = fused_loss.LossHeadLM(model, loss_kernel)
        if ds_config.get("zero_optimization", {}).get("stage") == 3:
            # the fused loss reads the head weight in the wrapper's forward: ZeRO-3 gathers it there too
            deepspeed.zero.register_external_parameter(wrapper, fused_loss.head_weight(model))
        optimizer = optimizer_factory(param_groups(model, weight_decay))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=wrapper, optimizer=optimizer, config=ds_config)
        self.loss_module = self.engine.module
        self.module = self.loss_module.module
        self.grad_world = self.world
        self._scratch = Path(tempfile.gettempdir()) / "kcpt-rollback" / scratch_key
        self._lr = float(self.optimizer.param_groups[0]["lr"])

    def _call(self, **kwargs: Any) -> Any:
        return self.engine(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        # DeepSpeed counts micro-batches in step(); at the accumulation boundary it reduces, clips and applies
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> torch.Tensor:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed accumulation boundary out of step with the loop (a micro-batch was lost)")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            return norm.detach().float().reshape(())
        return torch.tensor(float("nan") if norm is None else float(norm))

    def set_lr(self, lr: float) -> None:
        self._lr = lr
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    @property
    def lr(self) -> float:
        return self._lr

    def mark_stable(self, step: int) -> None:
        self.save_state(self._scratch)
        self.stable_step = step

    def rollback(self) -> int:
        if self.stable_step is None:
            raise RuntimeError("no rollback point: call mark_stable before the first step")
        lr = self.lr
        self.load_state(self._scratch)
        self.set_lr(lr)
        return self.stable_step

    def save_state(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(directory), tag=DS_TAG, save_latest=False)
        barrier()

    def load_state(self, directory: Path, *, universal: bool = False) -> None:
        """``universal``: ``directory`` holds the universal form of the state (:mod:`kcpt.train.universal`), which
        DeepSpeed re-partitions for this world size. DeepSpeed takes that from its config's
        ``checkpoint.load_universal`` at each ``load_checkpoint``: set for this load only, since the rollback points
        this engine loads later are its own partitioned saves."""
        if not (directory / DS_TAG).is_dir():
            raise CheckpointError(f"{directory.parent}: no DeepSpeed state ({directory.name}/{DS_TAG}); "
                                  "restore it weights_only")
        config = self.engine._config
        before, config.load_universal_checkpoint = config.load_universal_checkpoint, universal
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            path, _ = self.engine.load_checkpoint(str(directory), tag=DS_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        finally:
            config.load_universal_checkpoint = before
        if path is None:
            raise CheckpointError(f"{directory}: DeepSpeed could not load its state")
        if universal:  # two slips of DeepSpeed's ZeRO-3 universal load, undone:
            # every param group got the first one's hyperparameters (weight decay on the norms and biases): each
            # group's own are this run's (param_groups), as at the save;
            for g, own in zip(self.optimizer.param_groups, groups, strict=True):
                g.update(own)
            # every state got the same `step` tensor, which AdamW advances in place once per group per step (the
            # bias correction ran ahead): each its own copy
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
        barrier()

    def close(self, *, collective: bool = True) -> None:
        if collective:
            barrier()  # every rank of a node removes the node's scratch copy (ignore_errors: they race)
        shutil.rmtree(self._scratch, ignore_errors=True)


def frozen_reference(model: torch.nn.Module, cfg: KcptConfig) -> torch.nn.Module:
    """A frozen KL reference; under ZeRO-3 a partitioned DeepSpeed inference engine (offloaded with
    ``offload_params``), so no rank holds the whole reference."""
    from kcpt.model.loading import freeze

    model = fused_loss.LossHeadLM(freeze(model)).eval()
    ds = cfg.train.deepspeed
    if ds is None or ds.zero_stage != 3:
        return model
    import deepspeed

    zero: dict[str, Any] = {"stage": 3}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    ref_cfg = {"train_micro_batch_size_per_gpu": cfg.train.micro_batch_size, "zero_optimization": zero,
               "bf16": {"enabled": cfg.model.dtype == "bfloat16"}, "fp16": {"enabled": cfg.model.dtype == "float16"},
               "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, config=ref_cfg)
    engine.eval()
    return engine


@contextlib.contextmanager
def zero3_init(cfg: KcptConfig, ds_config: dict[str, Any] | None) -> Iterator[None]:
    """Construct models partitioned from the start under ZeRO-3 (``deepspeed.zero.Init`` for models built from
    a config; transformers' ``HfDeepSpeedConfig`` for ``from_pretrained``); a no-op otherwise."""
    if ds_config is None or cfg.train.deepspeed is None or cfg.train.deepspeed.zero_stage != 3:
        yield
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - transformers reads it through a weak reference
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        yield


@contextlib.contextmanager
def gathered_head(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The full output-head weight of ``model`` (a module or a DeepSpeed engine) for the duration of the block;
    under ZeRO-3 it is gathered (collective: every rank enters with the same sequence of micro-batches)."""
    w = fused_loss.head_weight(model)
    if hasattr(w, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([w], modifier_rank=None):
            yield w
    else:
        yield w
