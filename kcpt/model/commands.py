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
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kcpt.config import TokenizerConfig
    from kcpt.data.demo import resolve_inputs
    from kcpt.data.rejects import RejectReport
    from kcpt.data.sources import read_documents
    from kcpt.errors import KcptError
    from kcpt.model.audit import (
        audit_tokenizer,
        expand_tokenizer_and_model,
        expand_vocabulary,
        propose_korean_tokens,
    )
    from kcpt.model.tokenizer import load_tokenizer

    tok = load_tokenizer(TokenizerConfig(path=args.tokenizer))
    report = RejectReport()
    texts = [d.text for d in read_documents(resolve_inputs(args.input), text_field=args.text_field, report=report)]
    if not texts:
        raise KcptError(f"no text read from {args.input}")
    audit = audit_tokenizer(tok, texts)
    print(json.dumps(audit.to_dict(), ensure_ascii=False, indent=2) if args.json else audit.summary())
    if args.expand:
        new = propose_korean_tokens(tok, texts, max_new=args.expand)
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
                tok, _ = expand_tokenizer_and_model(tok, model, new)
                model.save_pretrained(out)
            else:
                tok, _ = expand_vocabulary(tok, new)
            tok.save_pretrained(out)
            after = audit_tokenizer(tok, texts)
            print(f"expanded tokenizer ({len(tok)} tokens) written to {out}; "
                  f"tokens/syllable {audit.tokens_per_hangul_syllable:.2f} -> {after.tokens_per_hangul_syllable:.2f}")
    return 0
