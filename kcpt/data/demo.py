"""The embedded demo corpus: Korean raw text and a derived exam set, built from files konlpy ships.

konlpy (a dependency) ships ``konlpy/data/corpus/kolaw/constitution.txt`` (the Constitution of the Republic of
Korea) and ``konlpy/data/corpus/kobill/*.txt`` (10 bills of the National Assembly, 2010) as plain UTF-8. They
are read as files; no konlpy module (and no Java) is imported. From them :func:`build_demo_corpus` writes,
deterministically (same bytes on every build), six JSONL splits:

- ``raw_train`` / ``raw_val`` (``{"id", "text"}``): the preamble, the constitution's chapters/sections
  (a unit longer than ``_MAX_DOC_CHARS`` is split into groups of whole articles), the supplementary provisions,
  and each bill (its text before the old/new comparison table, page markers and blank lines removed).
  ``raw_val`` is a held-out set of whole documents, ~10-15 % of the characters, picked by SHA-256 of the id.
- ``qa_train`` / ``qa_val`` (kind ``qa``): "대한민국 헌법 제N조의 내용은 무엇인가?" → the article (whole if
  short, else its first sentence), "… 제N조 제M항의 내용은 무엇인가?" → that paragraph's first sentence, and
  per bill its title, first sentence of the stated reason (제안이유), date and proposer.
- ``example_train`` / ``example_val`` (kind ``example``): multiple choice (``question`` + 4 ``choices``,
  ``answer`` = the correct choice's text; distractors from other articles), and fill-in-the-blank worked
  examples given as a verbatim ``prompt``.

Exam splits are held out by *subject* (an article or a bill): all items about one subject are in the same
split. Subjects whose text lies in a ``raw_val`` document get no exam items at all: no exam item quotes
held-out raw text, so raw val loss measures retention of Korean, not memorised answers. Of the other subjects
(all seen by CPT in ``raw_train``) ~15 % go to ``*_val`` (the first by SHA-256 of the subject key): exam val
measures answering in the exam format about text the model was pretrained on, on questions it never trained on.
Every item keeps ``len(prompt text) + len(answer) ≤ _MAX_ITEM_CHARS`` characters (≈ ≤ 220 tokens of a ~7k
byte-level BPE).

The files live in ``$KCPT_CACHE_DIR`` (default ``~/.cache/kcpt``) ``/demo-<hash>/``, where the hash covers the
builder's own source and the konlpy files; a finished build is reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kcpt import storage
from kcpt.errors import InputError
from kcpt.fsutil import remove_stale_siblings, temp_sibling

DEMO_VERSION = "1"
RAW_SPLITS = ("raw_train", "raw_val")
EXAM_SPLITS = ("qa_train", "qa_val", "example_train", "example_val")
SPLITS = RAW_SPLITS + EXAM_SPLITS
_MAX_DOC_CHARS = 2500
_RAW_VAL_FRAC = (0.10, 0.15)
_EXAM_VAL_FRAC = 0.15
_MAX_ITEM_CHARS = 200
_CIRCLED = "①②③④⑤⑥⑦⑧⑨⑩⑪⑫⑬⑭⑮⑯⑰⑱⑲⑳"
_STATS_FILE = "stats.json"


def konlpy_corpus_dir() -> Path:
    """``<site-packages>/konlpy/data/corpus`` (found without importing konlpy, which would start Java)."""
    spec = importlib.util.find_spec("konlpy")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the demo corpus needs the 'konlpy' package (pip install konlpy)")
    corpus = Path(next(iter(spec.submodule_search_locations))) / "data" / "corpus"
    for rel in ("kolaw/constitution.txt", "kobill"):
        if not (corpus / rel).exists():
            raise InputError("konlpy is installed but its bundled corpus is missing", path=str(corpus / rel))
    return corpus


def _source_files() -> list[Path]:
    corpus = konlpy_corpus_dir()
    return [corpus / "kolaw" / "constitution.txt", *sorted((corpus / "kobill").glob("*.txt"))]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8").replace("\r\n", "\n").replace("\r", "\n")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- parsing the constitution


@dataclass
class Article:
    key: str
    """``const-<n>`` or ``const-addenda-<n>``."""
    label: str
    """``제10조`` (a body article) or ``부칙 제3조``."""
    heading: str
    """``제2장 국민의 권리와 의무`` (+ `` 제1절 …``) or ``부칙``."""
    lines: list[str] = field(default_factory=list)
    paragraphs: list[str] = field(default_factory=list)


_ARTICLE = re.compile(r"^제(\d+)조\s*(.*)$")
_CHAPTER = re.compile(r"^제(\d+)장\s+(.+)$")
_SECTION = re.compile(r"^제(\d+)[절관]\s+(.+)$")


def _parse_constitution(text: str) -> tuple[str, str, list[Article]]:
    """Return (title, preamble, articles in order)."""
    lines = [ln.strip() for ln in text.split("\n")]
    nonempty = [ln for ln in lines if ln]
    title, preamble = nonempty[0], nonempty[1]
    chapter, sections, addenda = "", [], False
    articles: list[Article] = []
    for ln in nonempty[2:]:
        if m := _CHAPTER.match(ln):
            chapter, sections = ln, []
            continue
        if m := _SECTION.match(ln):
            level = 0 if ln.split()[0].endswith("절") else 1
            sections = sections[:level] + [ln]
            continue
        if "부칙" in ln and not _ARTICLE.match(ln):
            addenda = True
            continue
        if m := _ARTICLE.match(ln):
            n, body = m.group(1), m.group(2)
            key = f"const-addenda-{n}" if addenda else f"const-{n}"
            label = f"부칙 제{n}조" if addenda else f"제{n}조"
            heading = "부칙" if addenda else " ".join([chapter, *sections])
            art = Article(key=key, label=label, heading=heading, lines=[f"제{n}조 {body}"])
            art.paragraphs.append(body[1:].strip() if body[:1] in _CIRCLED else body)
            articles.append(art)
            continue
        art = articles[-1]
        art.lines.append(ln)
        if ln[:1] in _CIRCLED:
            art.paragraphs.append(ln[1:].strip())
        else:
            art.paragraphs[-1] += "\n" + ln
    return title, preamble, articles


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=다\.)\s+", text.split("\n")[0].strip(), maxsplit=1)[0]


# --------------------------------------------------------------------------- parsing the bills


@dataclass
class Bill:
    key: str
    number: str
    title: str
    date: str
    proposer: str
    reason: str
    text: str


def _parse_bill(path: Path) -> Bill:
    raw = _read(path)
    # Keep the text before the old/new comparison table or the cost-estimate tables (mostly dashes and
    # numbers); drop page markers ("- 3 -") and blank lines.
    cut = re.search(r"신\s*·\s*구조문대비표|비용추계서", raw)
    body = raw[: cut.start()] if cut else raw
    lines = [ln for ln in body.split("\n") if ln.strip() and not re.fullmatch(r"\s*-\s*\d+\s*-\s*", ln)]
    title_parts = []
    for ln in (ln.strip() for ln in lines):
        if ln.startswith("(") or ln.replace(" ", "") in ("의안", "의안번호") or ln.startswith("의 안"):
            break
        title_parts.append(ln)
    title = re.sub(r"\s+", " ", " ".join(title_parts)).replace(" ·", "·").strip()
    while cut and len(lines) > len(title_parts) and lines[-1].strip() in title:  # the next part's title
        lines.pop()
    text = "\n".join(ln.rstrip() for ln in lines)
    m = re.search(r"(?:발의|제출)연월일\s*:\s*(\d{4})\.\s*(\d{1,2})\.\s*(\d{1,2})\.", body)
    date = f"{m.group(1)}년 {int(m.group(2))}월 {int(m.group(3))}일" if m else ""
    pm = re.search(r"\((\S+?)의원\s*대표발의\s*\)", body)
    proposer = f"{pm.group(1)} 의원" if pm else ("정부" if re.search(r"제\s*출\s*자\s*:\s*정\s*부", body) else "")
    # The stated reason: lines after the "제안이유…" heading up to the next heading; wrapped lines are joined
    # as they are (a line ending in a space had a space there), an indented line starts a new paragraph.
    reason_lines: list[str] = []
    started = False
    for ln in lines:
        s = ln.strip()
        if not started:
            started = s.startswith("제안이유")
            continue
        if s in ("주요내용", "참고사항") or s.startswith("법률") or s.startswith("- "):
            break
        reason_lines.append(ln)
    paragraphs: list[str] = []
    for ln in reason_lines:
        if ln[:1] == " " or not paragraphs:
            paragraphs.append(ln.strip() + (" " if ln.endswith(" ") else ""))
        else:
            paragraphs[-1] += ln.rstrip() + (" " if ln.endswith(" ") else "")
    reason = re.sub(r"\s+", " ", paragraphs[0]).strip() if paragraphs else ""
    reason = re.sub(r"^가\.\s*", "", reason)
    return Bill(key=f"bill-{path.stem}", number=path.stem[-4:], title=title, date=date, proposer=proposer,
                reason=reason, text=text)


def _bill_reason_answer(reason: str) -> str:
    first = re.split(r"(?<=[임함음다])\.\s+", reason, maxsplit=1)[0]
    return first if first.endswith(".") else first + "."


# --------------------------------------------------------------------------- raw documents


def _raw_documents(title: str, preamble: str, articles: list[Article],
                   bills: list[Bill]) -> tuple[list[dict], dict[str, list[str]]]:
    """Raw documents, and for each document id the exam subject keys (articles, bills) whose text it holds."""
    docs = [{"id": "constitution-preamble", "text": f"{title}\n\n전문\n{preamble}"}]
    subjects: dict[str, list[str]] = {"constitution-preamble": []}
    units: dict[str, list[Article]] = {}
    for art in articles:
        units.setdefault(art.heading, []).append(art)
    for u, (heading, arts) in enumerate(units.items(), start=1):
        groups: list[list[Article]] = [[]]
        for art in arts:
            size = sum(len("\n".join(a.lines)) for a in groups[-1])
            if groups[-1] and size + len("\n".join(art.lines)) > _MAX_DOC_CHARS:
                groups.append([])
            groups[-1].append(art)
        for g, group in enumerate(groups, start=1):
            body = "\n".join(ln for a in group for ln in a.lines)
            docs.append({"id": f"constitution-{u:02d}-{g}", "text": f"{title} {heading}\n{body}"})
            subjects[docs[-1]["id"]] = [a.key for a in group]
    for bill in bills:
        docs.append({"id": bill.key, "text": bill.text})
        subjects[bill.key] = [bill.key]
    return docs, subjects


def _split_raw(docs: list[dict]) -> tuple[list[dict], list[dict]]:
    total = sum(len(d["text"]) for d in docs)
    lo, hi = _RAW_VAL_FRAC
    val_ids: set[str] = set()
    val_chars = 0
    for d in sorted(docs, key=lambda d: _sha(d["id"])):
        if val_chars >= lo * total:
            break
        if val_chars + len(d["text"]) <= hi * total:
            val_ids.add(d["id"])
            val_chars += len(d["text"])
    return [d for d in docs if d["id"] not in val_ids], [d for d in docs if d["id"] in val_ids]


# --------------------------------------------------------------------------- exam items


def _fits(*texts: str) -> bool:
    return sum(len(t) for t in texts) <= _MAX_ITEM_CHARS


def _qa_items(articles: list[Article], bills: list[Bill]) -> list[tuple[str, dict]]:
    """(subject key, item) pairs of kind ``qa``."""
    out: list[tuple[str, dict]] = []
    for art in articles:
        law = "대한민국 헌법" + (" 부칙" if art.key.startswith("const-addenda") else "")
        num = art.label.split()[-1]
        whole = " ".join(f"{_CIRCLED[i]} {p}" if len(art.paragraphs) > 1 else p
                         for i, p in enumerate(art.paragraphs)).replace("\n", " ")
        q = f"{law} {num}의 내용은 무엇인가?"
        if _fits(q, whole):
            out.append((art.key, {"id": f"qa-{art.key}", "question": q, "answer": whole, "kind": "qa"}))
        elif len(art.paragraphs) == 1 and _fits(q, _first_sentence(art.paragraphs[0])):
            out.append((art.key, {"id": f"qa-{art.key}", "question": q,
                                  "answer": _first_sentence(art.paragraphs[0]), "kind": "qa"}))
        if len(art.paragraphs) > 1:
            for i, p in enumerate(art.paragraphs, start=1):
                q = f"{law} {num} 제{i}항의 내용은 무엇인가?"
                ans = p.replace("\n", " ") if _fits(q, p) else _first_sentence(p)
                if _fits(q, ans):
                    out.append((art.key, {"id": f"qa-{art.key}-p{i}", "question": q, "answer": ans,
                                          "kind": "qa"}))
    for bill in bills:
        name = f"「{bill.title}」"
        pairs = [("title", f"의안번호 {bill.number}인 의안의 제목은 무엇인가?", bill.title),
                 ("reason", f"{name}의 제안이유는 무엇인가?", _bill_reason_answer(bill.reason)),
                 ("date", f"{name}은 언제 발의 또는 제출되었는가?", bill.date),
                 ("proposer", f"{name}을 대표발의하거나 제출한 자는 누구인가?", bill.proposer)]
        for tag, q, ans in pairs:
            if ans.strip(" .") and _fits(q, ans):
                out.append((bill.key, {"id": f"qa-{bill.key}-{tag}", "question": q, "answer": ans, "kind": "qa"}))
    return out


def _example_items(articles: list[Article]) -> list[tuple[str, dict]]:
    """(subject key, item) pairs of kind ``example``: multiple choice and fill-in-the-blank."""
    body = [a for a in articles if not a.key.startswith("const-addenda")]
    short = [a for a in body if len(_first_sentence(a.paragraphs[0])) <= 40]
    out: list[tuple[str, dict]] = []
    for art in body:
        rng = random.Random(f"kcpt-demo-{art.key}")
        num = art.label
        sent = _first_sentence(art.paragraphs[0])
        # Which article holds this sentence? (choices: article numbers)
        others = rng.sample([a.label for a in body if a is not art], 3)
        choices = others[:]
        choices.insert(rng.randrange(4), num)
        q = f"다음 규정은 대한민국 헌법 몇 조의 내용인가?\n\"{sent}\""
        if _fits(q, *choices, num):
            out.append((art.key, {"id": f"ex-{art.key}-which", "question": q, "choices": choices,
                                  "answer": num, "kind": "example"}))
        # Which sentence is this article's? (choices: first sentences of short articles)
        if art in short:
            pool = [_first_sentence(a.paragraphs[0]) for a in short if a is not art]
            pool = [s for s in pool if s != sent]
            choices = rng.sample(pool, 3)
            choices.insert(rng.randrange(4), sent)
            q = f"다음 중 대한민국 헌법 {num}의 내용으로 옳은 것은?"
            if _fits(q, *choices, sent):
                out.append((art.key, {"id": f"ex-{art.key}-content", "question": q, "choices": choices,
                                      "answer": sent, "kind": "example"}))
        # Fill in the blank: the longest Hangul word of the first sentence.
        words = [w.strip(".,·\"'()") for w in sent.split()]
        words = [w for w in words if re.fullmatch("[가-힣]{3,}", w)]
        if words:
            target = max(words, key=lambda w: (len(w), -sent.index(w)))
            blanked = sent.replace(target, "(   )", 1)
            prompt = (f"다음은 대한민국 헌법 {num}의 일부이다. 빈칸에 들어갈 말을 쓰시오.\n{blanked}\n답: ")
            if _fits(prompt, target):
                out.append((art.key, {"id": f"ex-{art.key}-blank", "prompt": prompt, "answer": target,
                                      "kind": "example"}))
    return out


def _split_items(pairs: list[tuple[str, dict]], held_out: set[str]) -> tuple[list[dict], list[dict]]:
    """Split by subject, after dropping the subjects in ``held_out`` (their text is in raw_val)."""
    pairs = [(k, it) for k, it in pairs if k not in held_out]
    subjects = sorted({k for k, _ in pairs}, key=_sha)
    val = set(subjects[: max(1, round(_EXAM_VAL_FRAC * len(subjects)))])
    return [it for k, it in pairs if k not in val], [it for k, it in pairs if k in val]


# --------------------------------------------------------------------------- building, caching, resolving


def demo_version_hash() -> str:
    """Hash of the builder (this module's source) and the konlpy source files (names and bytes): any change to
    either gives a new cache directory."""
    h = hashlib.sha256(f"kcpt-demo-v{DEMO_VERSION}".encode())
    h.update(Path(__file__).read_bytes())
    for p in _source_files():
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    """``$KCPT_CACHE_DIR`` or ``~/.cache/kcpt``: where kcpt caches the demo corpus and the demo tokenizer."""
    return Path(os.environ.get("KCPT_CACHE_DIR", "~/.cache/kcpt")).expanduser()


def default_demo_dir() -> Path:
    return cache_root() / f"demo-{demo_version_hash()}"


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _build_splits() -> dict[str, list[dict]]:
    files = _source_files()
    title, preamble, articles = _parse_constitution(_read(files[0]))
    bills = [_parse_bill(p) for p in files[1:]]
    docs, doc_subjects = _raw_documents(title, preamble, articles, bills)
    raw_train, raw_val = _split_raw(docs)
    held_out = {k for d in raw_val for k in doc_subjects[d["id"]]}
    qa_train, qa_val = _split_items(_qa_items(articles, bills), held_out)
    ex_train, ex_val = _split_items(_example_items(articles), held_out)
    return {"raw_train": raw_train, "raw_val": raw_val, "qa_train": qa_train, "qa_val": qa_val,
            "example_train": ex_train, "example_val": ex_val}


def _statistics(splits: dict[str, list[dict]]) -> dict:
    raw = {s: {"docs": len(splits[s]), "chars": sum(len(d["text"]) for d in splits[s])} for s in RAW_SPLITS}
    exam = {}
    for s in EXAM_SPLITS:
        kinds: dict[str, int] = {}
        for it in splits[s]:
            kinds[it["kind"]] = kinds.get(it["kind"], 0) + 1
        lens = [len(it.get("prompt") or it["question"]) + sum(len(c) for c in it.get("choices") or [])
                + len(it["answer"]) for it in splits[s]]
        exam[s] = {"items": len(splits[s]), "by_kind": kinds, "max_chars": max(lens, default=0)}
    return {"version": DEMO_VERSION, "raw": raw, "exam": exam}


def _complete(d: Path) -> bool:
    return (d / _STATS_FILE).is_file() and all((d / f"{s}.jsonl").is_file() for s in SPLITS)


def build_demo_corpus(out_dir: Path | None = None) -> dict[str, Path]:
    """Build (or reuse) the demo splits; return split name → JSONL path.

    Deterministic: two builds write identical bytes. ``out_dir`` defaults to :func:`default_demo_dir`; a
    directory that already holds a finished build is reused as is. The build is written to a temporary
    sibling directory and renamed into place, so concurrent builders never see half a build.
    """
    out = Path(out_dir) if out_dir is not None else default_demo_dir()
    if not _complete(out):
        splits = _build_splits()
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(out)  # builds killed earlier
        tmp = temp_sibling(out)
        try:
            for name, records in splits.items():
                _write_jsonl(tmp / f"{name}.jsonl", records)
            (tmp / _STATS_FILE).write_text(json.dumps(_statistics(splits), ensure_ascii=False, indent=1) + "\n",
                                           encoding="utf-8")
            if out.exists() and not any(out.iterdir()):
                out.rmdir()
            try:
                os.rename(tmp, out)
            except OSError:
                if not _complete(out):  # lost a race only if the winner finished
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {s: out / f"{s}.jsonl" for s in SPLITS}


def demo_statistics(out_dir: Path | None = None) -> dict:
    """``{"version", "raw": {split: {"docs", "chars"}}, "exam": {split: {"items", "by_kind", "max_chars"}}}``
    (``max_chars``: longest prompt/question + choices + answer, in characters)."""
    paths = build_demo_corpus(out_dir)
    return json.loads((paths["raw_train"].parent / _STATS_FILE).read_text(encoding="utf-8"))


def resolve_inputs(inputs: Sequence[str]) -> list[Path]:
    """Map config ``inputs`` to paths: ``demo:<split>`` → that demo split's JSONL (built on first use); a URI
    (``s3://…``) → its node-local copy (:func:`kcpt.storage.fetch_input`); any other string → a path that must
    exist (else :class:`InputError` naming it). Directories are returned as is."""
    out: list[Path] = []
    for inp in inputs:
        if inp.startswith("demo:"):
            split = inp[len("demo:"):]
            if split not in SPLITS:
                raise InputError(f"unknown demo split '{split}'; known: {', '.join(SPLITS)}", path=inp)
            out.append(build_demo_corpus()[split])
        elif storage.is_uri(inp):  # s3://bucket/file or prefix: a node-local copy (downloaded when changed)
            try:
                out.append(storage.fetch_input(inp))
            except FileNotFoundError:
                raise InputError("input URI does not exist (no object or prefix there)", path=inp) from None
        else:
            p = Path(inp).expanduser()
            if not p.exists():
                raise InputError("input path does not exist", path=inp)
            out.append(p)
    return out


def build_uneven_exam(out: Path) -> dict[str, Path]:
    """A second exam set from the same real text, unlike the demo's: ``qa_long_train.jsonl`` / ``qa_long_val.jsonl``
    (every 10th pair of items held out) whose answers are whole articles or bill reasons (20 to 600+ characters) mixed
    with one-word answers — answer-only batches from 1 to ~250 target tokens, for testing rules on noisy
    gradients (``bench/anomaly_false_positives.py``)."""
    files = _source_files()
    _, _, articles = _parse_constitution(_read(files[0]))
    bills = [_parse_bill(p) for p in files[1:]]
    items = []
    for a in articles:
        body = "\n".join(a.lines)
        items.append({"id": f"{a.key}-full", "kind": "qa", "question": f"대한민국헌법 {a.label}의 전문을 쓰시오.",
                      "answer": body})
        items.append({"id": f"{a.key}-which", "kind": "qa",
                      "question": f"다음 조문은 몇 조인가?\n{a.paragraphs[0][:120]}", "answer": a.label})
    for b in bills:
        items.append({"id": f"{b.key}-reason", "kind": "qa", "question": f"{b.title}의 제안이유를 쓰시오.",
                      "answer": b.reason})
        items.append({"id": f"{b.key}-who", "kind": "qa", "question": f"{b.title}의 발의자는?",
                      "answer": b.proposer or "정부"})
    out.mkdir(parents=True, exist_ok=True)
    val = [it for i, it in enumerate(items) if (i // 2) % 10 == 3]
    train = [it for i, it in enumerate(items) if (i // 2) % 10 != 3]
    paths = {}
    for name, recs in (("qa_long_train", train), ("qa_long_val", val)):
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return paths
