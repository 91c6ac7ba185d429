"""`kcpt prepare raw|exam|demo`: turn files into packed Parquet shards (+ manifest) and print what happened."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kcpt import storage
from kcpt.config import DatasetConfig, KcptConfig, load_config
from kcpt.errors import InputError


def _common(p: argparse.ArgumentParser, *, inputs: str | None) -> None:
    if inputs:
        p.add_argument("--input", nargs="+", required=True, metavar="PATH", help=inputs)
        p.add_argument("--name", default=None, help="dataset name written to each row's 'source' (default: --out's "
                                                      "directory name)")
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tokenizer", default=None, metavar="PATH|demo", help="tokenizer directory/hub name or 'demo'")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (default: data.seq_len)")
    p.add_argument("--strict", action="store_true", help="turn every counted skip into an error")
    p.add_argument("--config", default=None, metavar="YAML", help="kcpt config (tokenizer, data.filters, ...)")
    p.add_argument("--ray", action="store_true", help="run the Ray Data pipeline (data.ray_data)")
    p.add_argument("--address", default=None, help="with --ray: the Ray cluster to join (default: RAY_ADDRESS, "
                                                   "set inside `ray job submit`; else a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="with --ray: show Ray's own output on the console")


def register(subparsers: Any) -> None:
    prep = subparsers.add_parser("prepare", help="tokenize + pack data into Parquet shards with a manifest")
    sub = prep.add_subparsers(dest="prepare_kind", required=True)
    raw = sub.add_parser("raw", help="raw text documents (CPT)")
    _common(raw, inputs="files or directories (.txt, .jsonl, .parquet, HF save_to_disk dirs) or demo:<split>")
    raw.add_argument("--text-field", default="text", help="JSONL/Parquet/HF field holding the text")
    raw.add_argument("--txt-split", choices=["file", "blank_lines"], default=None,
                     help=".txt documents: one per file, or ended by 2+ blank lines (default: data.txt_split)")
    exam = sub.add_parser("exam", help="exam items (JSONL: id, question|prompt, [choices], answer, kind)")
    _common(exam, inputs=".jsonl files or directories of them (one exam item per line: docs/data-formats.md) "
                              "or demo:<split>")
    exam.add_argument("--exam-kind", choices=["qa", "example"], default=None, help="keep only this kind")
    demo = sub.add_parser("demo", help="every split of the embedded demo corpus (cached by content hash)")
    _common(demo, inputs=None)
    for p in (raw, exam, demo):
        p.set_defaults(func=run_prepare)


def _config(args: argparse.Namespace) -> KcptConfig:
    overrides = []
    if args.tokenizer is not None:
        overrides.append(f"tokenizer.path={args.tokenizer}")
    if args.seq_len is not None:
        overrides.append(f"data.seq_len={args.seq_len}")
    if args.strict:
        overrides.append("data.strict=true")
    if getattr(args, "txt_split", None) is not None:
        overrides.append(f"data.txt_split={args.txt_split}")
    if args.ray:
        overrides.append("data.ray_data=true")
    if args.no_progress:
        overrides.append("logging.progress=false")
    if args.verbose:
        overrides.append("logging.verbose=true")
    return load_config(args.config, overrides)


def format_manifest(directory: Path | str, manifest: dict[str, Any]) -> str:
    """Human summary of one prepared dataset: rows, tokens, efficiency, rejects with an example each."""
    name = manifest.get("name", str(directory).rstrip("/").rsplit("/", 1)[-1])
    lines = [f"{name} ({manifest['kind']}): {manifest['rows']} rows × "
             f"{manifest['seq_len']} tokens, {manifest['tokens']} non-pad tokens, "
             f"pack efficiency {manifest['pack_efficiency'] * 100:.2f}%, "
             f"kept {sum(i['documents'] for i in manifest['inputs'])} "
             f"{'documents' if manifest['kind'] == 'raw' else 'items'}"]
    rejects, notices = manifest.get("rejects", {}), manifest.get("notices", {})
    examples = manifest.get("reject_examples", {})
    if manifest["rows"] == 0:
        lines.append("  warning: no rows written (every input was rejected or empty; see below)")
    if not rejects and not notices:
        lines.append("  no rejects")
    for title, counts in (("rejected", rejects), ("notices", notices)):
        if counts:
            lines.append(f"  {title}:")
            width = max(len(k) for k in counts)
            for reason, n in counts.items():
                first = (examples.get(reason) or [""])[0]
                lines.append(f"    {reason:<{width}}  {n:>7}  {first}")
    lines.append(f"  -> {directory}")
    return "\n".join(lines)


def run_prepare(args: argparse.Namespace) -> int:
    cfg = _config(args)  # config and input paths are checked before the heavy imports (tokenizers, torch)
    if args.prepare_kind != "demo":
        from kcpt.data.shards import check_output_dir
        from kcpt.data.sources import check_inputs_exist

        check_inputs_exist(list(args.input), where="--input")
        if not storage.is_uri(args.out):
            check_output_dir(args.out, [i for i in args.input if not i.startswith("demo:")],
                             overwrite=args.overwrite)

    from kcpt.console import is_tty
    from kcpt.data.prepare import prepare_all, prepare_dataset
    from kcpt.data.report import announce_data
    from kcpt.data.shards import MANIFEST, fetch_prepared, read_manifest
    from kcpt.model.tokenizer import load_tokenizer

    progress = cfg.logging.progress and is_tty()
    statuses: dict[str, str] = {}
    if args.prepare_kind == "demo":
        cfg.data.prepared_root = args.out
        dirs = prepare_all(cfg, progress=progress, address=args.address, statuses=statuses)
    else:
        ds = DatasetConfig(kind=args.prepare_kind, inputs=list(args.input),
                           text_field=getattr(args, "text_field", "text"),
                           exam_kind=getattr(args, "exam_kind", None))
        tok = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.model.trust_remote_code)
        remote = storage.is_uri(args.out)
        out = storage.local_path_for(args.out) if remote else Path(args.out)
        name = args.name or out.resolve().name
        if remote and storage.Store(args.out).listdir() and not args.overwrite:
            raise InputError("exists; --overwrite replaces it", path=args.out)
        if remote and cfg.data.ray_data:  # the Ray Data tasks write the shards there, the manifest last
            prepare_dataset(name, ds, cfg, args.out, tok, progress=progress, overwrite=args.overwrite,
                            address=args.address)
        else:  # in-process: prepared in the node-local mirror, then published (files first, manifest last)
            made = prepare_dataset(name, ds, cfg, out, tok, progress=progress, overwrite=args.overwrite or remote,
                                   address=args.address)
            if remote:
                storage.publish_tree(made, args.out, marker=MANIFEST)
        dirs = {name: args.out if remote else out}
    for d in dirs.values():
        print(format_manifest(d, read_manifest(fetch_prepared(d, shards=False))))
    print()
    announce_data(dirs, statuses, limit=cfg.data.max_reject_fraction, filters=cfg.data.filters.model_dump(mode="json"))
    if dirs:
        m = read_manifest(fetch_prepared(next(iter(dirs.values())), shards=False))
        print(f"tokenizer: vocab {m['vocab_size']}, sha256 {m['tokenizer_sha256'][:12]}")
    return 0
