"""`kcpt audit-tokenizer`: Korean coverage of a tokenizer, and optional vocabulary expansion."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit-tokenizer", help="measure a tokenizer's Korean coverage; optionally expand it",
                       description=__doc__)
    p.add_argument("--tokenizer", default="demo", help="tokenizer path or 'demo' (default)")
    p.add_argument("--input", nargs="+", default=["demo:raw_val"],
                   help="text inputs (txt/jsonl/parquet/dirs or demo:<split>); default demo:raw_val")
    p.add_argument("--text-field", default="text")
    p.add_argument("--expand", type=int, default=0, metavar="N",
                   help="propose up to N frequent fragmented Korean words as new tokens")
    p.add_argument("--model", default=None, help="HF model dir to expand with folded embedding init (with --out)")
    p.add_argument("--out", default=None, help="write the expanded tokenizer (and model) here")
    p.add_argument("--json", action="store_true", help="print the audit as JSON")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="a trained checkpoint (kcpt checkpoint or HF model dir; a URI works) of a model expanded with "
                        "--expand --model --out INIT: report its undertrained new tokens (needs --init)")
    p.add_argument("--init", default=None, metavar="INIT",
                   help="the expanded, untrained model directory that --out wrote (rows are compared with it)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kcpt.config import TokenizerConfig
    from kcpt.data.demo import resolve_inputs
    from kcpt.data.rejects import RejectReport
    from kcpt.data.sources import read_documents
    from kcpt.errors import KcptError
    from kcpt.model.audit import (
        WordCounts,
        audit_tokenizer,
        expand_tokenizer_and_model,
        expand_vocabulary,
        expansion_problem,
        propose_korean_tokens,
    )
    from kcpt.model.tokenizer import load_tokenizer

    if args.checkpoint is not None:
        return _undertrained(args)
    if (args.model or args.out) and not args.expand:
        raise KcptError("--model and --out write an expanded model/tokenizer: give --expand N (the new tokens to "
                        "add), or leave them out for the audit alone")
    if args.model and not args.out:
        raise KcptError("--model needs --out: the directory the expanded model and tokenizer are written to")
    if args.model and not (Path(args.model) / "config.json").is_file():
        raise KcptError(f"--model {args.model}: not a Hugging Face model directory (no config.json there)")
    tok = load_tokenizer(TokenizerConfig(path=args.tokenizer))
    problem = expansion_problem(tok) if args.expand else None
    if problem:  # said before the audit's work, as one line (exit 2)
        raise KcptError(f"--expand: {problem}")
    report = RejectReport()
    texts = [d.text for d in read_documents(resolve_inputs(args.input), text_field=args.text_field, report=report)]
    if not texts:
        raise KcptError(f"no text read from {args.input}")
    counts = WordCounts()
    audit = audit_tokenizer(tok, texts, word_counts=counts)
    print(json.dumps(audit.to_dict(), ensure_ascii=False, indent=2) if args.json else audit.summary())
    if args.expand:
        new = propose_korean_tokens(tok, counts=counts, max_new=args.expand)
        print(f"\nproposed {len(new)} new tokens: {' '.join(new[:40])}{' …' if len(new) > 40 else ''}")
        if args.out:
            out = Path(args.out)
            if out.exists() and (not out.is_dir() or (next(out.iterdir(), None) is not None
                                                      and not (out / "tokenizer_config.json").is_file())):
                raise KcptError(f"{out}: exists and is not a tokenizer directory; --out must be new, empty or a "
                                "tokenizer written before (choose another --out)")
            if args.model:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(args.model)
                first_new = len(tok)
                tok, _ = expand_tokenizer_and_model(tok, model, new)
                model.save_pretrained(out)
                (out / EXPANSION_FILE).write_text(json.dumps({"first_new_id": first_new, "words": new},
                                                             ensure_ascii=False), encoding="utf-8")
            else:
                tok, _ = expand_vocabulary(tok, new)
            tok.save_pretrained(out)
            after = audit_tokenizer(tok, texts)
            print(f"expanded tokenizer ({len(tok)} tokens) written to {out}; "
                  f"tokens/syllable {audit.tokens_per_hangul_syllable:.2f} -> {after.tokens_per_hangul_syllable:.2f}")
    return 0


EXPANSION_FILE = "kcpt-expansion.json"
"""Written beside an expanded model: ``{"first_new_id": …, "words": […]}`` (what ``--checkpoint`` checks)."""


def _undertrained(args: argparse.Namespace) -> int:
    """``--checkpoint CKPT --init INIT``: the new tokens of CKPT that training left near their init."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kcpt.errors import InputError, KcptError
    from kcpt.model.undertrained import find_undertrained
    from kcpt.train.checkpoint import fetch

    if args.init is None:
        raise KcptError("--checkpoint needs --init: the expanded model directory written by --expand --model --out")
    meta = Path(args.init) / EXPANSION_FILE
    if not meta.is_file():
        raise KcptError(f"{meta}: missing; --init must be a model written by `kcpt audit-tokenizer --expand N "
                        "--model M --out DIR`")
    first_new = int(json.loads(meta.read_text(encoding="utf-8"))["first_new_id"])
    ckpt = fetch(args.checkpoint, engine=False)
    if not Path(ckpt).is_dir():  # from_pretrained would take a missing path for a hub repo id
        raise InputError("no such checkpoint directory (--checkpoint): `kcpt report RUN` lists a run's checkpoints",
                         path=str(ckpt))
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    init = AutoModelForCausalLM.from_pretrained(args.init)
    tok = AutoTokenizer.from_pretrained(ckpt if (Path(ckpt) / "tokenizer.json").is_file() else args.init)
    report = find_undertrained(model, tok, first_new_id=first_new, init=init)
    print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) if args.json else report.summary())
    return 0
