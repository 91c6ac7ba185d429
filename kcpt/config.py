"""One validated config tree for everything kcpt does.

``KcptConfig`` holds ``model``, ``tokenizer``, ``data``, ``plan`` (the stages), ``train``, ``tune``,
``logging`` and ``eval`` (evaluation reports). Every section has defaults that run the embedded demo on 2 CPU
cores. Load YAML with :func:`load_config`; an unknown key or a wrong type raises
:class:`~kcpt.errors.ConfigError` naming the file and the dotted key path. A stage is data (see
:class:`StageConfig`): CPT, stage 1, stage 2 and stage 3 are four entries of ``plan`` run by one loop.
"""

from __future__ import annotations

import copy
import json
import math
import re
import stat
import string
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from kcpt.errors import ConfigError
from kcpt.hashing import sha256_json

LossKind = Literal["full", "answer_only"]


def _accepts(annotation: Any, typ: type) -> bool:
    if annotation is typ:
        return True
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and typ in typing.get_args(annotation)


class Strict(BaseModel):
    """Base: unknown keys are errors; assignments are validated; numbers must be finite (no NaN/inf); a boolean
    field takes only ``true``/``false`` (not ``"yes"``, ``1``) and a number field takes no boolean."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_bools(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return v
        if _accepts(field.annotation, bool) and not isinstance(v, bool) and not (v is None and
                                                                                 _accepts(field.annotation,
                                                                                          type(None))):
            raise ValueError(f"must be true or false, got {v!r}")
        if isinstance(v, bool) and not _accepts(field.annotation, bool) and (
                _accepts(field.annotation, int) or _accepts(field.annotation, float)):
            raise ValueError(f"must be a number, got {v!r}")
        return v


# --------------------------------------------------------------------------- model / tokenizer


class TinyModelConfig(Strict):
    """Shape of the built-in tiny Llama (random init) used when ``model.name_or_path == "tiny"``.

    The vocabulary size is taken from the tokenizer.
    """

    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(256, gt=0)
    max_position_embeddings: int = Field(2048, gt=0)
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class ModelConfig(Strict):
    name_or_path: str = "tiny"
    """``"tiny"`` (built-in tiny Llama), a local HF model directory, or a hub name where a hub is reachable."""
    tiny: TinyModelConfig = TinyModelConfig()
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"] = "sdpa"
    """Packed rows are isolated under every one (:mod:`kcpt.model.attention`): sdpa/eager with a block-causal
    mask, flex_attention with a block mask built once per batch, flash_attention_2/3 with varlen kernels
    (``cu_seqlens`` from the position-id restarts, no mask). The flash kinds need their package and a GPU; an
    unavailable one is refused when the model is built, naming what is missing."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype. Trained weights stay float32 (master copy) with ``torch.autocast`` to this dtype, or
    DeepSpeed's bf16/fp16 mode under ``train.deepspeed``; the frozen KL reference is stored in it. float16
    needs DeepSpeed (loss scaling)."""
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    """Seed of the random init of the tiny model."""


class TokenizerConfig(Strict):
    path: str = "demo"
    """``"demo"``: a byte-level BPE trained deterministically on the demo corpus; else a local path / hub name."""
    vocab_size: int = Field(8192, gt=256)
    """Target vocabulary of the demo BPE (it may stop below on a small corpus)."""


# --------------------------------------------------------------------------- data


class FilterConfig(Strict):
    """Quality filters applied to raw documents after NFC normalisation and control-character stripping."""

    min_chars: int = Field(20, ge=0)
    """Documents with fewer characters (after normalisation, surrounding whitespace stripped) are dropped
    (reason ``too_short``)."""
    min_hangul_ratio: float = Field(0.3, ge=0.0, le=1.0)
    """Hangul syllables / letters (Hangul + Latin + CJK); documents below are dropped (reason ``hangul_ratio``)."""
    max_dup_line_frac: float = Field(0.3, ge=0.0, le=1.0)
    """Fraction of non-empty lines that repeat an earlier line of the same document."""
    ngram_n: int = Field(5, ge=1)
    max_top_ngram_frac: float = Field(0.2, ge=0.0, le=1.0)
    """Repetition filter: share of the words covered by the occurrences of the most frequent word ``ngram_n``-gram
    (0 when no n-gram repeats); documents above are dropped (reason ``repeated_ngrams``)."""
    dedup: bool = True
    """Exact dedup by SHA-256 of the normalised text."""
    max_line_chars: int = Field(1_000_000, gt=0)
    """A physical line longer than this is rejected with a message (reason ``line_too_long``). It bounds what one
    line of a file holds in memory, so it counts the line as stored: in a JSONL file written with ASCII escapes
    (Python's ``json.dumps`` default) each Hangul syllable is a 6-character ``\\uXXXX``."""


class ExamTemplate(Strict):
    """How an exam item becomes text. ``{question}`` and ``{choices}`` are filled; the answer follows."""

    prompt: str = "질문: {question}\n답: "
    prompt_with_choices: str = "질문: {question}\n{choices}\n답: "
    choice: str = "{label}. {text}"
    choice_labels: list[str] = ["①", "②", "③", "④", "⑤", "⑥", "⑦", "⑧"]
    choice_separator: str = "\n"

    @model_validator(mode="after")
    def _fields(self) -> ExamTemplate:
        """Each template may use only its own fields (plain ``{name}``; ``{{``/``}}`` for literal braces) and
        must contain the ones it exists for, so no item silently loses its question or its choices."""
        for key, allowed, required in (("prompt", {"question"}, {"question"}),
                                       ("prompt_with_choices", {"question", "choices"}, {"question", "choices"}),
                                       ("choice", {"label", "text"}, {"text"})):
            text, used = getattr(self, key), set()
            try:
                parsed = list(string.Formatter().parse(text))
            except ValueError as e:
                raise ValueError(f"{key}: {e} (write {{{{ and }}}} for literal braces)") from None
            for _, name, spec, conv in parsed:
                if name is None:
                    continue
                if name not in allowed or spec or conv:
                    raise ValueError(f"{key}: unknown field {{{name}{'!' + conv if conv else ''}"
                                     f"{':' + spec if spec else ''}}}; it may use only "
                                     f"{', '.join('{' + a + '}' for a in sorted(allowed))}")
                used.add(name)
            if required - used:
                raise ValueError(f"{key}: must contain "
                                 f"{', '.join('{' + r + '}' for r in sorted(required - used))}")
        if not self.choice_labels or any(not lab.strip() for lab in self.choice_labels):
            raise ValueError("choice_labels: must be a non-empty list of non-empty labels")
        return self


class DatasetConfig(Strict):
    """One named dataset. ``inputs`` are files or directories (txt, jsonl, parquet, HF ``save_to_disk`` dirs);
    ``demo:<split>`` names a split of the embedded demo corpus (raw_train, raw_val, qa_train, qa_val,
    example_train, example_val)."""

    kind: Literal["raw", "exam"]
    inputs: list[str]
    text_field: str = "text"
    exam_kind: Literal["qa", "example"] | None = None
    """Keep only exam items of this kind (``None``: all)."""
    oversample_new_tokens: int = Field(1, ge=1)
    """Raw datasets: write each document that holds a token added by vocabulary expansion (an id ≥
    ``first_new_id`` of the tokenizer directory's ``kcpt-expansion.json``, written by ``kcpt audit-tokenizer
    --expand N --model M --out DIR``) this many times, so the new embeddings train on more occurrences
    (1: off; counted as the ``oversampled_new_tokens`` notice)."""


def _demo_datasets() -> dict[str, DatasetConfig]:
    return {
        "raw_train": DatasetConfig(kind="raw", inputs=["demo:raw_train"]),
        "raw_val": DatasetConfig(kind="raw", inputs=["demo:raw_val"]),
        "qa_train": DatasetConfig(kind="exam", inputs=["demo:qa_train"]),
        "qa_val": DatasetConfig(kind="exam", inputs=["demo:qa_val"]),
        "example_train": DatasetConfig(kind="exam", inputs=["demo:example_train"]),
        "example_val": DatasetConfig(kind="exam", inputs=["demo:example_val"]),
        "exam_val": DatasetConfig(kind="exam", inputs=["demo:qa_val", "demo:example_val"]),
    }


class DataConfig(Strict):
    seq_len: int = Field(256, ge=8)
    strict: bool = False
    """Turn every counted skip (filtered document, bad record, truncated exam answer) into an error."""
    txt_split: Literal["file", "blank_lines"] = "file"
    """How a ``.txt`` input becomes documents: ``file`` (one per file) or ``blank_lines`` (a run of ≥ 2 blank
    lines ends a document; a single blank line stays inside it as a paragraph break)."""
    filters: FilterConfig = FilterConfig()
    template: ExamTemplate = ExamTemplate()
    prepared_root: str = "prepared"
    """Prepared datasets are written under ``<prepared_root>/<name>-<hash>/`` and reused when the hash matches."""
    datasets: dict[str, DatasetConfig] = Field(default_factory=_demo_datasets)
    ray_data: bool = False
    """Prepare with the Ray Data pipeline (``map_batches``, streaming) instead of in-process."""
    max_reject_fraction: float | None = Field(None, ge=0.0, le=1.0)
    """None (default): rejects are reported (a warning above 10 % of a raw dataset or for any exam item, see
    :mod:`kcpt.data.report`). A number: a job stops (exit 2) when one reject reason, or all together, drop more
    than this fraction of a dataset's documents/items."""
    loader: Literal["ray_data", "stream", "memory"] = "stream"
    """How training workers read the prepared rows: ``stream`` (default: row groups read lazily from the
    prepared directory or URI by the worker itself, a bounded window in memory, seekable resume;
    :mod:`kcpt.train.streams`), ``ray_data`` (each source a Ray Dataset handed to the ``TorchTrainer`` and pulled
    with ``get_dataset_shard``: reads run in Ray Data tasks; :mod:`kcpt.train.ray_stream`) or ``memory`` (every
    row of every source decoded into RAM per worker: small data only; :mod:`kcpt.train.batches`)."""
    stream_window_rows: int = Field(1024, ge=1)
    """``stream``: rows per shuffle window (whole row groups; at most ~3 windows per source are in memory);
    ``ray_data``: rows of the local shuffle buffer."""
    ray_data_materialize_rows: int = Field(65536, ge=0)
    """``ray_data``: a source of at most this many rows is read once into Ray's object store and repeated, so a
    Ray Data execution (0.1-3 s to start) is not paid every few steps for a small exam set."""
    ray_data_read_cpus: float = Field(0.25, gt=0)
    """``ray_data``: CPUs each read task reserves (the training workers hold theirs)."""
    held_out_overlap: Literal["warn", "error", "ignore"] = "warn"
    """A held-out set (a stage's ``eval_raw`` / ``eval_exam``) that shares exam questions or input files with a
    training source of the same stages (:mod:`kcpt.data.overlap`): a warning under the data table, an error before
    training, or nothing."""


# --------------------------------------------------------------------------- plan (stages)


class LRConfig(Strict):
    """Linear warmup to ``peak`` over ``warmup_steps``, then cosine decay to ``peak * min_ratio`` at max_steps."""

    peak: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    min_ratio: float = Field(0.1, ge=0.0, le=1.0)


class StopConfig(Strict):
    """When a stage ends (besides ``max_steps``).

    - ``plateau`` (CPT): stop after ``patience`` evals whose raw val loss did not improve on the best by
      ``min_delta`` (absolute) or by ``min_delta_relative`` × best, whichever is larger.
    - ``exam`` (stages 1/2): stop when (exam ≤ ``exam_target`` OR exam plateaued for ``patience`` evals)
      AND raw ≤ baseline_raw_best · (1 + ``raw_tolerance``).
    - ``gate`` (stage 3): raw ≤ baseline_raw_best · (1 + ``raw_tolerance``) AND exam ≤ ``exam_target`` for
      ``consecutive`` evals in a row.
    - ``max_steps``: run to ``max_steps``.

    "exam" is the metric ``exam_metric`` names: ``loss`` (answer-only exam val loss in nats; met when
    exam ≤ ``exam_target``) or ``accuracy`` (multiple-choice exam accuracy, a fraction in [0, 1]; met when
    exam ≥ ``exam_target``; needs ``eval.exam_accuracy``). ``exam_target``, ``min_delta`` and the plateau
    are in that metric's units and direction.
    """

    rule: Literal["plateau", "exam", "gate", "max_steps"] = "plateau"
    patience: int = Field(5, ge=1)
    """Evals without a significant improvement before ``plateau`` / exam-plateau (recipe: 5-10)."""
    min_delta: float = Field(0.01, ge=0.0)
    """A significant improvement is at least max(``min_delta``, ``min_delta_relative`` · best) nats."""
    min_delta_relative: float = Field(0.002, ge=0.0)
    exam_target: float | None = None
    exam_metric: Literal["loss", "accuracy"] = "loss"
    """What the ``exam``/``gate`` rules (target, plateau, best eval) and the tuner's objective use: ``loss``
    (lower is better) or ``accuracy`` (``exam_acc``, higher is better)."""
    raw_tolerance: float = Field(0.03, ge=0.0)
    consecutive: int = Field(5, ge=1)
    raw_bound: bool = True
    """``exam`` rule: ``true`` (default) — the stage needs ``baseline_raw_best`` (a ``sets_baseline`` stage
    earlier in the run, or given at launch) and the run refuses to start without one; ``false`` — the stage
    runs without the raw bound, said explicitly. The ``gate`` rule always needs the baseline."""

    @model_validator(mode="after")
    def _needs_target(self) -> StopConfig:
        if self.rule == "gate" and self.exam_target is None:
            raise ValueError("stop.rule 'gate' needs stop.exam_target")
        if self.rule == "gate" and not self.raw_bound:
            raise ValueError("stop.rule 'gate' is raw bound AND exam target: raw_bound false is not allowed")
        return self

    @property
    def needs_baseline(self) -> bool:
        """The rule compares raw val loss with ``baseline_raw_best``."""
        return self.rule == "gate" or (self.rule == "exam" and self.raw_bound)


class MixturePhase(Strict):
    """From ``start_frac`` of the stage's max_steps on, these weights hold (``mixture_mode: step``) or move
    linearly toward the next phase's (``linear``)."""

    start_frac: float = Field(ge=0.0, le=1.0)
    weights: dict[str, float]


class StageConfig(Strict):
    """One stage of the plan. A stage is data: the loop is the same for all."""

    name: str
    sources: dict[str, float]
    """Training dataset name → sampling weight (normalised)."""
    losses: dict[str, LossKind] = {}
    """Per-source loss; default ``full`` for raw datasets and ``answer_only`` for exam datasets."""
    mixture_schedule: list[MixturePhase] = []
    mixture_mode: Literal["linear", "step"] = "linear"
    """How weights go from one phase to the next: linear ramps, or steps (each phase holds until the next)."""
    max_steps: int = Field(100, ge=1)
    eval_every: int = Field(20, ge=1)
    micro_batch_size: int | None = Field(None, ge=1)
    """Rows per worker per step in this stage; ``None``: ``train.micro_batch_size``. Tokens per optimizer step
    are ``micro_batch_size · data.seq_len · train.grad_accum · num_workers``."""
    eval_raw: str = "raw_val"
    eval_exam: str | None = None
    lr: LRConfig = LRConfig()
    kl_beta: float = Field(0.0, ge=0.0)
    kl_reference: Literal["cpt_best", "base"] = "cpt_best"
    replay_sources: list[str] | None = None
    """Sources whose batches get the KL term (default: the raw sources of the stage)."""
    stop: StopConfig = StopConfig()
    restore: Literal["weights_only", "full"] = "weights_only"
    """How this stage starts from the previous stage's chosen checkpoint."""
    start_from: Literal["best", "best_raw", "best_exam", "pareto_knee", "last"] = "best"
    """Which checkpoint of the previous stage this stage starts from: ``best`` (that stage's best by its own
    rule), ``best_raw`` / ``best_exam`` (the ends of its (raw, exam) Pareto front), ``pareto_knee`` (the front
    point closest to the ideal corner after scaling both losses to [0, 1]) or ``last``. Every point of each
    stage's Pareto front is kept on disk."""
    sets_baseline: bool = False
    """This stage's best raw val loss becomes ``baseline_raw_best`` for later stages (CPT)."""

    def drawn_sources(self) -> list[str]:
        """Every source the stage can draw: its ``sources`` and the names in its ``mixture_schedule``."""
        names = list(self.sources)
        for ph in self.mixture_schedule:
            names += [n for n in ph.weights if n not in names]
        return names

    def unreachable_gate(self) -> str | None:
        """Why the stage's gate can never pass — it needs more consecutive evals than the stage makes (evals at every
        ``eval_every``-th step and at ``max_steps``; the step-0 eval counts for no gate) — or None."""
        evals = -(-self.max_steps // self.eval_every)
        if self.stop.rule != "gate" or self.stop.consecutive <= evals:
            return None
        return (f"the gate needs {self.stop.consecutive} evals in a row (stop.consecutive), but the stage evaluates "
                f"{evals} times (max_steps {self.max_steps}, eval_every {self.eval_every}), so it cannot pass")

    @field_validator("sources")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("a stage needs at least one source")
        if any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError("source weights must be ≥ 0 with a positive sum")
        return v


def _demo_plan() -> list[StageConfig]:
    """The demo plan (2 CPU workers, ~2.5 min), tuned on the embedded demo corpus: CPT stops on its plateau; the
    exam stages (with 20-30 % raw replay and KL to the CPT best) reach their targets on held-out exam questions
    while raw val loss stays within 3 % of the CPT best; stage 3 passes its gate."""
    return [
        StageConfig(name="cpt", sources={"raw_train": 1.0}, max_steps=100, eval_every=10,
                    lr=LRConfig(peak=2e-3, warmup_steps=10), sets_baseline=True,
                    stop=StopConfig(rule="plateau", patience=2, min_delta=0.0)),
        StageConfig(name="stage1", sources={"qa_train": 0.8, "raw_train": 0.2}, max_steps=60, eval_every=10,
                    eval_exam="exam_val", kl_beta=0.1, lr=LRConfig(peak=5e-4, warmup_steps=5),
                    stop=StopConfig(rule="exam", patience=2, min_delta=0.0, exam_target=3.7)),
        StageConfig(name="stage2", sources={"example_train": 0.7, "raw_train": 0.3}, max_steps=60, eval_every=10,
                    eval_exam="exam_val", kl_beta=0.2, lr=LRConfig(peak=3e-4, warmup_steps=5),
                    stop=StopConfig(rule="exam", patience=2, min_delta=0.0, exam_target=3.45)),
        StageConfig(name="stage3", sources={"qa_train": 0.35, "example_train": 0.35, "raw_train": 0.30},
                    max_steps=100, eval_every=10, eval_exam="exam_val",
                    lr=LRConfig(peak=5e-4, warmup_steps=5), kl_beta=0.1,
                    stop=StopConfig(rule="gate", exam_target=3.1, raw_tolerance=0.03, consecutive=3)),
    ]


# --------------------------------------------------------------------------- train / run


class AnomalyConfig(Strict):
    """Skip-and-roll-back rule (see :mod:`kcpt.train.anomaly`): loss or grad norm not finite, or — after
    ``min_history`` accepted steps of the stage — ln(norm) above the window's median by ``k_mad`` robust σ
    (1.4826·MAD) AND norm above ``min_spike_ratio`` × the window's ``reference_quantile`` norm."""

    window: int = Field(100, ge=2)
    min_history: int = Field(20, ge=2)
    """Per-stage warm-up: accepted steps of the stage before grad norms are judged (non-finite values always are)."""
    k_mad: float = Field(6.0, gt=0)
    min_spike_ratio: float = Field(10.0, ge=1.0)
    """A spike must also exceed this multiple of the window's ``reference_quantile`` norm: ordinary CPT norms at a
    small batch jump 4-5× the median early on (measured: bench/anomaly_false_positives.py); diverging ones jump
    10-1000×."""
    reference_quantile: float = Field(0.9, ge=0.5, lt=1.0)
    """Quantile of the window's norms that ``min_spike_ratio`` multiplies (0.5: the median). The upper tail, not
    the middle: at one or two rows per step a single row the model has not fit yet gives a norm 10-23× the
    window's median in an ordinary run (stage 3 of the demo at micro-batch 1: 3 of 9 seeds rolled back, one 5 times,
    one short of the abort); such a window's 90th percentile is 2-3× its median, so the bound moves with it."""
    min_log_scale: float = Field(0.05, gt=0)
    """Floor of the robust σ of ln(norm): a window of near-identical norms has MAD ≈ 0."""
    lr_factor: float = Field(0.5, gt=0, le=1.0)
    min_lr_scale: float = Field(0.125, gt=0, le=1.0)
    """Rollback LR cuts compound down to this fraction of the schedule, no further."""
    max_rollbacks: int = Field(5, ge=0)
    stable_every: int = Field(10, ge=1)
    """Take a new rollback point (weights + optimizer) every this many accepted steps (and at every checkpoint the
    stage goes on from: a resume from it starts there)."""

    @model_validator(mode="after")
    def _window_holds_the_history(self) -> AnomalyConfig:
        if self.min_history > self.window:
            raise ValueError(f"min_history ({self.min_history}) must be ≤ window ({self.window}): the window would "
                             "never hold enough norms, and gradient spikes would never be judged")
        return self


class DeepSpeedConfig(Strict):
    """DeepSpeed ZeRO (see :mod:`kcpt.train.engine`). ``config``: a DeepSpeed JSON file merged under kcpt's
    required keys (batch sizes, accumulation, clipping, precision, ZeRO stage, offload); a file that sets one
    of those to another value is an error naming the key."""

    zero_stage: Literal[2, 3] = 2
    offload_optimizer: bool = False
    """ZeRO-Offload of the optimizer state and step to CPU (torch AdamW on the CPU partitions)."""
    offload_params: bool = False
    """ZeRO-3 only: parameters (of the trained model and of the KL reference) live on CPU."""
    config: str | None = None


class FaultConfig(Strict):
    """Failure injection for tests (all off by default). Steps count from 1 within ``stage`` (default: the first
    stage the run trains). Each fault fires once per run (a crash leaves a marker in the run directory)."""

    stage: str | None = None
    nan_at_step: int | None = Field(None, ge=1)
    """The training loss of this step becomes NaN (before backward)."""
    grad_spike_at_step: int | None = Field(None, ge=1)
    """The training loss of this step is multiplied by ``grad_spike_factor`` (a gradient-norm spike)."""
    grad_spike_factor: float = Field(1e4, gt=0)
    crash_at_step: int | None = Field(None, ge=1)
    """The worker of rank ``crash_rank`` exits abruptly at this step (Ray Train replaces the worker group)."""
    crash_rank: int = Field(0, ge=0)
    hang_at_step: int | None = Field(None, ge=1)
    """The worker of rank ``crash_rank`` stops at this step without exiting, once (a node that stops responding):
    it appends ``faults/hang-<stage>-<step>`` and sleeps until its process is killed (a test removes its node)."""
    raise_at_step: int | None = Field(None, ge=1)
    """The worker of rank ``crash_rank`` raises a plain ``RuntimeError`` (a bug, not a KcptError) at this step,
    every attempt: its traceback must reach the console."""
    input_error_at_step: int | None = Field(None, ge=1)
    """The worker of rank ``crash_rank`` raises an ``InputError`` (deterministic: not retried) at this step, every
    attempt, and appends a line to ``faults/input-error-<stage>-<step>`` each time."""
    checkpoint_write_lag_steps: int | None = Field(None, ge=1)
    """A slow asynchronous checkpoint write: each write waits, before writing, until training has run this many
    steps past the save (or the loop joins the write), and records in ``faults/checkpoint-writes`` at which
    step it began."""
    checkpoint_write_error_at_step: int | None = Field(None, ge=1)
    """The asynchronous write of the checkpoint saved at this step fails (an ``OSError`` in the writer thread)."""


class TrainConfig(Strict):
    run_name: str = "demo"
    output_dir: str = "runs"
    """Run directory is ``<output_dir>/<run_name>/``."""
    seed: int = 0
    num_workers: int = Field(2, ge=1)
    min_workers: int | None = Field(None, ge=1)
    """Elastic training: Ray Train runs the plan on anywhere from ``min_workers`` to ``num_workers`` workers
    (``ScalingConfig(num_workers=(min, max))``): it starts with as many as the cluster has room for, goes on with
    fewer when a node is lost (from the last checkpoint) and grows again when nodes come back. Every step keeps
    ``num_workers``' rows (:func:`kcpt.train.layout.step_layout`: on fewer workers the ranks accumulate more
    micro-batches, and ranks the step's micro-batches do not divide over run padding micro-batches that weigh
    nothing), so the gradients are those of the full-size run. ``None``: a fixed ``num_workers``. With
    ``data.loader: ray_data`` each Ray Dataset is split over the reading workers only; a restart on another number
    of readers splits the current epoch anew (rows of it may come again)."""
    elastic_resize_interval_s: float | None = Field(None, gt=0)
    """Elastic runs: how often Ray Train looks for room for more workers while the group is healthy
    (``ScalingConfig.elastic_resize_monitor_interval_s``; ``None``: Ray's default, 60 s); a resize restarts the
    group from the last checkpoint."""
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(8, ge=1)
    """Rows per worker per step."""
    grad_accum: int = Field(1, ge=1)
    eval_batch_size: int = Field(8, ge=1)
    max_eval_rows: int | None = Field(None, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    clip_grad_norm: float = Field(1.0, gt=0)
    anomaly: AnomalyConfig = AnomalyConfig()
    deepspeed: DeepSpeedConfig | None = None
    keep_last: int = Field(2, ge=1)
    """Checkpoints kept besides each stage's best."""
    max_failures: int = Field(2, ge=0)
    shuffle_buffer_rows: int = Field(256, ge=1)
    eval_at_start: bool = True
    """Evaluate once before a stage's first step (step 0: the stage's starting point). It counts for no patience,
    best or gate; a plateau must beat it to pass (``kcpt.train.stopping``: "no gain on the start")."""
    stop_plan_without_gain: bool = True
    """A stage that sets the baseline (CPT) and ends without a gain on its start — its raw val loss never went
    below the step-0 eval's, e.g. at too high an LR — stops the plan (``TrainingAborted``, its message naming the
    start, the best and the LR): the later stages would start from a model worse than the one CPT began with and
    be held to the start's raw loss, which they cannot keep. ``false``: the plan goes on."""
    checkpoint_every_eval: bool = True
    """Save checkpoints periodically (every ``checkpoint_every_evals``-th eval) besides the new bests, the
    stop and new Pareto-front points; ``false``: only those."""
    checkpoint_every_evals: int = Field(1, ge=1)
    """Periodic checkpoints at every K-th eval of a stage (a new best, the stop and a new front point are always
    saved). A checkpoint costs a host copy of the weights + optimizer (``async_checkpoint``; a blocking write
    otherwise) and disk / upload traffic; a larger K makes evals cheaper, but a worker failure resumes from the
    last checkpoint: up to ``K · eval_every`` steps are recomputed."""
    async_checkpoint: bool = True
    """Write checkpoints off the critical path: at the save the weights, optimizer and trainer state are copied
    to host memory (the only part the training steps wait for); a background thread writes, fsyncs, verifies
    and publishes them while training goes on, and is joined at the next eval, at the stage end and at exit
    (a write error is raised there, naming the checkpoint). Ray Train is told of a checkpoint after it is
    complete (with the next eval's report). Under DeepSpeed checkpoints stay synchronous (its
    ``save_checkpoint`` is a collective of every rank). ``false``: every save is written before the step goes on."""
    checkpoint_checksums: bool = True
    """A CRC-32 of every checkpoint file in its manifest (computed by the writer after the files are written, ~2
    GB/s on one core; off the training thread with ``async_checkpoint``), checked when a run loads the file: a
    file changed at the same size after the save (a disk or copy error) is refused, naming it, instead of trained
    on. Checkpoints written without them load as before."""
    compile: bool = False
    """``torch.compile`` each decoder layer of the trained model (:func:`kcpt.model.loading.compile_layers`). Not
    with ZeRO-3 (its parameter-gathering hooks run inside every layer)."""
    fused_optimizer: bool = True
    """``torch.optim.AdamW(fused=True)`` where the optimized parameters live on CUDA (DDP on GPUs, ZeRO-2/3 without
    optimizer offload); the foreach implementation elsewhere. Norms, biases and embeddings get no weight decay."""
    fused_loss: bool = True
    """CE and KL from the final hidden states in chunks over tokens (:mod:`kcpt.train.fused_loss`): no
    full-vocabulary float32 logits (of the model or the KL reference) in training or eval. ``false``: the
    plain path through the logits (:mod:`kcpt.train.losses`), kept for comparison."""
    fused_loss_kernel: Literal["auto", "torch", "liger"] = "auto"
    """Kernel of the fused loss: ``torch`` (chunks in plain torch), ``liger`` (Liger-Kernel's Triton fused linear
    cross-entropy, CUDA only, the ``kcpt[gpu]`` extra; micro-batches with KL keep the torch chunks), ``auto``
    (liger when installed and training on CUDA, else torch). ``liger`` without the package or without CUDA is
    refused when the stage starts. See :mod:`kcpt.train.fused_loss`."""
    loss_chunk_tokens: int | None = Field(None, ge=1)
    """Tokens per chunk of the fused loss; default: about 64 MiB of float32 logits per chunk."""
    faults: FaultConfig = FaultConfig()


# --------------------------------------------------------------------------- tune


class FloatRange(Strict):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _order(self) -> FloatRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class SearchSpace(Strict):
    exam_fraction: FloatRange = FloatRange(low=0.4, high=0.9)
    """exam : raw share of the stage-3 mixture (exam = qa + examples)."""
    qa_fraction: FloatRange = FloatRange(low=0.2, high=0.8)
    """qa : examples share inside the exam part."""
    lr: FloatRange = FloatRange(low=1e-4, high=3e-3, log=True)
    kl_beta: FloatRange = FloatRange(low=1e-3, high=3.0, log=True)
    """KL weight β (log-uniform). The range reaches above 1: on the demo the fastest gate passes measured sit at
    β ≈ 1 (docs/tuning.md), which a range ending at 1 only reaches at its edge."""
    kl_allow_off: bool = True
    """Also sample β = 0 ("off") as a categorical choice."""
    extra: dict[str, FloatRange] = {}
    """More float parameters as dotted stage-config paths, e.g. ``{"lr.min_ratio": {low: 0.05, high: 0.3}}``."""
    mixture_shapes: list[Literal["fixed", "linear", "recipe_step"]] = Field(default_factory=lambda: ["fixed"],
                                                                             min_length=1)
    """Mixture shapes the tuner may choose (a categorical ``mixture_shape`` when more than one): ``fixed`` —
    ``exam_fraction`` for the whole stage; ``linear`` — the exam share moves linearly from ``exam_fraction`` at
    the start to ``exam_fraction_end`` (also sampled, same range) at the end; ``recipe_step`` — the recipe's
    exam:raw schedule 70:30 → 50:50 → 60:40 as step phases at 0, 1/3 and 2/3 of the stage (``exam_fraction`` is
    then not sampled)."""
    micro_batch_sizes: list[int] = []
    """Micro-batch sizes (rows per worker per step) the tuner may choose (a categorical ``micro_batch_size``; empty:
    the stage's own). Token-fair: a trial at micro-batch ``m`` runs the stage's ``max_steps``, ``eval_every`` and
    ``lr.warmup_steps`` scaled by ``ref / m`` (``ref``: the stage's micro-batch), so every trial has the same
    token budget, evaluates (and counts the gate's consecutive evals) at the same tokens and warms up over the
    same tokens; only the number of optimizer steps those tokens make differs. Each size must scale
    ``max_steps`` and ``eval_every`` to whole steps."""
    qa_source: str = "qa_train"
    """Stage-3 source that gets ``exam_fraction · qa_fraction`` of the mixture."""
    example_source: str = "example_train"
    """Stage-3 source that gets ``exam_fraction · (1 − qa_fraction)``."""
    raw_source: str = "raw_train"
    """Stage-3 source that gets ``1 − exam_fraction``."""

    @model_validator(mode="after")
    def _ranges(self) -> SearchSpace:
        for name in ("exam_fraction", "qa_fraction"):
            r = getattr(self, name)
            if r.low < 0 or r.high > 1:
                raise ValueError(f"{name}: a share of the mixture, so its range must lie in [0, 1], got "
                                 f"[{r.low:g}, {r.high:g}]")
        if self.lr.low <= 0:
            raise ValueError(f"lr: a learning rate must be > 0, got low {self.lr.low:g}")
        if self.kl_beta.low < 0:
            raise ValueError(f"kl_beta: must be ≥ 0, got low {self.kl_beta.low:g}")
        for m in self.micro_batch_sizes:
            if m < 1:
                raise ValueError(f"micro_batch_sizes: rows per worker per step must be ≥ 1, got {m}")
        return self


class AshaConfig(Strict):
    enabled: bool = True
    time_attr: Literal["tokens", "evals"] = "tokens"
    """ASHA's fidelity: ``tokens`` — training tokens of the tuned stage (``tokens_seen``), so trials with different
    batch shapes are compared at equal training cost; ``evals`` — reported evals (``training_iteration``)."""
    grace_period: int = Field(2, ge=1)
    """In evals of the base config's tuned stage (with ``time_attr: tokens``: that many evals' worth of tokens at
    the base batch shape, unless ``grace_tokens`` is set)."""
    grace_tokens: int | None = Field(None, ge=1)
    """Grace period in training tokens (``time_attr: tokens`` only); overrides ``grace_period``."""
    reduction_factor: int = Field(2, ge=2)

    @model_validator(mode="after")
    def _grace_unit(self) -> AshaConfig:
        if self.grace_tokens is not None and self.time_attr != "tokens":
            raise ValueError("grace_tokens: a grace in tokens needs time_attr: tokens; with time_attr: evals set "
                             "grace_period (in evals)")
        return self


class ReevalConfig(Strict):
    top_k: int = Field(0, ge=0)
    """Re-run the ``top_k`` best feasible trials with ``seeds`` more training seeds after the search, and choose
    ``best_config.yaml`` by their mean over all runs (0: off, the study's single-seed best). One run per trial
    is a noisy draw: with the ``tokens_to_gate`` objective, tokens are counted in whole evals and seeds move the
    pass by one or two evals, more than separates the best few trials (docs/tuning.md)."""
    seeds: int = Field(2, ge=1)
    """Extra training seeds per re-evaluated trial: ``train.seed + 1`` … ``train.seed + seeds`` (the trials
    ran at ``train.seed``)."""


class TuneConfig(Strict):
    stage: str = "stage3"
    num_samples: int = Field(6, ge=1)
    max_concurrent: int = Field(1, ge=1)
    storage: str | None = None
    """Optuna storage (see :mod:`kcpt.tune.study_storage`): ``None`` or ``sqlite`` — ``sqlite:///<experiment
    dir>/optuna.db`` (one machine); ``journal`` — Optuna's JournalStorage in ``<experiment dir>/optuna.journal``,
    ``journal:///abs/path.journal`` — a journal file anywhere (a shared filesystem every node mounts); any other
    value is an SQLAlchemy URL (``sqlite:///…``, ``postgresql+psycopg2://user:pw@host/db`` with
    ``pip install 'kcpt[postgres]'``, ``mysql+pymysql://…``)."""
    study_name: str = "kcpt-stage3"
    experiment_dir: str = "experiments"
    sampler_seed: int = 0
    n_startup_trials: int = Field(3, ge=0)
    space: SearchSpace = SearchSpace()
    asha: AshaConfig = AshaConfig()
    num_workers: int | None = Field(None, ge=1)
    """Ray Train workers per trial; ``None`` (default): ``train.num_workers`` — trials train at the world size
    (and global batch) the prerequisite stages and ``best_config.yaml`` use. See :meth:`KcptConfig.tune_workers`."""
    stage_overrides: dict[str, Any] = {}
    """Dotted stage-config path → value applied to the tuned stage of every trial (e.g. ``{"max_steps": 40}``)."""
    objective: Literal["tokens_to_gate", "exam"] = "tokens_to_gate"
    """What the search minimises among feasible trials (see :mod:`kcpt.tune.objective`): ``tokens_to_gate`` —
    lexicographic: gate passed first, then fewer training tokens to the pass, then lower exam loss; ``exam`` —
    the exam val loss at the selected eval. Infeasible trials rank last either way (Optuna's constraint)."""
    enqueue_recipe: bool = True
    """Enqueue the recipe's own settings (the tuned stage as configured, and the recipe's step schedule when
    ``space.mixture_shapes`` offers it) as the first trials of a new study (Optuna ``enqueue_trial``)."""
    reeval: ReevalConfig = ReevalConfig()
    """Re-evaluation of the best trials on more seeds before the best config is chosen (:mod:`kcpt.tune.reeval`)."""
    infeasible_penalty: float = Field(100.0, ge=0)
    """``gate_score`` (what ASHA compares) = objective + penalty · max(0, constraint)."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of the local Ray the tune job starts (default: enough for ``max_concurrent`` trials, ≥ 3)."""


class LoggingConfig(Strict):
    tensorboard: bool = True
    mlflow_tracking_uri: str | None = None
    """Tune jobs: each trial's reports also go to this MLflow server (``kcpt[mlflow]``); training runs log to
    TensorBoard and ``metrics.jsonl`` only."""
    progress: bool = True
    """The console's progress: a bar per stage / for tune on a terminal, plain lines otherwise; eval lines."""
    verbose: bool = False
    """Ray's own output on the console (``--verbose``); default: it goes to Ray's log files only
    (:mod:`kcpt.console`)."""


# --------------------------------------------------------------------------- evaluation (reports)


class FieldBucket(Strict):
    """Buckets by a field of the raw records (a JSONL key, a Parquet / HF column): one bucket per value, or per
    ``pattern`` match (the first capture group if the regex has one, else the whole match)."""

    field: str
    pattern: str | None = None

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression ({e})") from None
        return v


class BucketsConfig(Strict):
    """Evaluation buckets of the forgetting / drift report (:mod:`kcpt.eval.forgetting`). Each kind partitions the
    probe set on its own: ``source`` by probe dataset, ``length_bands`` by the document's length in tokens,
    ``fields`` by a field of the raw record (a document without it is in bucket ``(missing)``)."""

    source: bool = True
    length_bands: list[int] = Field(default_factory=lambda: [256, 1024])
    """Band edges in tokens (strictly increasing, > 0): ``[256, 1024]`` gives ``<256``, ``256-1023``, ``>=1024``;
    ``[]``: no length buckets."""
    fields: dict[str, FieldBucket] = {}
    """Bucket name → field, e.g. ``{domain: {field: domain}}`` or ``{origin: {field: id, pattern: "^([a-z]+)-"}}``."""

    @field_validator("fields")
    @classmethod
    def _not_reserved(cls, v: dict[str, FieldBucket]) -> dict[str, FieldBucket]:
        for name in v:
            if name in ("all", "source", "length"):
                raise ValueError(f"'{name}' is a built-in bucket kind; name the field bucket otherwise")
        return v

    @field_validator("length_bands")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= 0 for b in v) or any(b >= c for b, c in zip(v, v[1:], strict=False)):
            raise ValueError(f"band edges must be > 0 and strictly increasing, got {v}")
        return v


class ForgettingConfig(Strict):
    """The fixed probe set of the forgetting / drift report: the first ``probe_tokens`` tokens of each probe
    dataset (its documents in input order, read, cleaned and tokenized as ``prepare`` does; the document that
    crosses the budget is cut there)."""

    datasets: list[str] | None = None
    """Raw datasets to probe; ``None``: every ``eval_raw`` of the plan (held-out raw text)."""
    probe_tokens: int = Field(16384, ge=1)
    """Token budget per probe dataset."""
    batch_size: int = Field(8, ge=1)
    """Probe rows per forward."""


class EvalConfig(Strict):
    """Evaluation beyond the two losses (see :mod:`kcpt.eval`)."""

    exam_accuracy: bool = True
    """At every eval of a stage with ``eval_exam``: score the held-out exam items (the prepared dataset's
    ``items.jsonl``) — multiple choice by length-normalised log-likelihood (``exam_acc``), short answers by
    greedy decoding (``exam_em``, ``exam_f1``); :mod:`kcpt.eval.exam_scoring`."""
    exam_accuracy_max_items: int | None = Field(None, ge=1)
    """Score only the first N items of the eval exam set (cost cap); None: all."""
    exam_length_norm: Literal["chars", "tokens", "none"] = "chars"
    """Multiple-choice ranking: log-likelihood per character of the choice (lm-eval ``acc_norm``), per token,
    or the plain sum (lm-eval ``acc``)."""
    exam_batch_size: int | None = Field(None, ge=1)
    """Sequences per forward when scoring (choices; prompts being decoded); None: ``train.eval_batch_size``."""
    exam_max_new_tokens: int | None = Field(None, ge=1)
    """Greedy decoding limit for short answers; None: longest reference answer in tokens + 8."""
    buckets: BucketsConfig = BucketsConfig()
    """Evaluation buckets of the forgetting report (by source, length band, user fields)."""
    forgetting: ForgettingConfig = ForgettingConfig()
    """The forgetting/drift report's probe set (:mod:`kcpt.eval.forgetting`)."""


class KcptConfig(Strict):
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    plan: list[StageConfig] = Field(default_factory=_demo_plan)
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _references(self) -> KcptConfig:
        names = set(self.data.datasets)
        seen: set[str] = set()
        for i, st in enumerate(self.plan):
            if st.name in seen:
                raise ValueError(f"plan.{i}.name: duplicate stage name '{st.name}'")
            seen.add(st.name)
            refs = [*st.sources, *st.losses, st.eval_raw, *([st.eval_exam] if st.eval_exam else [])]
            refs += [k for ph in st.mixture_schedule for k in ph.weights]
            for r in refs:
                if r not in names:
                    raise ValueError(f"plan.{i} ({st.name}): unknown dataset '{r}' (defined: {sorted(names)})")
            if st.stop.rule in ("exam", "gate") and st.eval_exam is None:
                raise ValueError(f"plan.{i} ({st.name}): stop.rule '{st.stop.rule}' needs eval_exam")
            for key, name, kind in (("eval_raw", st.eval_raw, "raw"), ("eval_exam", st.eval_exam, "exam")):
                if name is not None and self.data.datasets[name].kind != kind:
                    raise ValueError(f"plan.{i}.{key}: '{name}' is {'an exam' if kind == 'raw' else 'a raw'} dataset; "
                                     f"{key} must be {'held-out raw text' if kind == 'raw' else 'an exam dataset'}")
            self._check_per_source(i, st)
        for i, r in enumerate(self.eval.forgetting.datasets or []):
            if r not in names:
                raise ValueError(f"eval.forgetting.datasets.{i}: unknown dataset '{r}' (defined: {sorted(names)})")
            if self.data.datasets[r].kind != "raw":
                raise ValueError(f"eval.forgetting.datasets.{i}: '{r}' is an exam dataset; the probe set is raw text")
        for name in self.eval.buckets.fields:
            problem = unsafe_name(name)
            if problem:
                raise ValueError(f"eval.buckets.fields.{name}: {problem}")
        return self

    def _check_per_source(self, i: int, st: StageConfig) -> None:
        """``losses`` and ``replay_sources`` name sources the stage draws, and change something there: a name it
        never draws (a typo, a held-out set) and ``answer_only`` on raw text (no prompt to mask) were silently no-ops;
        a KL weight with no replay source loaded the reference for nothing."""
        drawn = st.drawn_sources()
        where = f"plan.{i} ({st.name})"
        for key, names in (("losses", list(st.losses)), ("replay_sources", st.replay_sources or [])):
            for r in names:
                if r not in drawn:
                    raise ValueError(f"{where}: {key} names '{r}', which the stage does not draw (its sources: "
                                     f"{drawn})")
        for r, kind in st.losses.items():
            if kind == "answer_only" and self.data.datasets[r].kind == "raw":
                raise ValueError(f"{where}: losses.{r} is answer_only, but '{r}' is raw text: it has no prompt to "
                                 "leave out, so every token trains (use full)")
        if st.kl_beta > 0 and not self.replay_sources(st):
            raise ValueError(f"{where}: kl_beta {st.kl_beta:g}, but no source gets the KL term (it applies to "
                             "replay_sources, by default the stage's raw sources): add a raw source, name "
                             "replay_sources, or set kl_beta 0")

    @model_validator(mode="after")
    def _bounds(self) -> KcptConfig:
        """Values that validate alone but cannot work: unsafe names (they become file names), fractions out of
        range, weights that do not make a distribution."""
        names = [("train.run_name", self.train.run_name), ("tune.study_name", self.tune.study_name)]
        names += [(f"plan.{i}.name", st.name) for i, st in enumerate(self.plan)]
        names += [(f"data.datasets.{k}", k) for k in self.data.datasets]
        for where, name in names:
            problem = unsafe_name(name)
            if problem:
                raise ValueError(f"{where}: {problem}")
        t = self.train
        if t.min_workers is not None:
            if t.min_workers > t.num_workers:
                raise ValueError(f"train.min_workers: {t.min_workers} is more than train.num_workers "
                                 f"({t.num_workers}), the most workers an elastic run trains on")
        if self.model.dtype == "float16" and t.deepspeed is None:
            raise ValueError("model.dtype: float16 needs loss scaling, which only train.deepspeed gives here: set "
                             "train.deepspeed, or model.dtype bfloat16")
        if t.compile and t.deepspeed is not None and t.deepspeed.zero_stage == 3:
            raise ValueError("train.compile: not with ZeRO-3 (its parameter gathering runs inside every layer): use "
                             "train.deepspeed.zero_stage 2 or DDP, or train.compile false")
        for i, beta in enumerate(self.train.adam_betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"train.adam_betas.{i}: must be in [0, 1), got {beta}")
        for i, st in enumerate(self.plan):
            if not st.stop.raw_tolerance <= 1.0:
                raise ValueError(f"plan.{i}.stop.raw_tolerance: must be ≤ 1 (a fraction: 0.03 = 3 %), got "
                                 f"{st.stop.raw_tolerance}")
            if st.stop.exam_metric == "accuracy":
                if st.stop.exam_target is not None and not 0 < st.stop.exam_target <= 1:
                    raise ValueError(f"plan.{i}.stop.exam_target: exam_metric is accuracy, so the target is a "
                                     f"fraction in (0, 1] (0.6 = 60 % right), got {st.stop.exam_target}")
                if not self.eval.exam_accuracy:
                    raise ValueError(f"plan.{i}.stop.exam_metric: accuracy needs eval.exam_accuracy: true")
            elif st.stop.exam_target is not None and not st.stop.exam_target > 0:
                raise ValueError(f"plan.{i}.stop.exam_target: must be > 0 (a loss), got {st.stop.exam_target}")
            starts: dict[float, int] = {}
            for j, ph in enumerate(st.mixture_schedule):
                if any(w < 0 for w in ph.weights.values()) or sum(ph.weights.values()) <= 0:
                    raise ValueError(f"plan.{i}.mixture_schedule.{j}.weights: must be ≥ 0 with a positive sum")
                if ph.start_frac in starts:
                    raise ValueError(f"plan.{i}.mixture_schedule.{j}.start_frac: {ph.start_frac:g} is also phase "
                                     f"{starts[ph.start_frac]}'s; each phase needs its own start (one of them would "
                                     "never apply)")
                starts[ph.start_frac] = j
        return self

    @model_validator(mode="after")
    def _tune_paths(self) -> KcptConfig:
        """``tune.stage_overrides`` and ``tune.space.extra`` must make a valid tuned stage: checked here, not inside
        the first trial."""
        if self.tune.stage not in {st.name for st in self.plan}:
            return self
        st = self._tuned_stage_dict()
        for path, r in self.tune.space.extra.items():
            self._check_extra_range(st, path, r)
        ref = st.get("micro_batch_size") or self.train.micro_batch_size
        for m in self.tune.space.micro_batch_sizes:
            for key in ("max_steps", "eval_every"):
                if m < 1 or (st[key] * ref) % m:
                    raise ValueError(f"tune.space.micro_batch_sizes: {m} does not fit stage '{self.tune.stage}': "
                                     f"{key} {st[key]} at micro-batch {ref} is {st[key] * ref} rows per worker, "
                                     f"not a whole number of steps of {m} rows (token-fair scaling)")
        problem = _stage_problem(st)
        if problem:
            raise ValueError(f"tune.stage_overrides / tune.space.extra: stage '{self.tune.stage}' would have "
                             f"{problem[0]}: {problem[1]}")
        return self

    def _check_extra_range(self, st: dict[str, Any], path: str, r: FloatRange) -> None:
        """Both bounds of ``tune.space.extra.<path>`` must make a valid tuned stage (``st``: its dict with the
        overrides in), and an integer field's range must hold an integer (it is sampled with ``suggest_int``)."""
        where = f"tune.space.extra.{path}"
        bounds: tuple[float, float] = (r.low, r.high)
        if integer_stage_field(path):
            bounds = integer_bounds(r)
            if bounds[0] > bounds[1]:
                raise ValueError(f"{where}: an integer field, and [{r.low:g}, {r.high:g}] holds no integer")
        for side, value in zip(("low", "high"), bounds, strict=True):
            trial = copy.deepcopy(st)
            try:
                _set_dotted(trial, path, value)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            problem = _stage_problem(trial)
            if problem and problem[1] == UNKNOWN_KEY:
                raise ValueError(f"{where}: stage '{self.tune.stage}' would have {problem[0]}: {UNKNOWN_KEY}")
            if problem:
                raise ValueError(f"{where}: its {side} bound {value:g} gives stage '{self.tune.stage}' {problem[0]}: "
                                 f"{problem[1]}")

    def _tuned_stage_dict(self) -> dict[str, Any]:
        """``tune.stage`` as a dict with ``tune.stage_overrides`` set in (ValueError naming the override that does not
        apply)."""
        st = self.stage(self.tune.stage).model_dump(mode="json")
        for k, v in _flat(self.tune.stage_overrides):
            try:
                _set_dotted(st, k, v)
            except ValueError as e:
                raise ValueError(f"tune.stage_overrides.{k}: {e}") from None
        return st

    def _tuned_stage(self) -> StageConfig:
        """``tune.stage`` with ``tune.stage_overrides`` applied (checked when the config loaded: ``_tune_paths``)."""
        return StageConfig.model_validate(self._tuned_stage_dict())

    def check_tuned_stage(self) -> None:
        """ConfigError unless ``tune.stage`` names a stage of the plan. Checked by the tune job only: a plan without
        a stage named like the default ``tune.stage`` ('stage3') trains as it is."""
        names = [st.name for st in self.plan]
        if self.tune.stage not in names:
            raise ConfigError(f"tune.stage: no stage named '{self.tune.stage}' in plan ({names}); set tune.stage to "
                              "the stage to tune (--set tune.stage=NAME)")
        st, space = self._tuned_stage(), self.tune.space  # with tune.stage_overrides: what every trial trains
        if st.eval_exam is None:
            raise ConfigError(f"tune.stage: stage '{st.name}' has no eval_exam, and the tune objective is measured on "
                              "it (every trial would end without a usable eval): tune a stage with an exam set")
        if (gate := st.unreachable_gate()) is not None:
            raise ConfigError(f"tune.stage: in stage '{st.name}' (tune.stage_overrides applied) {gate}: no trial "
                              "could pass. Raise max_steps, lower eval_every or lower stop.consecutive")
        if self.tune.objective == "tokens_to_gate" and st.stop.rule != "gate":
            raise ConfigError(f"tune.objective tokens_to_gate counts the tokens until stage '{st.name}''s gate holds, "
                              f"but its stop.rule is {st.stop.rule} (no gate, so no trial would pass): set the stage's "
                              "stop.rule gate, or tune.objective exam")
        roles = (("qa_source", "exam"), ("example_source", "exam"), ("raw_source", "raw"))
        for key, kind in roles:
            name = getattr(space, key)
            if name not in self.data.datasets:
                raise ConfigError(f"tune.space.{key}: unknown dataset '{name}' (defined: {sorted(self.data.datasets)})")
            if self.data.datasets[name].kind != kind:
                raise ConfigError(f"tune.space.{key}: '{name}' is {'a raw' if kind == 'exam' else 'an exam'} dataset; "
                                  f"{key} must be {'an exam' if kind == 'exam' else 'a raw'} dataset")
        chosen = [getattr(space, key) for key, _ in roles]
        if len(set(chosen)) < 3:
            raise ConfigError(f"tune.space: qa_source, example_source and raw_source must be three different datasets "
                              f"(got {chosen}): a share given twice to one dataset would keep only the last")
        if self.logging.mlflow_tracking_uri:
            import importlib.util

            if importlib.util.find_spec("mlflow") is None:  # said before the prerequisite stages train, not after
                raise ConfigError("logging.mlflow_tracking_uri is set but mlflow is not installed "
                                  "(pip install 'kcpt[mlflow]')")

    def replay_sources(self, stage: StageConfig) -> list[str]:
        """Sources whose batches get the KL term: ``stage.replay_sources`` or the stage's raw sources."""
        if stage.replay_sources is not None:
            return list(stage.replay_sources)
        return [s for s in stage.drawn_sources() if self.data.datasets[s].kind == "raw"]

    def micro_batch(self, stage: str | StageConfig) -> int:
        """Rows per worker per step of ``stage``: its own ``micro_batch_size`` or ``train.micro_batch_size``."""
        st = self.stage(stage) if isinstance(stage, str) else stage
        return st.micro_batch_size or self.train.micro_batch_size

    def stage(self, name: str) -> StageConfig:
        for st in self.plan:
            if st.name == name:
                return st
        raise KeyError(name)

    def tune_workers(self) -> int:
        """Ray Train workers of each tune trial: ``tune.num_workers``, else ``train.num_workers``."""
        return self.tune.num_workers if self.tune.num_workers is not None else self.train.num_workers

    def training_sha256(self) -> str:
        """Hash of what a run trains: :meth:`sha256` without :data:`OPERATIONAL_KEYS` (how it runs and where its
        files go). Checkpoints record it; a full resume must find it unchanged."""
        return sha256_json(_without(self._hashed_dump(), OPERATIONAL_KEYS))

    def _hashed_dump(self) -> dict[str, Any]:
        """The JSON dump the hashes start from: without the :data:`ADDED_AT_DEFAULT` keys that are at their default."""
        d = self.model_dump(mode="json")
        for section, key in ADDED_AT_DEFAULT:  # keys newer than the hash: at their default they leave it unchanged
            node = d["train"].get(section, {}) if section else d["train"]
            if key in node and node[key] is None:
                node.pop(key)
        return d

    def sha256(self) -> str:
        """Hash of the resolved config (what the run trains), excluding run naming and output places."""
        return sha256_json(self._sha256_dump())

    def experiment_sha256(self) -> str:
        """:meth:`sha256` without :data:`SEARCH_BUDGET_KEYS`: what identifies a tune experiment (its default
        directory's name; a resume must find it unchanged, and may run more trials)."""
        return sha256_json(_without(self._sha256_dump(), SEARCH_BUDGET_KEYS))

    def _sha256_dump(self) -> dict[str, Any]:
        d = self._hashed_dump()
        d["train"].pop("run_name", None)
        d["train"].pop("output_dir", None)
        d["train"].pop("async_checkpoint", None)  # how checkpoints are written changes no trained weight
        d["train"].pop("checkpoint_checksums", None)
        d.pop("logging", None)
        d["data"].pop("held_out_overlap", None)  # a check on the data, not what it is
        for key in ("buckets", "forgetting"):  # report settings: they change no trained weight
            d["eval"].pop(key, None)
        if not d["eval"]:
            d.pop("eval")
        return d


ADDED_AT_DEFAULT = (("faults", "input_error_at_step"), ("faults", "hang_at_step"), ("", "min_workers"),
                    ("", "elastic_resize_interval_s"))
"""``train.<section>.<key>`` s (``train.<key>`` where the section is empty) added after runs and experiments were
first hashed, left out of both hashes while they are None (their default): a checkpoint or tune experiment made
before they existed resumes with the same hash."""

OPERATIONAL_KEYS = ("train.run_name", "train.output_dir", "train.async_checkpoint", "train.checkpoint_checksums",
                    "train.max_failures", "train.min_workers", "train.elastic_resize_interval_s",
                    "train.cpus_per_worker", "train.keep_last", "data.prepared_root", "data.ray_data",
                    "data.max_reject_fraction", "data.held_out_overlap", "eval.buckets", "eval.forgetting",
                    "logging", "tune")
"""Dotted config keys that change no trained weight: how a run is run, retried, logged, checked and where its
files go (``tune``: how trials are searched; a trial's own stage is in its plan). A resume may change them."""


SEARCH_BUDGET_KEYS = ("tune.num_samples", "tune.max_concurrent", "tune.num_cpus", "tune.reeval")
"""How much and how fast a tune experiment searches, not what: a resumed experiment may change them (more trials;
more at once; another re-evaluation before the choice). See :meth:`KcptConfig.experiment_sha256`."""


def _without(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    d = json.loads(json.dumps(d))
    for key in keys:
        *parents, last = key.split(".")
        node = d
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return d


def rows_per_step(cfg: KcptConfig) -> dict[str, int]:
    """Rows per optimizer step of each stage of ``cfg``'s plan, over every worker and micro-batch:
    ``micro_batch · train.grad_accum · train.num_workers``."""
    return {st.name: cfg.micro_batch(st) * cfg.train.grad_accum * cfg.train.num_workers for st in cfg.plan}


def only_relaid_out(old: KcptConfig, new: KcptConfig) -> bool:
    """Whether ``new`` trains what ``old`` does, but for how each step's rows are laid out over workers,
    accumulation and micro-batches (``train.num_workers``, ``train.grad_accum``, the micro-batch sizes), with the
    same rows per step in every stage (:func:`rows_per_step`): each step's loss is then the same token mean of the
    same number of rows (only which rows, at another world size, can differ)."""
    if [st.name for st in old.plan] != [st.name for st in new.plan] or rows_per_step(old) != rows_per_step(new):
        return False
    d = new.model_dump(mode="json")
    d["train"].update({k: getattr(old.train, k) for k in ("num_workers", "grad_accum", "micro_batch_size")})
    for st, old_st in zip(d["plan"], old.plan, strict=True):
        st["micro_batch_size"] = old_st.micro_batch_size
    return KcptConfig.model_validate(d).training_sha256() == old.training_sha256()


def training_changes(old: KcptConfig, new: KcptConfig, limit: int = 8) -> list[str]:
    """:func:`config_changes` outside :data:`OPERATIONAL_KEYS` (what a resumed run may not change)."""
    return config_changes(old, new, limit, ignore=OPERATIONAL_KEYS)


SHA256_IGNORED = ("train.run_name", "train.output_dir", "train.async_checkpoint", "train.checkpoint_checksums",
                  "logging", "eval.buckets", "eval.forgetting", "data.held_out_overlap")
"""What :meth:`KcptConfig.sha256` leaves out (naming, output places, reports)."""


def config_changes(old: KcptConfig, new: KcptConfig, limit: int = 8, ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: old → new`` for each dotted key (lists by index) whose value differs between two configs, outside
    ``ignore``; at most ``limit`` (then ``… and N more``)."""
    def flat(v: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(v, dict):
            return {k: x for key, sub in v.items() for k, x in flat(sub, f"{prefix}{key}.").items()}
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            return {k: x for i, sub in enumerate(v) for k, x in flat(sub, f"{prefix}{i}.").items()}
        return {prefix.rstrip("."): v}

    a = flat(_without(old.model_dump(mode="json"), ignore))
    b = flat(_without(new.model_dump(mode="json"), ignore))
    out = [f"{k}: {a.get(k, '(absent)')!r} → {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
           if a.get(k) != b.get(k)]
    return out[:limit] + ([f"… and {len(out) - limit} more"] if len(out) > limit else [])


# --------------------------------------------------------------------------- loading


_SAFE_NAME = re.compile(r"[^\W][\w.+@=-]*")
MAX_NAME_CHARS = 100


def unsafe_name(name: str) -> str | None:
    """Why ``name`` cannot be a file name kcpt creates (run, stage, study, dataset), or None if it can: letters,
    digits, ``_ . + @ = -``, not starting with ``.`` or ``-``, at most 100 characters (no ``/``, no ``..``)."""
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME_CHARS:
        return f"at most {MAX_NAME_CHARS} characters"
    if not _SAFE_NAME.fullmatch(name):
        return (f"{name!r} is not a safe file name: use letters, digits and _ . + @ = - (no '/', no leading "
                "'.' or '-')")
    return None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "finite_number":
            msg = "must be a finite number (not NaN or infinity)"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"{source}: {path}: {msg}" if path else f"{source}: {msg}")
    return "\n".join(lines)


UNKNOWN_KEY = "unknown key"


def _flat(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"stop": {"rule": "x"}}`` → ``[("stop.rule", "x")]``."""
    return [kv for k, v in d.items() for kv in (_flat(v, f"{prefix}{k}.") if isinstance(v, dict)
                                                else [(f"{prefix}{k}", v)])]


def _stage_problem(stage: dict[str, Any]) -> tuple[str, str] | None:
    """``(dotted location, message)`` of the first reason ``stage`` is not a valid stage config (``unknown key``
    for a key the stage has not), or None."""
    try:
        StageConfig.model_validate(stage)
    except ValidationError as err:
        e = err.errors()[0]
        return ".".join(str(p) for p in e["loc"]), UNKNOWN_KEY if e["type"] == "extra_forbidden" else e["msg"]
    return None


def integer_stage_field(dotted: str) -> bool:
    """Whether the stage-config field at ``dotted`` (e.g. ``lr.warmup_steps``) holds an integer (``int`` or
    ``int | None``): the tuner samples it with ``suggest_int``."""
    node: Any = StageConfig
    for part in dotted.split("."):
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            return False
        node = fields[part].annotation
        args = [a for a in typing.get_args(node) if a is not type(None)]
        if typing.get_origin(node) in (typing.Union, types.UnionType) and len(args) == 1:
            node = args[0]
    return node is int


def integer_bounds(r: FloatRange) -> tuple[int, int]:
    """The integers an integer parameter's range ``r`` can sample: ``(ceil(low), floor(high))``."""
    return math.ceil(r.low), math.floor(r.high)


def get_dotted(d: Any, dotted: str) -> Any:
    """The value at ``a.b.0.c`` in nested dicts/lists (the reader of :func:`_set_dotted`'s paths); None where a
    level is missing."""
    for k in dotted.split("."):
        if isinstance(d, list) and k.isdigit() and int(k) < len(d):
            d = d[int(k)]
        elif isinstance(d, dict) and k in d:
            d = d[k]
        else:
            return None
    return d


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in nested dicts/lists; a missing mapping level is created. ValueError names the key path
    where it cannot descend (a scalar, a list index that is not an integer or out of range)."""
    keys = dotted.split(".")
    if any(not k for k in keys):
        raise ValueError("empty key in the key path")
    cur: Any = d
    for depth, k in enumerate(keys):
        here = ".".join(keys[: depth + 1])
        last = depth == len(keys) - 1
        if isinstance(cur, list):
            if not re.fullmatch(r"\d+", k):
                raise ValueError(f"{here}: a list index must be a non-negative integer, got '{k}'")
            if int(k) >= len(cur):
                raise ValueError(f"{here}: index {k} out of range (the list has {len(cur)} items)")
            if last:
                cur[int(k)] = value
            else:
                cur = cur[int(k)]
        elif isinstance(cur, dict):
            if last:
                cur[k] = value
            else:
                cur = cur.setdefault(k, {})
        else:
            parent = ".".join(keys[:depth]) or "<root>"
            raise ValueError(f"{parent} is a value ({type(cur).__name__}), not a mapping or list; cannot set "
                             f"'{here}'")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (YAML would keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                        key_node.start_mark) from None
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first at line {first.line + 1}); "
                    "YAML would silently keep only the last one", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)
MAX_CONFIG_BYTES = 10 << 20
MAX_CONFIG_NODES = 200_000
"""Values in a loaded config, aliases counted every time they are used (a YAML alias bomb is refused)."""


def _count_nodes(obj: Any, budget: list[int]) -> None:
    stack = [obj]
    while stack:
        cur = stack.pop()
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError(f"more than {MAX_CONFIG_NODES} values (aliases counted each time they are used)")
        if isinstance(cur, dict):
            stack.extend(cur.keys())
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)


def parse_yaml(text: str, what: str) -> Any:
    """YAML → Python with the safe loader, refusing duplicate keys, tags, alias bombs and deep nesting;
    ConfigError names ``what`` and the line."""
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        _count_nodes(value, [MAX_CONFIG_NODES])
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{what}: not valid YAML: {at}{problem}") from None
    except RecursionError:
        raise ConfigError(f"{what}: nested too deeply") from None
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None
    return value


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> KcptConfig:
    try:
        return KcptConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> KcptConfig:
    """Load a YAML config (``None``: the defaults) and apply ``key.path=value`` overrides (YAML values).

    A ``plan`` given in YAML replaces the default plan whole.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            st = Path(path).stat()
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{path}: cannot read config: not a regular file")
            if st.st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{path}: cannot read config: {st.st_size} bytes (at most {MAX_CONFIG_BYTES})")
            raw = Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ConfigError(f"{path}: line {line}: not UTF-8 ({e.reason} at byte {e.start + 1}); save the file "
                              "as UTF-8") from None
        loaded = parse_yaml(text, str(path))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        if "plan" not in data:
            data["plan"] = [s.model_dump(mode="json") for s in _demo_plan()]
        if any(ov.strip().startswith("data.datasets.") for ov in overrides):  # edit the default datasets in place
            d = data.setdefault("data", {})
            if isinstance(d, dict) and "datasets" not in d:
                d["datasets"] = {k: v.model_dump(mode="json") for k, v in _demo_datasets().items()}
        for ov in overrides:
            if "=" not in ov:
                raise ConfigError(f"override '{ov}': expected key.path=value")
            key, raw_value = ov.split("=", 1)
            value = parse_yaml(raw_value, f"override '{ov}': value")
            try:
                _set_dotted(data, key.strip(), value)
            except ValueError as e:
                raise ConfigError(f"override '{ov}': {e}") from None
        source += " (+overrides)"
    return config_from_dict(data, source)


def dump_config(cfg: KcptConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True, sort_keys=False),
                          encoding="utf-8")
