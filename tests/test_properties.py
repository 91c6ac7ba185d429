"""Property-based tests (hypothesis): generated JSONL lines, exam records, YAML configs and ``--set`` overrides.

The invariant everywhere: either exit 0 with every record kept or counted by reason (kept + rejected = read),
or exit 2 with a one-line message — never a traceback (any other exception fails the test), never a hang
(every example has a deadline and every test a timeout). Runs are derandomized, so CI is reproducible.

``COUNTS`` records how many generated cases each property ran; the module prints the totals at the end (run
with ``-s`` to see them; ``KCPT_PROPERTY_COUNTS=<file>`` also writes them as JSON).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kcpt.cli import main as kcpt_main
from kcpt.config import FilterConfig, KcptConfig, dump_config, load_config
from kcpt.data.cleaning import clean_documents
from kcpt.data.exam_io import read_exam_items
from kcpt.data.prepare import encode_counting
from kcpt.data.rejects import RejectReport
from kcpt.data.shards import read_manifest
from kcpt.data.sources import read_documents
from kcpt.errors import ConfigError, InputError, exit_message

SCALE = float(os.environ.get("KCPT_PROPERTY_SCALE", "1"))
"""Multiplies every ``max_examples`` (exploratory runs: ``KCPT_PROPERTY_SCALE=20``; also turns off
derandomization so each run explores new cases)."""
COUNTS: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()
"""How the generated cases ended (exit status, valid/refused), to show the generators reach both sides."""
MAX_LINE_CHARS = 300
LINE_LIMITS = st.sampled_from([MAX_LINE_CHARS, 20_000])
"""A small limit exercises line_too_long; a large one lets > 4300-digit integers and deep nesting reach the JSON
parser."""


def bounded(max_examples: int, deadline_ms: int) -> settings:
    """Settings of one property: ``max_examples`` × SCALE cases, each under ``deadline_ms`` (no hang)."""
    return settings(max_examples=max(1, int(max_examples * SCALE)), deadline=deadline_ms, derandomize=SCALE == 1,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


FAST = bounded(150, 5000)
SLOW = bounded(20, 20000)


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    total = sum(COUNTS.values())
    print(f"\nproperty tests: {total} generated cases {dict(COUNTS)}; outcomes {dict(OUTCOMES)}")
    if os.environ.get("KCPT_PROPERTY_COUNTS"):
        Path(os.environ["KCPT_PROPERTY_COUNTS"]).write_text(json.dumps({"total": total, "cases": COUNTS,
                                                                        "outcomes": OUTCOMES}))


# --------------------------------------------------------------------------- strategies

hangul = st.text(alphabet=st.one_of(st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3),
                                    st.sampled_from(list(" .,\n\t{}\"\\<>|~") + ["\u200b", "\ufeff", "\r"]),
                                    st.characters(codec="utf-8")), max_size=80)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), hangul)
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(hangul, inner, max_size=4)),
                          max_leaves=12)


def _dumps(obj: Any, ascii_: bool) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_).encode("utf-8", "surrogatepass")


raw_record = st.builds(lambda t, extra, a: _dumps({"text": t, **extra}, a), hangul,
                       st.dictionaries(st.sampled_from(["id", "meta", "title"]), json_value, max_size=2),
                       st.booleans())
hostile_line = st.one_of(
    st.binary(max_size=60),
    st.builds(lambda v, a: _dumps(v, a), json_value, st.booleans()),
    st.integers(4300, 6000).map(lambda n: b'{"text": ' + b"1" * n + b"}"),
    st.integers(900, 120_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(900, 60_000).map(lambda n: b'{"text": ' + b"{\"a\": " * n + b"1" + b"}" * n + b"}"),
    st.sampled_from([b'{"text": "\\ud800x"}', b'{"text": NaN}', b'{"text": 1e999}', b"", b"   ", b"\t",
                     b'{"text": "a"', b"\xef\xbb\xbf{}", b"\x00", b'"just a string"', b"null"]),
    st.integers(MAX_LINE_CHARS - 5, 4 * MAX_LINE_CHARS + 20).map(
        lambda n: _dumps({"text": "가" * n}, False)),
)
korean_record = st.integers(0, 30).map(  # passes the default filters (duplicates when the number repeats)
    lambda i: _dumps({"text": f"대한민국은 민주공화국이다. 모든 권력은 국민으로부터 나온다. 제{i}조."}, False))
raw_line = st.one_of(raw_record, korean_record, hostile_line)


@st.composite
def jsonl_file(draw, line: st.SearchStrategy[bytes]) -> bytes:
    lines = draw(st.lists(line, max_size=12))
    sep = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = sep.join(lines) + (sep if lines and draw(st.booleans()) else b"")
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + data


def records_in(data: bytes, max_line_chars: int = MAX_LINE_CHARS) -> int:
    """How many records a JSONL file holds: every physical line except whitespace-only ones (computed
    independently of kcpt's reader)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    pieces = data.split(b"\n")
    if pieces and pieces[-1] == b"":
        pieces.pop()
    n = 0
    for raw in pieces:
        if len(raw) + 1 > 4 * max_line_chars + 4:
            n += 1
            continue
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            n += 1
            continue
        n += 1 if len(text) > max_line_chars or text.strip() else 0
    return n


def _write_files(root: Path, files: list[bytes], suffix: str = ".jsonl") -> list[Path]:
    paths = []
    for i, data in enumerate(files):
        p = root / f"f{i}{suffix}"
        p.write_bytes(data)
        paths.append(p)
    return paths


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = kcpt_main(argv)
        except SystemExit as e:
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()


def _assert_exit2_one_line(rc: int, err: str) -> None:
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err


@pytest.fixture(scope="module")
def tokenizer():
    from kcpt.model.tokenizer import load_tokenizer

    return load_tokenizer(load_config().tokenizer)


# --------------------------------------------------------------------------- JSONL lines (raw documents)


@pytest.mark.timeout(240)
def test_raw_jsonl_every_record_kept_or_counted() -> None:
    @FAST
    @given(files=st.lists(jsonl_file(raw_line), min_size=1, max_size=3), strict=st.booleans(), limit=LINE_LIMITS)
    def prop(files: list[bytes], strict: bool, limit: int) -> None:
        COUNTS["raw_jsonl"] += 1
        filters = FilterConfig(min_chars=5, min_hangul_ratio=0.1, max_line_chars=limit)
        with tempfile.TemporaryDirectory() as tmp:
            paths = _write_files(Path(tmp), files)
            report = RejectReport()
            try:
                docs = read_documents(paths, report=report, strict=strict, max_line_chars=limit)
                kept = sum(1 for _ in clean_documents(docs, filters, report, strict=strict))
            except InputError as e:
                assert strict and "\n" not in str(e)
                return
            assert kept + report.total == sum(records_in(d, limit) for d in files), report
            assert not strict or report.total == 0

    prop()
    assert COUNTS["raw_jsonl"] >= 100


@pytest.mark.timeout(300)
def test_prepare_raw_cli_exit_0_counts_everything_or_exit_2_one_line() -> None:
    @SLOW
    @given(files=st.lists(jsonl_file(raw_line), min_size=1, max_size=2), strict=st.booleans(), limit=LINE_LIMITS,
           overlap=st.sampled_from(["none", "file twice", "dir and file"]))
    def prop(files: list[bytes], strict: bool, limit: int, overlap: str) -> None:
        COUNTS[name := "prepare_raw_cli"] += 1
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "in").mkdir()
            paths = _write_files(root / "in", files)
            inputs = {"none": paths, "file twice": [*paths, paths[0]],
                      "dir and file": [root / "in", paths[-1]]}[overlap]
            cfg = root / "c.yaml"
            cfg.write_text(f"data:\n  filters: {{max_line_chars: {limit}, min_chars: 5}}\n")
            rc, _, err = _cli(["prepare", "raw", "--input", *map(str, inputs), "--out", str(root / "out"),
                               "--tokenizer", "demo", "--no-progress", "--config", str(cfg),
                               *(["--strict"] if strict else [])])
            OUTCOMES[f"{name}:exit{rc}"] += 1
            if rc != 0:
                _assert_exit2_one_line(rc, err)
                assert strict
                return
            m = read_manifest(root / "out")
            kept = sum(i["documents"] for i in m["inputs"])
            OUTCOMES[f"{name}:{'kept' if kept else 'none kept'}"] += 1
            assert kept + sum(m["rejects"].values()) == sum(records_in(d, limit) for d in files), m["rejects"]

    prop()
    assert COUNTS["prepare_raw_cli"] >= 10


# --------------------------------------------------------------------------- exam records

exam_value = st.one_of(json_value, hangul)
exam_record = st.fixed_dictionaries({}, optional={
    "id": st.one_of(st.sampled_from(["a", "b", "c", "", " "]), st.integers(-2, 3), exam_value),
    "kind": st.one_of(st.sampled_from(["qa", "example"]), exam_value),
    "question": st.one_of(hangul, exam_value),
    "prompt": st.one_of(hangul, st.none()),
    "choices": st.one_of(st.lists(hangul, max_size=10), exam_value),
    "answer": st.one_of(hangul, exam_value, st.text(alphabet="가나다", min_size=100, max_size=200)),
    "extra": exam_value,
})
valid_exam_record = st.builds(  # with choices, the answer is one of them (its index `pick`) unless pick is None
    lambda i, kind, q, choices, a, pick, drop: {
        k: v for k, v in {"id": i, "kind": kind, "question": q, "choices": choices,
                          "answer": choices[pick % len(choices)] if choices and pick is not None else a}.items()
        if k != drop},
    st.one_of(st.sampled_from(["a", "b", "c"]), st.integers(0, 3)), st.sampled_from(["qa", "example"]),
    hangul.filter(str.strip),
    st.one_of(st.none(), st.lists(st.sampled_from(["가", "나", "다 라", "다  라", "마", "바", "사", "아", "자", "차",
                                                   "카", "타"]), min_size=1, max_size=12)),
    st.one_of(hangul.filter(str.strip), st.text(alphabet="가나다", min_size=60, max_size=200)),
    st.one_of(st.none(), st.integers(0, 11)),
    st.sampled_from([None, None, None, "id", "answer", "kind"]))
exam_line = st.one_of(st.builds(lambda r, a: _dumps(r, a), exam_record, st.booleans()),
                      st.builds(lambda r, a: _dumps(r, a), valid_exam_record, st.booleans()),
                      st.builds(lambda r, a: _dumps(r, a), exam_record, st.booleans()), hostile_line)


@pytest.mark.timeout(240)
def test_exam_records_every_record_kept_or_counted(tokenizer) -> None:
    cfg = load_config(None, ["data.seq_len=64"])

    @FAST
    @given(files=st.lists(jsonl_file(exam_line), min_size=1, max_size=3), strict=st.booleans(), limit=LINE_LIMITS)
    def prop(files: list[bytes], strict: bool, limit: int) -> None:
        COUNTS["exam_records"] += 1
        cfg.data.strict = strict
        with tempfile.TemporaryDirectory() as tmp:
            paths = _write_files(Path(tmp), files)
            report, kept = RejectReport(), Counter()
            try:
                items = read_exam_items(paths, report=report, strict=strict, max_line_chars=limit)
                for _ in encode_counting(items, tokenizer, cfg, report, "x", kept):
                    pass
            except InputError as e:
                assert strict and "\n" not in str(e)
                return
            OUTCOMES.update(f"exam_records:{k}" for k in report.counts)
            assert sum(kept.values()) + report.total == sum(records_in(d, limit) for d in files), report
            assert not strict or report.total == 0

    prop()
    assert COUNTS["exam_records"] >= 100


@pytest.mark.timeout(300)
def test_prepare_exam_cli_exit_0_counts_everything_or_exit_2_one_line() -> None:
    @SLOW
    @given(files=st.lists(jsonl_file(exam_line), min_size=1, max_size=2), strict=st.booleans())
    def prop(files: list[bytes], strict: bool) -> None:
        COUNTS[name := "prepare_exam_cli"] += 1
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            paths = _write_files(root, files)
            cfg = root / "c.yaml"
            cfg.write_text(f"data:\n  seq_len: 64\n  filters: {{max_line_chars: {MAX_LINE_CHARS}}}\n")
            rc, _, err = _cli(["prepare", "exam", "--input", *map(str, paths), "--out", str(root / "out"),
                               "--tokenizer", "demo", "--no-progress", "--config", str(cfg),
                               *(["--strict"] if strict else [])])
            OUTCOMES[f"{name}:exit{rc}"] += 1
            if rc != 0:
                _assert_exit2_one_line(rc, err)
                assert strict
                return
            m = read_manifest(root / "out")
            kept = sum(i["documents"] for i in m["inputs"])
            assert kept + sum(m["rejects"].values()) == sum(records_in(d) for d in files), m["rejects"]

    prop()
    assert COUNTS["prepare_exam_cli"] >= 10


# --------------------------------------------------------------------------- YAML configs and --set overrides

BASE = KcptConfig().model_dump(mode="json")


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(BASE)
yaml_value = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10 ** 30), 10 ** 30),
    st.floats(), st.sampled_from([0, 1, -1, 0.5, 1.5, 1e-9, 1e9, "yes", "no", "on", "true", "1", "../x", "a/b",
                                  ".hidden", "{question}", "질문: {question}\n답: ", "{answer}", "{", "demo",
                                  "demo:raw_train", "demo:nope", "/nonexistent/x.jsonl", "", "sdpa", "gate"]),
    st.text(max_size=12),
    st.lists(st.one_of(st.floats(), st.integers(-3, 3), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.one_of(st.floats(), st.integers(-3, 3)), max_size=3),
)


def _set_path(d: Any, path: tuple, value: Any) -> None:
    """Set ``path`` in ``d`` if it still exists (an earlier mutation may have replaced a parent)."""
    try:
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass


@st.composite
def config_text(draw) -> bytes:
    data = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.sampled_from(PATHS))
        _set_path(data, path, draw(yaml_value))
    if draw(st.booleans()):
        data = {k: v for k, v in data.items() if draw(st.booleans())}  # keep defaults for dropped sections
    if draw(st.integers(0, 5)) == 0:
        data[draw(st.text(min_size=1, max_size=6))] = draw(yaml_value)  # an unknown key
    text = yaml.safe_dump(data, allow_unicode=draw(st.booleans()), sort_keys=False).encode("utf-8")
    damage = draw(st.integers(0, 7))
    if damage == 0:  # duplicate a top-level block
        text += b"\n" + text.split(b"\n", 1)[0] + b"\n  seed: 1\n"
    elif damage == 1:  # stray bytes somewhere
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.binary(min_size=1, max_size=6)) + text[pos:]
    elif damage == 2:
        text = draw(st.binary(max_size=80))
    return text


def _load_or_config_error(load, name: str) -> KcptConfig | None:
    """The config, or None after checking the ConfigError's exit line is one line; anything else fails."""
    try:
        cfg = load()
    except ConfigError as e:
        msg = exit_message(e)
        assert msg and "\n" not in msg
        OUTCOMES[f"{name}:refused"] += 1
        return None
    OUTCOMES[f"{name}:valid"] += 1
    return cfg


@pytest.mark.timeout(240)
def test_generated_yaml_configs_load_or_fail_in_one_line() -> None:
    @bounded(300, 5000)
    @given(text=config_text())
    def prop(text: bytes) -> None:
        COUNTS["yaml_configs"] += 1
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "c.yaml"
            path.write_bytes(text)
            cfg = _load_or_config_error(lambda: load_config(path), "yaml_configs")
            if cfg is not None:  # a valid config round-trips through its resolved dump
                dump_config(cfg, Path(tmp) / "resolved.yaml")
                assert load_config(Path(tmp) / "resolved.yaml") == cfg

    prop()
    assert COUNTS["yaml_configs"] >= 200


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _leaf_value(path: tuple) -> st.SearchStrategy[str]:
    """A value of the same YAML type as the default at ``path`` (so many generated overrides are valid)."""
    cur: Any = BASE
    for k in path:
        cur = cur[k]
    if isinstance(cur, bool):
        base = st.booleans()
    elif isinstance(cur, int):
        base = st.integers(0, 300)
    elif isinstance(cur, float):
        base = st.floats(0, 1.2)
    elif isinstance(cur, str):
        base = st.sampled_from([cur, f"{cur}x", "demo", "sdpa", "gate", "qa_train"])
    else:
        base = st.just(cur)
    return base.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip())


typed_override = st.sampled_from(PATHS).flatmap(lambda p: _leaf_value(p).map(lambda v: f"{_dotted(p)}={v}"))
override_key = st.one_of(
    st.sampled_from(PATHS).map(_dotted),
    st.builds(lambda p, extra: f"{_dotted(p)}.{extra}", st.sampled_from(PATHS),
              st.one_of(st.text(max_size=5), st.integers(-2, 12).map(str))),
    st.text(max_size=20),
)
override_value = st.one_of(
    yaml_value.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()),
    st.text(max_size=20),
    st.sampled_from(["[1", "{a: 1, a: 2}", "!!python/object/apply:os.system [ls]", "&a [*a]", "'", "- x\n- y",
                     ".nan", "-.inf", "1e999", "{", "}", "%YAML 1.2"]),
)


@pytest.mark.timeout(240)
def test_generated_set_overrides_apply_or_fail_in_one_line() -> None:
    @bounded(400, 5000)
    @given(overrides=st.lists(st.builds(lambda k, v: f"{k}={v}", override_key, override_value) | typed_override,
                              min_size=1, max_size=3) | st.lists(typed_override, min_size=1, max_size=3)
           | st.lists(st.text(max_size=10), min_size=1, max_size=2))
    def prop(overrides: list[str]) -> None:
        COUNTS["set_overrides"] += 1
        cfg = _load_or_config_error(lambda: load_config(None, overrides), "set_overrides")
        if cfg is not None:
            assert isinstance(cfg, KcptConfig)

    prop()
    assert COUNTS["set_overrides"] >= 300


@pytest.mark.timeout(240)
def test_generated_job_arguments_exit_0_or_2_without_traceback() -> None:
    """The job entry (argument parsing + config + preflight) on generated --set lists: exit 2 with one line, or
    (for a valid config) the point where the job would start Ray — replaced here by a stub."""
    import kcpt.train.commands as tc

    @bounded(80, 5000)
    @given(overrides=st.lists(st.builds(lambda k, v: f"{k}={v}", override_key, override_value) | typed_override,
                              max_size=3) | st.lists(typed_override, max_size=2))
    def prop(overrides: list[str]) -> None:
        COUNTS["job_arguments"] += 1
        argv = [a for o in overrides for a in ("--set", o)]
        with tempfile.TemporaryDirectory() as tmp:
            argv += ["--set", f"train.output_dir={tmp}/runs"] if not any("output_dir" in o for o in overrides) else []
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    rc = tc.main(argv)
                except SystemExit as e:
                    rc = int(e.code or 0)
                except _Started:
                    rc = 0
            OUTCOMES[f"job_arguments:{'started' if rc == 0 else f'exit{rc}'}"] += 1
            if rc != 0:
                _assert_exit2_one_line(rc, err.getvalue())

    class _Started(Exception):
        pass

    orig = tc.preflight

    def preflight_then_stop(*a, **k):
        orig(*a, **k)
        raise _Started

    tc.preflight = preflight_then_stop
    try:
        prop()
    finally:
        tc.preflight = orig
    assert COUNTS["job_arguments"] >= 50


# --------------------------------------------------------------------------- kcpt report on damaged run files

pareto_metric = st.fixed_dictionaries({
    "stage": st.sampled_from(["cpt", "stage1"]), "step": st.integers(0, 30),
    "raw_val_loss": st.one_of(st.floats(0, 10), st.text(max_size=2)), "exam_val_loss": st.floats(0, 10),
    "checkpoint": st.one_of(st.sampled_from(["c1", "c2"]), st.integers(1, 3), st.lists(st.integers(), max_size=1))})
typed_metric = pareto_metric | st.fixed_dictionaries({"stage": st.sampled_from(["cpt", "stage1"]),
                                                      "step": st.integers(0, 30)},
                                     optional={k: st.one_of(st.floats(0, 10), st.none(), st.text(max_size=3),
                                                            st.integers(0, 3), st.booleans())
                                               for k in ("raw_val_loss", "exam_val_loss", "checkpoint", "gate_ok",
                                                         "eval_raw", "eval_exam")})
metric_record = typed_metric | st.fixed_dictionaries({}, optional={
    k: st.one_of(json_value, st.floats(0, 10), st.integers(0, 50), st.sampled_from(["cpt", "stage1", "c0"]))
    for k in ("stage", "step", "raw_val_loss", "exam_val_loss", "checkpoint", "gate_ok", "eval_raw", "eval_exam")})
summary_obj = st.one_of(json_value, st.fixed_dictionaries({"stages": st.fixed_dictionaries({"cpt": st.dictionaries(
    st.sampled_from(["steps", "best_raw_val_loss", "baseline_raw_best", "passed", "stop_reason", "gate_streak"]),
    st.one_of(st.floats(0, 5), st.integers(0, 9), st.booleans(), st.text(max_size=3), st.none()), max_size=4)}),
    "stage_order": st.just(["cpt", "stage1"])}), st.fixed_dictionaries({}, optional={
    "stages": st.one_of(json_value, st.dictionaries(st.sampled_from(["cpt", "stage1"]), st.one_of(
        json_value, st.fixed_dictionaries({}, optional={k: st.one_of(json_value, st.floats(0, 5), st.integers(0, 9))
                                                        for k in ("steps", "best_raw_val_loss", "baseline_raw_best",
                                                                  "passed", "stop_reason", "gate_streak")})),
        max_size=2)),
    "stage_order": st.one_of(json_value, st.lists(st.sampled_from(["cpt", "stage1", "x"]), max_size=3)),
    "baseline_raw_best": json_value}))


@pytest.mark.timeout(240)
def test_report_on_generated_run_files_exit_0_or_2_one_line() -> None:
    @bounded(150, 5000)
    @given(records=st.lists(metric_record.map(lambda r: _dumps(r, True)), max_size=5)
           | st.lists(st.one_of(metric_record.map(lambda r: _dumps(r, True)), hostile_line), max_size=5),
           summary=st.one_of(summary_obj.map(lambda s: _dumps(s, False)), st.binary(max_size=30)),
           torn=st.booleans())
    def prop(records: list[bytes], summary: bytes, torn: bool) -> None:
        COUNTS["report_run_files"] += 1
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "metrics.jsonl").write_bytes(b"\n".join(records) + (b"" if torn else b"\n"))
            (Path(tmp) / "summary.json").write_bytes(summary)
            rc, _, err = _cli(["report", tmp])
            OUTCOMES[f"report_run_files:exit{rc}"] += 1
            if rc != 0:
                _assert_exit2_one_line(rc, err)

    prop()
    assert COUNTS["report_run_files"] >= 100


txt_line = st.one_of(hangul.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=40),
                     st.sampled_from([b"", b"  ", b"\r", b"\xef\xbb\xbf"]),
                     st.integers(MAX_LINE_CHARS - 2, 4 * MAX_LINE_CHARS + 10).map(lambda n: "나" .encode() * n))


@pytest.mark.timeout(240)
def test_txt_files_one_record_per_file_or_any_split_without_crash() -> None:
    filters = FilterConfig(min_chars=5, min_hangul_ratio=0.1, max_line_chars=MAX_LINE_CHARS)

    @bounded(150, 5000)
    @given(files=st.lists(jsonl_file(txt_line), min_size=1, max_size=3), strict=st.booleans(),
           split=st.sampled_from(["file", "blank_lines"]))
    def prop(files: list[bytes], strict: bool, split: str) -> None:
        COUNTS["txt_files"] += 1
        with tempfile.TemporaryDirectory() as tmp:
            paths = _write_files(Path(tmp), files, ".txt")
            report = RejectReport()
            try:
                docs = read_documents(paths, report=report, strict=strict, max_line_chars=MAX_LINE_CHARS,
                                      txt_split=split)  # type: ignore[arg-type]
                kept = sum(1 for _ in clean_documents(docs, filters, report, strict=strict))
            except InputError as e:
                assert strict and "\n" not in str(e)
                return
            if split == "file":  # a file is one document: kept or counted, never lost or split
                assert kept + report.total == len(files), report

    prop()
    assert COUNTS["txt_files"] >= 100
