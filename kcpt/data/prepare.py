"""Prepare datasets: read → clean/filter/dedup (raw) or render (exam) → tokenize → pack → Parquet shards.

:func:`prepare_all` is what training calls: one tokenizer for all datasets (loaded/trained once and saved under
``<prepared_root>/tokenizer-<sha12>/``), and each dataset cached at ``<prepared_root>/<name>-<key12>/`` where
the key hashes the dataset config, ``seq_len``, filters, template, tokenizer hash and the input files' content
hashes; a dataset whose directory exists is reused as is.

Finding the cache entry reads no input byte: a stat key (the same settings + each input's absolute path and
``(name, size, mtime_ns)`` of every file it stands for, :func:`kcpt.data.sources.input_stat`) is looked up in
``<prepared_root>/.keys/<name>-<statkey16>.json``, which names the prepared directory. Only on a miss (new or
changed size/mtime) are the inputs hashed — once: the same hashes name the directory and go into its manifest
(``inputs[].sha256``; checkpoints bind to the manifest's hash). A file touched but unchanged is therefore hashed
again but not prepared again, and its checkpoints stay valid. :func:`prepare_dataset` writes one dataset to a given
directory (the ``kcpt prepare`` command uses it). With ``data.ray_data`` the Ray Data pipeline
(:mod:`kcpt.data.ray_pipeline`) does the same work, streaming.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kcpt.config import DatasetConfig, KcptConfig
from kcpt.data.cleaning import clean_documents
from kcpt.data.demo import resolve_inputs
from kcpt.data.exam import encode_exam_items
from kcpt.data.exam_io import read_exam_items
from kcpt.data.packing import DEFAULT_WINDOW, NewTokenOversampler, Segment, pack_segments, tokenize_documents
from kcpt.data.rejects import RejectReport
from kcpt.data.shards import MANIFEST, check_output_dir, input_entries, write_prepared
from kcpt.data.sources import input_sha256, input_stat, read_documents
from kcpt.data.types import Document, ExamItem
from kcpt.errors import ConfigError, InputError
from kcpt.hashing import sha256_json
from kcpt.model.tokenizer import load_tokenizer, pad_token_id, save_tokenizer, tokenizer_sha256
from kcpt.storage import file_lock

PREPARE_FORMAT_VERSION = 6
"""Bump when prepared rows would change for the same inputs (part of the cache key)."""
TOKENIZE_BATCH = 256
"""Documents per batched tokenizer call."""


def _count_kept(items: Iterable[Any], counts: Counter[str]) -> Iterator[Any]:
    for it in items:
        counts[it.source] += 1
        yield it


def batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``n`` items (the last may be shorter); ``itertools.batched`` from Python 3.12."""
    buf: list[Any] = []
    for it in items:
        buf.append(it)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def raw_segments(docs: Iterable[Document], tokenizer, seq_len: int, source: str, *,
                 oversampler: NewTokenOversampler | None = None,
                 report: RejectReport | None = None) -> Iterator[Segment]:
    """Tokenize cleaned documents in batches; each gets EOS and is chunked to ≤ ``seq_len``; with
    ``oversampler``, a document holding new tokens is written ``factor`` times (a notice in ``report``)."""
    for batch in batched(docs, TOKENIZE_BATCH):
        if oversampler is None:
            yield from tokenize_documents([d.text for d in batch], tokenizer, seq_len, source)
            continue

        def copies(i: int, ids: list[int], batch: list[Document] = batch) -> int:
            n = oversampler(i, ids)
            if n > 1 and report is not None:
                report.note("oversampled_new_tokens", f"{batch[i].doc_id}: holds new tokens, written {n}x")
            return n

        yield from tokenize_documents([d.text for d in batch], tokenizer, seq_len, source, copies=copies)


def new_token_oversampler(name: str, ds: DatasetConfig, cfg: KcptConfig) -> NewTokenOversampler | None:
    """The oversampling rule of raw dataset ``name`` (``oversample_new_tokens`` > 1), with ``first_new_id`` from
    the tokenizer directory's ``kcpt-expansion.json``; None when off. ConfigError when the tokenizer was not
    expanded by kcpt (no such file)."""
    if ds.kind != "raw" or ds.oversample_new_tokens <= 1:
        return None
    import json

    from kcpt.model.commands import EXPANSION_FILE

    meta = Path(cfg.tokenizer.path) / EXPANSION_FILE
    if not meta.is_file():
        raise ConfigError(f"data.datasets.{name}.oversample_new_tokens: {meta} not found; the tokenizer must be one "
                          "expanded by `kcpt audit-tokenizer --expand N --model M --out DIR` (tokenizer.path: DIR)")
    first_new = int(json.loads(meta.read_text(encoding="utf-8"))["first_new_id"])
    return NewTokenOversampler(first_new, ds.oversample_new_tokens)


def input_hashes(paths: list[Path]) -> list[str]:
    return [input_sha256(p) for p in paths]


def _settings(name: str, ds: DatasetConfig, cfg: KcptConfig, tok_sha: str) -> dict[str, Any]:
    """Everything but the inputs that the prepared rows depend on."""
    data = cfg.data
    return {
        "format": PREPARE_FORMAT_VERSION,
        "dataset": ds.model_dump(mode="json"),
        "seq_len": data.seq_len,
        "strict": data.strict,
        "txt_split": data.txt_split if ds.kind == "raw" else None,
        # raw rows depend on every filter; exam items on the line limit their JSONL is read with
        "filters": (data.filters.model_dump(mode="json") if ds.kind == "raw"
                    else {"max_line_chars": data.filters.max_line_chars}),
        "template": data.template.model_dump(mode="json") if ds.kind == "exam" else None,
        "tokenizer_sha256": tok_sha,
        "name": name,
    }


def dataset_key(name: str, ds: DatasetConfig, cfg: KcptConfig, tok_sha: str, paths: list[Path],
                hashes: list[str] | None = None) -> str:
    """Cache key of a prepared dataset: what the rows depend on (not where they are written); ``hashes``: the
    inputs' content hashes if already computed."""
    return sha256_json({**_settings(name, ds, cfg, tok_sha),
                        "inputs": hashes if hashes is not None else input_hashes(paths)})


def stat_key(name: str, ds: DatasetConfig, cfg: KcptConfig, tok_sha: str, paths: list[Path]) -> str:
    """Lookup key of a prepared dataset from ``os.stat`` only (see the module docstring): no input byte is read."""
    return sha256_json({**_settings(name, ds, cfg, tok_sha),
                        "inputs": [[str(p.resolve()), input_stat(p)] for p in paths]})


def prepare_dataset(name: str, ds: DatasetConfig, cfg: KcptConfig, out_dir: str | Path, tokenizer, *,
                    progress: bool = True, overwrite: bool = False, extra: dict[str, Any] | None = None,
                    input_sha256s: list[str] | None = None, address: str | None = None) -> Path | str:
    """Prepare one dataset into ``out_dir`` (written atomically; a URI only with ``data.ray_data``, written
    there directly by the Ray Data tasks, manifest last) and return it. ``input_sha256s``: the inputs'
    content hashes for the manifest when the caller already computed them (:func:`prepare_all` does);
    ``address``: the Ray cluster the Ray Data path joins (default ``RAY_ADDRESS``, else a local Ray).

    Raw: documents are read, normalised, filtered and deduplicated (counted rejects), tokenized with EOS,
    chunked to ``data.seq_len`` and packed. Exam: items are validated, rendered, encoded answer-only (items
    longer than ``seq_len`` are counted as ``answer_truncated``) and packed. ``data.strict`` turns every counted
    skip into an :class:`~kcpt.errors.InputError`. Rows carry ``source = name``.
    """
    from kcpt import storage

    data = cfg.data
    if not storage.is_uri(str(out_dir)):  # URI inputs cannot be or hold a local out_dir: not fetched for this
        check_output_dir(out_dir, resolve_inputs([i for i in ds.inputs if not storage.is_uri(i)]),
                         overwrite=overwrite)
    if data.ray_data:
        from kcpt.data.ray_pipeline import prepare_dataset_ray

        return prepare_dataset_ray(name, ds, cfg, out_dir, tokenizer, overwrite=overwrite, extra=extra,
                                   progress=progress, input_sha256s=input_sha256s, address=address)
    if storage.is_uri(str(out_dir)):
        raise InputError("the in-process path writes local directories only (a URI out_dir needs data.ray_data, "
                         "or prepare_all with a URI data.prepared_root)", path=str(out_dir))
    paths = resolve_inputs(ds.inputs)
    report = RejectReport()
    kept: Counter[str] = Counter()
    kept_items: list[ExamItem] = []  # exam: the encoded items, written as items.jsonl beside the rows
    seq_len = data.seq_len
    if ds.kind == "raw":
        docs = read_documents(paths, text_field=ds.text_field, report=report, strict=data.strict,
                              max_line_chars=data.filters.max_line_chars, txt_split=data.txt_split,
                              progress=progress)
        cleaned = _count_kept(clean_documents(docs, data.filters, report, strict=data.strict), kept)
        cleaned = tqdm(cleaned, desc=f"tokenizing {name}", unit="doc", disable=not progress)
        segments: Iterable[Segment] = raw_segments(cleaned, tokenizer, seq_len, name,
                                                   oversampler=new_token_oversampler(name, ds, cfg), report=report)
    else:
        items: Iterable[ExamItem] = read_exam_items(paths, report=report, strict=data.strict, kind=ds.exam_kind,
                                                    max_line_chars=data.filters.max_line_chars)
        items = tqdm(items, desc=f"encoding {name}", unit="item", disable=not progress)
        segments = encode_counting(items, tokenizer, cfg, report, name, kept, kept_items)
    rows = pack_segments(segments, seq_len, pad_token_id(tokenizer), window=DEFAULT_WINDOW)
    inputs: list[dict[str, Any]] = []  # filled once the rows are consumed (kept counts are known only then)
    out = Path(out_dir)

    def rows_then_inputs():
        yield from rows
        inputs.extend(input_entries(paths, dict(kept), input_sha256s))

    write_prepared(out, rows_then_inputs(), tokenizer=tokenizer, seq_len=seq_len, kind=ds.kind, inputs=inputs,
                   report=report, extra=manifest_extra(name, ds, cfg, "local", extra), overwrite=overwrite,
                   items=kept_items if ds.kind == "exam" else None)
    return out


def manifest_extra(name: str, ds: DatasetConfig, cfg: KcptConfig, pipeline: str,
                   extra: dict[str, Any] | None) -> dict[str, Any]:
    """Manifest keys describing how a dataset was prepared: name, pipeline (``local``/``ray_data``), the dataset
    config, and the exam template (exam) or the quality filters (raw); then ``extra``."""
    key = "template" if ds.kind == "exam" else "filters"
    return {"name": name, "pipeline": pipeline, "dataset": ds.model_dump(mode="json"),
            key: getattr(cfg.data, key).model_dump(mode="json"), **(extra or {})}


def encode_counting(items: Iterable[ExamItem], tokenizer, cfg: KcptConfig, report: RejectReport, name: str,
                    kept: Counter[str], kept_items: list[ExamItem] | None = None) -> Iterator[Segment]:
    """Encode exam items (:func:`~kcpt.data.exam.encode_exam_items`), counting kept items per input file in
    ``kept`` (and appending them to ``kept_items`` when given); a too-long item is counted in ``report`` (or
    raised with ``data.strict``)."""
    for item in items:
        for seg in encode_exam_items([item], tokenizer, cfg.data.template, cfg.data.seq_len, report=report,
                                     strict=cfg.data.strict, source=name):
            kept[item.source] += 1
            if kept_items is not None:
                kept_items.append(item)
            yield seg


def prepare_tokenizer(cfg: KcptConfig, root: Path):
    """Load (or train) the configured tokenizer and save it once under ``root/tokenizer-<sha12>/``.

    Returns ``(tokenizer, sha256, directory)``.
    """
    tok = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.model.trust_remote_code)
    sha = tokenizer_sha256(tok)
    tdir = root / f"tokenizer-{sha[:12]}"
    with file_lock(root / f".tokenizer-{sha[:12]}.lock"):
        if not tdir.is_dir():
            tmp = root / f".tokenizer-{sha[:12]}.tmp"
            save_tokenizer(tok, tmp)
            tmp.rename(tdir)
    return tok, sha, tdir


KEYS_DIR = ".keys"
"""Under ``prepared_root``: one small JSON per stat key naming the prepared directory (see the module docstring)."""


def _indexed(root: Path, index: Path) -> Path | None:
    """The prepared directory ``index`` names, if the index and that directory's manifest exist."""
    try:
        target = root / json.loads(index.read_text(encoding="utf-8"))["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return target if (target / MANIFEST).is_file() else None


def _prepare_by_content(cfg: KcptConfig, root: Path, name: str, tok, sha: str, tdir: Path, paths: list[Path],
                        skey: str, progress: bool, address: str | None) -> tuple[Path, bool]:
    """Hash the inputs (the one read of their bytes for the key), prepare ``<root>/<name>-<contentkey12>`` unless
    it exists (or, with a URI ``prepared_root``, was published there: then it is downloaded), record it under the
    stat key; returns it and whether it was prepared now. InputError if an input changed meanwhile (its size/mtime
    moved)."""
    from kcpt import storage

    ds = cfg.data.datasets[name]
    hashes = input_hashes(paths)
    target = root / f"{name}-{dataset_key(name, ds, cfg, sha, paths, hashes)[:12]}"
    made = False
    with file_lock(root / f".{target.name}.lock"):
        if storage.is_uri(cfg.data.prepared_root) and not (target / MANIFEST).is_file():
            try:  # published by a run on another node: download instead of preparing
                storage.fetch_tree(storage.join(cfg.data.prepared_root, target.name), marker=MANIFEST)
            except FileNotFoundError:
                pass
        if not (target / MANIFEST).is_file():
            extra = {"cache_key": target.name, "tokenizer_dir": str(tdir)}
            if storage.is_uri(cfg.data.prepared_root) and cfg.data.ray_data:
                _prepare_to_uri(cfg, name, ds, tok, target, extra, hashes, progress, address)
            else:
                prepare_dataset(name, ds, cfg, target, tok, progress=progress, overwrite=target.exists(), extra=extra,
                                input_sha256s=hashes, address=address)
            made = True
    if stat_key(name, ds, cfg, sha, paths) != skey:
        if made:
            shutil.rmtree(target, ignore_errors=True)
            if storage.is_uri(cfg.data.prepared_root):
                storage.retract_tree(storage.join(cfg.data.prepared_root, target.name), marker=MANIFEST)
        raise InputError(f"data.datasets.{name}.inputs: an input changed while it was being prepared; run again",
                         path=", ".join(str(p) for p in paths))
    index = root / KEYS_DIR / f"{name}-{skey[:16]}.json"
    index.parent.mkdir(exist_ok=True)
    tmp = index.with_name(f".{index.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"dir": target.name, "stat_key": skey}) + "\n", encoding="utf-8")
    os.replace(tmp, index)
    return target, made


def _prepare_to_uri(cfg: KcptConfig, name: str, ds: DatasetConfig, tok, target: Path, extra: dict[str, Any],
                    hashes: list[str], progress: bool, address: str | None) -> None:
    """With ``data.ray_data`` and a URI ``prepared_root``: the Ray Data tasks write the dataset at its URI (shards,
    then tokenizer, manifest last); the node-local ``target`` gets only its manifest and tokenizer (for the stat-key
    index; :func:`kcpt.storage.fetch_tree` downloads the shards on demand, as it is not marked fetched)."""
    from kcpt import storage

    uri = storage.join(cfg.data.prepared_root, target.name)
    storage.retract_tree(uri, marker=MANIFEST)  # leftovers of a killed run under kcpt's own cache name
    prepare_dataset(name, ds, cfg, uri, tok, progress=progress, extra=extra, input_sha256s=hashes, address=address)
    shutil.rmtree(target, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.meta-{os.getpid()}")
    store, rel = storage.store_and_rel(uri)
    store.download_tree(rel, tmp, skip=lambda n: n.endswith(".parquet"))
    tmp.rename(target)


def prepared_dir(cfg: KcptConfig, name: str, tok_sha: str) -> Path:
    """Where :func:`prepare_all` keeps dataset ``name`` for this config and tokenizer (hashes the inputs)."""
    ds = cfg.data.datasets[name]
    key = dataset_key(name, ds, cfg, tok_sha, resolve_inputs(ds.inputs))
    return Path(cfg.data.prepared_root) / f"{name}-{key[:12]}"


def prepare_all(cfg: KcptConfig, names: Iterable[str] | None = None, *, progress: bool = True,
                address: str | None = None, statuses: dict[str, str] | None = None) -> dict[str, Path | str]:
    """Prepare (or reuse) every dataset of ``cfg.data.datasets`` (or only ``names``); returns name → ref (the
    local directory, or its URI when ``data.prepared_root`` is one). ``address``: the Ray cluster
    ``data.ray_data`` joins (default ``RAY_ADDRESS``, else a local Ray). ``statuses`` (filled if given): name →
    ``prepared`` (now) or ``reused`` (from the cache, or downloaded from a URI ``prepared_root``).

    One tokenizer serves all datasets. A dataset whose stat key is indexed (inputs unchanged in path, size and
    mtime) is reused without reading an input byte; otherwise the inputs are hashed and a directory with the same
    content key is reused or prepared. File locks keep concurrent callers from preparing the same one twice.
    With a URI root the work happens in a node-local mirror: a dataset already published there is downloaded
    instead of prepared, a new one is prepared locally and published (files first, ``manifest.json`` last) — or,
    with ``data.ray_data``, written at the URI by the Ray Data tasks (the mirror keeps its manifest and tokenizer).
    """
    from kcpt import storage

    remote = storage.is_uri(cfg.data.prepared_root)
    if remote:
        storage.check_uri(cfg.data.prepared_root, "data.prepared_root")
    root = storage.local_path_for(cfg.data.prepared_root) if remote else Path(cfg.data.prepared_root)
    root.mkdir(parents=True, exist_ok=True)
    progress = progress and cfg.logging.progress
    tok, sha, tdir = prepare_tokenizer(cfg, root)
    wanted = list(cfg.data.datasets) if names is None else list(names)
    out: dict[str, Path | str] = {}
    started = False  # with data.ray_data: one Ray for all datasets to prepare (none when every one is cached)
    try:
        for name in wanted:
            if name not in cfg.data.datasets:
                from kcpt.errors import ConfigError

                raise ConfigError(f"data.datasets: no dataset named '{name}' (defined: {sorted(cfg.data.datasets)})")
            paths = resolve_inputs(cfg.data.datasets[name].inputs)
            skey = stat_key(name, cfg.data.datasets[name], cfg, sha, paths)
            index = root / KEYS_DIR / f"{name}-{skey[:16]}.json"
            target = _indexed(root, index)
            made = False
            if target is None:
                if cfg.data.ray_data and not started:
                    from kcpt.data.ray_pipeline import ensure_ray

                    started = ensure_ray(address, verbose=cfg.logging.verbose)
                with file_lock(root / f".{index.name}.lock"):
                    target = _indexed(root, index)
                    if target is None:
                        target, made = _prepare_by_content(cfg, root, name, tok, sha, tdir, paths, skey, progress,
                                                           address)
            if statuses is not None:
                statuses[name] = "prepared" if made else "reused"
            if remote:
                uri = storage.join(cfg.data.prepared_root, target.name)
                if not storage.Store(uri).is_file(MANIFEST):
                    storage.publish_tree(target, uri, marker=MANIFEST)
                out[name] = uri
            else:
                out[name] = target
    finally:
        if started:
            import ray

            ray.shutdown()
    return out
