"""Forgetting and drift report of a run: per checkpoint and evaluation bucket, raw loss against the base model
and the CPT best, and KL(p_base ‖ p_ckpt), on the fixed probe set of :mod:`kcpt.eval.probe`.

For a run directory (local path or URI) and checkpoints of it (default: each stage's best, from
``summary.json``; ``"all"``: every checkpoint present; or refs), every probe token is scored by the checkpoint,
the base model and the CPT best, with the loop's packed-row eval forward (:func:`kcpt.model.attention.model_inputs`:
documents isolated by position ids, ``use_cache=False``; the final hidden states then the output head in chunks
of tokens, never full-vocabulary logits of the whole batch). Per bucket (token-weighted means over the bucket's
scored tokens, nats):

- ``loss`` (the checkpoint), ``base_loss``, ``cpt_best_loss``; ``delta_base = loss − base_loss``,
  ``delta_cpt_best = loss − cpt_best_loss`` (> 0: worse than the reference: forgetting);
- ``kl_base`` = mean over tokens of KL(p_base ‖ p_ckpt) = Σ_v p_base·(log p_base − log p_ckpt), and
  ``kl_cpt_best`` = KL(p_cpt_best ‖ p_ckpt): how far the next-token distribution drifted.

The base model is the run's initial model: the checkpoint its first stage started from (``--init-checkpoint``,
read from the trainer state of a checkpoint of that stage), else the configured ``model.name_or_path`` (the
built-in tiny model is rebuilt from ``model.tiny`` and ``model.seed``: the same weights the run started from). The
CPT best is ``summary.json``'s ``cpt_best``. Either can be given explicitly (a kcpt checkpoint, an HF model
directory). A row ``stage = base`` holds the base model itself (deltas 0 against itself).

:func:`forgetting_report` writes ``forgetting.json`` (settings, probe description and hash, rows) and
``forgetting.parquet`` (the rows) into the run directory (uploaded at a URI); ``kcpt report RUN --forgetting``
prints the table.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kcpt import storage
from kcpt.config import EvalConfig, KcptConfig, config_from_dict, load_config
from kcpt.errors import CheckpointError, ConfigError, InputError
from kcpt.eval.probe import MISSING, NO_MATCH, ProbeSet, band_labels, build_probe
from kcpt.train import checkpoint as ckpt_lib
from kcpt.train.rundir import RunDir

JSON_NAME = "forgetting.json"
PARQUET_NAME = "forgetting.parquet"
REFERENCES = ("base", "cpt_best")
COLUMNS = ["stage", "step", "checkpoint", "kind", "bucket", "documents", "tokens", "loss", "base_loss",
           "cpt_best_loss", "delta_base", "delta_cpt_best", "kl_base", "kl_cpt_best"]


@dataclass
class ModelRef:
    """A model to score: ``ref`` a kcpt checkpoint (path or URI) or an HF model directory; None: the run's
    configured model (``model.name_or_path``)."""

    label: str
    ref: str | None
    stage: str | None = None
    step: int | None = None


@dataclass
class ForgettingReport:
    table: pd.DataFrame
    meta: dict[str, Any]

    def format(self) -> str:
        return format_forgetting(self)


# --------------------------------------------------------------------------- which models


def _run_files(run_dir: str | Path) -> tuple[RunDir, dict[str, Any], KcptConfig]:
    rd = RunDir(run_dir).pull()
    if not rd.config_path.is_file():
        raise InputError("not a kcpt run directory (no config.yaml)", path=str(run_dir))
    return rd, rd.read_summary(), load_config(rd.config_path)


def _is_ckpt(local: Path) -> bool:
    return (local / ckpt_lib.MANIFEST).is_file()


def _local(ref: str) -> Path:
    """A local directory for a checkpoint / HF model ref (a URI is fetched as a kcpt checkpoint)."""
    local = ckpt_lib.fetch(ref, engine=False) if storage.is_uri(ref) else storage.local_path(ref)
    if not local.is_dir():
        raise CheckpointError(f"{ref}: no such checkpoint or model directory")
    return local


def initial_checkpoint(rd: RunDir, summary: dict[str, Any]) -> str | None:
    """The checkpoint the run's first stage started from (None: the configured model), read from the trainer
    state of a checkpoint of the first stage (its best, which is always kept)."""
    order = summary.get("stage_order") or []
    first = (summary.get("stages") or {}).get(order[0], {}) if order else {}
    ref = first.get("best_checkpoint")
    if ref is None:
        names = rd.remote_checkpoints() if rd.remote is not None else \
            [p.name for p in ckpt_lib.list_checkpoints(rd.checkpoints)]
        names = sorted(n for n in names if n.startswith("00-"))
        if not names:
            raise CheckpointError(f"{rd.location}: no checkpoint of the first stage: cannot tell the base model; "
                                  "pass it explicitly (--base)")
        ref = rd.checkpoint_ref(names[0])
    plan = ckpt_lib.load_trainer_state(_local(ref)).get("plan") or {}
    if int(plan.get("stage_pos", 0)) != 0:
        raise CheckpointError(f"{ref}: not a checkpoint of the run's first stage; pass the base model (--base)")
    start = plan.get("start_from")
    return str(start) if start else None


def select_checkpoints(rd: RunDir, summary: dict[str, Any], which: str | Sequence[str] = "best") -> list[ModelRef]:
    """``"best"``: each stage's best checkpoint (``summary.json``, stage order); ``"all"``: every checkpoint in the
    run directory; or a list of refs (a checkpoint name under ``checkpoints/``, a path, a URI)."""
    if which == "best":
        out = []
        for name in summary.get("stage_order") or []:
            s = (summary.get("stages") or {}).get(name) or {}
            if s.get("best_checkpoint"):
                out.append(ModelRef(f"{name} best", s["best_checkpoint"], name, s.get("best_step")))
        if not out:
            raise InputError("no finished stage with a best checkpoint in summary.json; name checkpoints "
                             "(--checkpoint NAME, or all)", path=str(rd.summary_path))
        return out
    if which == "all":
        names = sorted(rd.remote_checkpoints()) if rd.remote is not None else \
            [p.name for p in ckpt_lib.list_checkpoints(rd.checkpoints)]
        if not names:
            raise InputError("no checkpoint in the run directory", path=str(rd.checkpoints))
        which = names
    out = []
    for ref in which:
        is_name = "/" not in ref and not storage.is_uri(ref) and not Path(ref).exists()
        out.append(ModelRef(ref, rd.checkpoint_ref(ref) if is_name else ref))
    return out


# --------------------------------------------------------------------------- loading


class _Loader:
    """Loads models for scoring against one tokenizer (the run's); kcpt checkpoints must carry the same
    tokenizer hash."""

    def __init__(self, cfg: KcptConfig, tokenizer: Any, tokenizer_sha256: str | None, device: torch.device) -> None:
        self.cfg, self.tokenizer, self.tok_sha, self.device = cfg, tokenizer, tokenizer_sha256, device

    def __call__(self, m: ModelRef) -> torch.nn.Module:
        from kcpt.model.loading import freeze, load_causal_lm
        from kcpt.model.tokenizer import pad_token_id

        path = None
        if m.ref is not None:
            local = _local(m.ref)
            if _is_ckpt(local):
                manifest = ckpt_lib.read_manifest(local)
                if self.tok_sha is not None and manifest.get("tokenizer_sha256") != self.tok_sha:
                    raise CheckpointError(f"{m.ref}: tokenizer {str(manifest.get('tokenizer_sha256'))[:12]}… differs "
                                          f"from the run's {self.tok_sha[:12]}…: its losses are not comparable. "
                                          "Compare against a model with the run's tokenizer: --base REF (e.g. the "
                                          "expanded model the run started from) or --cpt-best REF")
                m.stage = m.stage or manifest.get("stage")
                m.step = m.step if m.step is not None else manifest.get("step")
            path = local
        with _quiet_loading():
            model = load_causal_lm(self.cfg.model, vocab_size=len(self.tokenizer), path=path,
                                   pad_token_id=pad_token_id(self.tokenizer), eos_token_id=self.tokenizer.eos_token_id,
                                   dtype=torch.float32)
        return freeze(model).to(self.device)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No transformers "Loading weights" progress bars while the report loads its models (restored after)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _run_tokenizer(refs: list[ModelRef]) -> tuple[Any, str | None]:
    """The tokenizer saved in the first kcpt checkpoint among ``refs`` (and its hash from the manifest)."""
    from transformers import AutoTokenizer

    for m in refs:
        if m.ref is None:
            continue
        local = _local(m.ref)
        if _is_ckpt(local):
            manifest = ckpt_lib.read_manifest(local)
            return AutoTokenizer.from_pretrained(str(local)), manifest.get("tokenizer_sha256")
    for m in refs:
        if m.ref is not None:
            return AutoTokenizer.from_pretrained(str(_local(m.ref))), None
    raise CheckpointError("no checkpoint to take the run's tokenizer from")


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_documents(model: torch.nn.Module, refs: dict[str, torch.nn.Module], probe: ProbeSet, *,
                    batch_size: int = 8, device: torch.device | str = "cpu", amp: Any = None) -> dict[str, np.ndarray]:
    """Per-document sums over the probe's scored tokens: ``count``, ``ce`` (next-token CE of ``model``, nats) and
    for each reference ``r``: ``ce:r`` and ``kl:r`` = Σ KL(p_r ‖ p_model). float64 arrays of ``len(probe.docs)``.

    Forwards as the loop's eval does (packed rows, :func:`~kcpt.model.attention.model_inputs`); the final hidden
    states go through the output head ``chunk`` tokens at a time (:func:`kcpt.train.fused_loss.auto_chunk`)."""
    import torch.nn.functional as F

    from kcpt.model.attention import model_inputs
    from kcpt.train.batches import eval_batches
    from kcpt.train.fused_loss import auto_chunk, with_loss_head

    n_docs = len(probe.docs)
    acc = {k: torch.zeros(n_docs, dtype=torch.float64, device=device)
           for k in ["count", "ce", *(f"{p}:{r}" for r in refs for p in ("ce", "kl"))]}
    amp = amp or contextlib.nullcontext
    head = model.get_output_embeddings()
    ref_heads = {r: m.get_output_embeddings() for r, m in refs.items()}
    hidden_of = {"": with_loss_head(model), **{r: with_loss_head(m) for r, m in refs.items()}}
    batches = eval_batches(probe.rows, rank=0, world=1, batch_size=batch_size, device=device)
    for b, batch in enumerate(batches):
        doc = torch.from_numpy(probe.doc_of[b * batch_size:(b + 1) * batch_size, 1:]).to(device)
        valid = doc >= 0
        doc = doc[valid].long()
        targets = batch["labels"][:, 1:][valid]
        with amp():
            inputs = model_inputs(model, batch)
            hidden = hidden_of[""](**inputs, kcpt_hidden=True)[:, :-1][valid]
            ref_hidden = {r: hidden_of[r](**model_inputs(m, batch), kcpt_hidden=True)[:, :-1][valid]
                          for r, m in refs.items()}
        acc["count"].index_add_(0, doc, torch.ones_like(doc, dtype=torch.float64))
        chunk = auto_chunk(head.weight.shape[0], max(1, len(doc)))
        for s in range(0, len(doc), chunk):
            d, t = doc[s:s + chunk], targets[s:s + chunk]
            logp = F.log_softmax(head(hidden[s:s + chunk]).float(), dim=-1)
            acc["ce"].index_add_(0, d, -logp.gather(1, t[:, None])[:, 0].double())
            for r in refs:
                logp_r = F.log_softmax(ref_heads[r](ref_hidden[r][s:s + chunk]).float(), dim=-1)
                if logp_r.shape != logp.shape:
                    raise CheckpointError(f"reference '{r}' has a vocabulary of {logp_r.shape[-1]} tokens, the "
                                          f"checkpoint {logp.shape[-1]}: KL needs the same vocabulary")
                acc[f"ce:{r}"].index_add_(0, d, -logp_r.gather(1, t[:, None])[:, 0].double())
                acc[f"kl:{r}"].index_add_(0, d, (logp_r.exp() * (logp_r - logp)).sum(-1).double())
    return {k: v.cpu().numpy() for k, v in acc.items()}


def _bucket_order(kind: str, labels: set[str], probe: ProbeSet, cfg: KcptConfig) -> list[str]:
    if kind == "length":
        return [b for b in band_labels(cfg.eval.buckets.length_bands) if b in labels]
    if kind == "source":
        return [d for d in probe.datasets if d in labels]
    special = [x for x in (NO_MATCH, MISSING) if x in labels]
    return sorted(labels - set(special)) + special


def bucket_rows(probe: ProbeSet, sums: dict[str, np.ndarray], cfg: KcptConfig, *, stage: str, step: int | None,
                checkpoint: str | None, refs: Sequence[str] = REFERENCES) -> list[dict[str, Any]]:
    """One row per (bucket kind, bucket) from per-document sums (:func:`score_documents`)."""
    def mean(key: str, idx: np.ndarray, n: float) -> float | None:
        return float(sums[key][idx].sum() / n) if key in sums and n > 0 else None

    out = []
    for kind in probe.kinds:
        labels = np.array([d["buckets"][kind] for d in probe.docs], dtype=object)
        for bucket in _bucket_order(kind, set(labels), probe, cfg):
            idx = np.flatnonzero(labels == bucket)
            n = float(sums["count"][idx].sum())
            row: dict[str, Any] = {"stage": stage, "step": step, "checkpoint": checkpoint, "kind": kind,
                                   "bucket": bucket, "documents": len(idx), "tokens": int(n),
                                   "loss": mean("ce", idx, n)}
            for r in REFERENCES:
                row[f"{r}_loss"] = mean(f"ce:{r}", idx, n) if r in refs else None
                row[f"delta_{r}"] = None if row[f"{r}_loss"] is None or row["loss"] is None else \
                    row["loss"] - row[f"{r}_loss"]
                row[f"kl_{r}"] = mean(f"kl:{r}", idx, n) if r in refs else None
            out.append(row)
    return out


# --------------------------------------------------------------------------- the report


def forgetting_report(run_dir: str | Path, *, checkpoints: str | Sequence[str] = "best",
                      probe_tokens: int | None = None, base: str | None = None, cpt_best: str | None = None,
                      overrides: Sequence[str] = (), eval_config: EvalConfig | None = None,
                      device: str | None = None, write: bool = True) -> ForgettingReport:
    """Compute the forgetting / drift table of a run (see the module docstring) and, with ``write``, save it as
    ``forgetting.json`` and ``forgetting.parquet`` in the run directory.

    ``checkpoints``: ``"best"`` (default), ``"all"`` or refs; ``probe_tokens``: the probe budget per dataset
    (default ``eval.forgetting.probe_tokens``); ``base`` / ``cpt_best``: explicit references (a kcpt checkpoint or
    an HF model directory; ``base="model"`` = the configured ``model.name_or_path``); ``overrides``:
    ``eval.…=value`` settings applied to the run's config; ``eval_config``: a whole ``eval`` section instead."""
    from kcpt.model.loading import autocast

    rd, summary, cfg = _run_files(run_dir)
    cfg = _with_eval(cfg, rd, overrides, eval_config)
    t0 = time.perf_counter()
    chosen = select_checkpoints(rd, summary, checkpoints)
    base_ref = ModelRef("base", None if base == "model" else base or initial_checkpoint(rd, summary), "base")
    base_how = ("given" if base not in (None, "model") else "the configured model" if base_ref.ref is None
                else "the run's init checkpoint")
    cpt_ref = cpt_best or summary.get("cpt_best")
    references = {"base": base_ref, **({"cpt_best": ModelRef("cpt_best", cpt_ref)} if cpt_ref else {})}
    tokenizer, tok_sha = _run_tokenizer([*chosen, *references.values()])
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load = _Loader(cfg, tokenizer, tok_sha, dev)
    probe = build_probe(cfg, tokenizer, probe_tokens=probe_tokens)
    ref_models = {name: load(m) for name, m in references.items()}
    bs = cfg.eval.forgetting.batch_size

    def amp() -> Any:
        return autocast(cfg.model, dev)

    rows: list[dict[str, Any]] = []
    base_sums = score_documents(ref_models["base"], ref_models, probe, batch_size=bs, device=dev, amp=amp)
    rows += bucket_rows(probe, base_sums, cfg, stage="base", step=None, checkpoint=base_ref.ref or
                        cfg.model.name_or_path, refs=list(ref_models))
    for m in chosen:
        model = load(m)
        sums = score_documents(model, ref_models, probe, batch_size=bs, device=dev, amp=amp)
        rows += bucket_rows(probe, sums, cfg, stage=m.stage or m.label, step=m.step, checkpoint=m.ref,
                            refs=list(ref_models))
        del model
    table = pd.DataFrame(rows, columns=COLUMNS)
    meta = {"kind": "kcpt-forgetting", "run": rd.location, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime()),
            "seconds": round(time.perf_counter() - t0, 3), "probe": probe.describe(),
            "base": {"ref": base_ref.ref, "model": cfg.model.name_or_path, "how": base_how},
            "cpt_best": cpt_ref, "checkpoints": [m.ref for m in chosen],
            "buckets": cfg.eval.buckets.model_dump(mode="json"), "units": "nats per scored token",
            "columns": {"delta_base": "loss - base_loss", "delta_cpt_best": "loss - cpt_best_loss",
                        "kl_base": "mean KL(p_base || p_ckpt)", "kl_cpt_best": "mean KL(p_cpt_best || p_ckpt)"}}
    report = ForgettingReport(table, meta)
    if write:
        write_report(rd, report)
    return report


def _with_eval(cfg: KcptConfig, rd: RunDir, overrides: Sequence[str], eval_config: EvalConfig | None) -> KcptConfig:
    for ov in overrides:
        if not ov.strip().startswith("eval."):
            raise ConfigError(f"override '{ov}': only eval.* settings apply to a report of an existing run")
    if overrides:
        cfg = load_config(rd.config_path, list(overrides))
    if eval_config is not None:
        cfg = config_from_dict({**cfg.model_dump(mode="json"), "eval": eval_config.model_dump(mode="json")},
                               f"{rd.config_path} (+eval)")
    return cfg


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return _json_safe(v.item())
    return v


def write_report(rd: RunDir, report: ForgettingReport) -> None:
    """``forgetting.json`` and ``forgetting.parquet`` into the run directory (uploaded when it is a URI)."""
    rd.root.mkdir(parents=True, exist_ok=True)
    records = [{k: _json_safe(v) for k, v in r.items()} for r in report.table.to_dict(orient="records")]
    tmp = rd.root / f".{JSON_NAME}.tmp"
    tmp.write_text(json.dumps({**report.meta, "rows": records}, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(rd.root / JSON_NAME)
    tmp = rd.root / f".{PARQUET_NAME}.tmp"
    report.table.to_parquet(tmp, index=False)
    tmp.replace(rd.root / PARQUET_NAME)
    if rd.remote is not None:
        for name in (PARQUET_NAME, JSON_NAME):
            rd.remote.upload_file(rd.root / name, name)


def load_forgetting(run_dir: str | Path) -> ForgettingReport:
    """The report a previous :func:`forgetting_report` wrote into the run directory (local path or URI)."""
    rd = RunDir(run_dir)
    path = rd.root / JSON_NAME
    if rd.remote is not None:
        if not rd.remote.is_file(JSON_NAME):
            raise InputError(f"no {JSON_NAME}: run `kcpt report RUN --forgetting` first", path=rd.location)
        rd.remote.download_file(JSON_NAME, path)
    if not path.is_file():
        raise InputError(f"no {JSON_NAME}: run `kcpt report RUN --forgetting` first", path=rd.location)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data.pop("rows")
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"not a forgetting report ({e}); compute it again", path=str(path)) from None
    return ForgettingReport(pd.DataFrame(rows, columns=COLUMNS), data)


def format_forgetting(report: ForgettingReport, kinds: Sequence[str] | None = None) -> str:
    """The table as text: one line per (checkpoint / stage, bucket); ``kinds``: only these bucket kinds."""
    from kcpt.analysis.run_report import _f, _table

    m = report.meta
    p = m.get("probe", {})
    head = [f"forgetting and drift: {m.get('run')}",
            f"probe: {p.get('scored_tokens')} scored tokens in {p.get('documents')} documents of "
            f"{', '.join(p.get('datasets', []))} (first {p.get('probe_tokens')} tokens per dataset; "
            f"sha256 {str(p.get('sha256'))[:12]})",
            f"base: {m['base'].get('ref') or m['base'].get('model')} ({m['base'].get('how')}); "
            f"cpt best: {m.get('cpt_best') or '- (none in this run)'}",
            "loss, deltas (ckpt - ref) and KL(p_ref || p_ckpt): nats per token", ""]
    header = ["stage", "step", "bucket", "docs", "tokens", "loss", "Δ base", "Δ cpt best", "KL base",
              "KL cpt best"]
    lines = []
    table = report.table if kinds is None else report.table[report.table["kind"].isin(list(kinds))]
    for r in table.to_dict(orient="records"):
        bucket = "all" if r["kind"] == "all" else f"{r['kind']}={r['bucket']}"
        lines.append([str(r["stage"]), _f(_opt_int(r["step"])), bucket, str(r["documents"]), str(r["tokens"]),
                      _f(_opt(r["loss"])), _signed(r["delta_base"]), _signed(r["delta_cpt_best"]),
                      _small(r["kl_base"]), _small(r["kl_cpt_best"])])
    return "\n".join(head) + _table(header, lines)


def _opt(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def _opt_int(v: Any) -> int | None:
    v = _opt(v)
    return None if v is None else int(v)


def _signed(v: Any) -> str:
    v = _opt(v)
    return "-" if v is None else f"{v:+.4f}"


def _small(v: Any) -> str:
    """A KL: 4 decimals, or 3 significant digits below 0.001 (a small drift is not shown as 0)."""
    v = _opt(v)
    if v is None:
        return "-"
    return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
