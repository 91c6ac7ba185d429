"""The forgetting / drift report (kcpt.eval.forgetting): on a small in-process run (CPT → s1, no Ray) whose probe
set holds the demo's raw_val and a raw JSONL with a ``domain`` field the demo does not have.

- the base model against itself: loss delta 0 and KL 0 (exactly: the same forward twice);
- the probe scores the same tokens as the loop's raw val loss (here prepare cut no tail into extra pieces): the
  report's loss on raw_val equals metrics.jsonl's ``raw_val_loss`` of each checkpoint, and the base row equals the
  CPT step-0 eval (the tiny base is rebuilt);
- a deliberately perturbed checkpoint shows positive KL to the base and to the CPT best;
- source / length / field buckets each partition the probe set (documents and tokens add up to ``all``);
- ``kcpt report RUN --forgetting`` prints the table and writes forgetting.json / forgetting.parquet; bad flags are
  one line and exit 2; a run directory at an s3:// URI (moto server) works the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from kcpt.cli import main
from kcpt.config import load_config
from kcpt.errors import ConfigError
from kcpt.eval.forgetting import forgetting_report, load_forgetting
from kcpt.train.launch import run_plan
from kcpt.train.rundir import read_metrics

DOCS = [  # (domain, id, text): Korean text that passes the default filters
    ("law", "kr-law-1", "대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. 국민의 자유와 권리는 헌법에 "
                        "열거되지 아니한 이유로 경시되지 아니한다."),
    ("law", "kr-law-2", "모든 국민은 법 앞에 평등하다. 누구든지 성별, 종교 또는 사회적 신분에 의하여 차별을 받지 "
                        "아니한다."),
    ("news", "kr-news-1", "오늘 서울의 아침 기온은 영하 오도까지 내려가 올겨울 들어 가장 추운 날씨를 보였습니다. "
                          "시민들은 두꺼운 외투를 입고 출근길에 나섰습니다."),
    ("news", "kr-news-2", "정부는 내년 예산안을 발표하며 교육과 복지 분야의 지출을 늘리겠다고 밝혔습니다."),
    ("chat", "kr-chat-1", "안녕하세요, 오늘 점심은 뭐 드셨어요? 저는 김치찌개를 먹었는데 정말 맛있었어요."),
    (None, "misc", "이 문서에는 분류 태그가 없습니다. 그래도 탐색 집합에는 포함되어야 하며 누락 버킷으로 들어갑니다."),
]
LONG = ("law", "kr-law-3", " ".join(t for _, _, t in DOCS[:5]) + " 국회는 국민의 보통ㆍ평등ㆍ직접ㆍ비밀선거에 의하여 "
        "선출된 국회의원으로 구성한다. 대통령은 국가의 원수이며, 외국에 대하여 국가를 대표한다.")

PLAN = ("[{name: cpt, sources: {raw_train: 1.0}, max_steps: 6, eval_every: 3, sets_baseline: true, "
        "lr: {peak: 0.01, warmup_steps: 1}, stop: {rule: max_steps}}, "
        "{name: s1, sources: {qa_train: 0.7, raw_train: 0.3}, max_steps: 6, eval_every: 3, eval_exam: exam_val, "
        "lr: {peak: 0.01, warmup_steps: 1}, stop: {rule: max_steps}}]")


def _overrides(root: Path, domain_file: Path, output_dir: str) -> list[str]:
    return [
        "data.seq_len=64", "logging.progress=false", "logging.tensorboard=false",
        "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
        "model.tiny.intermediate_size=64", "train.micro_batch_size=4", "train.eval_batch_size=16",
        "train.max_eval_rows=null", "train.num_workers=1", "tune.stage=s1", "train.run_name=r",
        f"data.prepared_root={root / 'prepared'}", f"train.output_dir={output_dir}", f"plan={PLAN}",
        f"data.datasets.probe_dom={{kind: raw, inputs: [{domain_file}]}}",
        "eval.forgetting.datasets=[raw_val, probe_dom]", "eval.buckets.length_bands=[32, 128]",
        'eval.buckets.fields={domain: {field: domain}, origin: {field: id, pattern: "^kr-([a-z]+)-"}}',
    ]


def _domain_file(root: Path) -> Path:
    path = root / "probe_dom.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for domain, id_, text in [*DOCS, LONG]:
            rec = {"id": id_, "text": text, **({"domain": domain} if domain else {})}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("forgetting")


@pytest.fixture(scope="module")
def run(root):
    cfg = load_config(None, _overrides(root, _domain_file(root), str(root / "runs")))
    res = run_plan(cfg, resume="never", in_process=True, console=False, data_table=False)
    return res.run_dir


@pytest.fixture(scope="module")
def report(run):
    return forgetting_report(run, device="cpu")


def _rows(table: pd.DataFrame, stage: str, kind: str) -> pd.DataFrame:
    return table[(table.stage == stage) & (table.kind == kind)]


def test_base_against_itself_is_zero(report):
    base = report.table[report.table.stage == "base"]
    assert len(base) > 0
    assert (base.delta_base == 0).all() and (base.kl_base == 0).all()
    assert (base.loss == base.base_loss).all()


def test_losses_are_the_loops_raw_val_loss(run, report):
    """Same tokens, same isolation, same initial model: the report reproduces the loop's raw val losses."""
    from kcpt.train.batches import load_packed_rows

    metrics = read_metrics(run)
    t = report.table
    raw = t[(t.kind == "source") & (t.bucket == "raw_val")]
    # precondition: prepare's packer cut no document tail into extra pieces here (a cut piece restarts its
    # positions and loses its first label; then the loop scores slightly other tokens than the probe)
    (prepared,) = (Path(run).parents[1] / "prepared").glob("raw_val-*")
    assert int((load_packed_rows(prepared).labels != -100).sum()) == raw[raw.stage == "base"].tokens.item()
    start = next(m for m in metrics if m["stage"] == "cpt" and m["step"] == 0)
    assert raw[raw.stage == "base"].loss.item() == pytest.approx(start["raw_val_loss"], rel=1e-6)
    for stage in ("cpt", "s1"):
        row = raw[raw.stage == stage]
        rec = next(m for m in metrics if m.get("checkpoint") == row.checkpoint.item())
        assert row.loss.item() == pytest.approx(rec["raw_val_loss"], rel=1e-6)  # observed: ≤ 1e-7
    # CPT moved the model: its best is better than the base on held-out raw text, and drifted from it
    cpt = _rows(t, "cpt", "all")
    assert cpt.delta_base.item() < 0 and cpt.kl_base.item() > 0 and cpt.delta_cpt_best.item() == 0
    assert report.meta["base"]["how"] == "the configured model" and report.meta["cpt_best"]


def test_base_of_a_run_started_from_a_checkpoint_is_that_checkpoint(root, run, report):
    """A run of stage s1 alone from the CPT best (``init_checkpoint``): its base is that checkpoint, and the base
    row reproduces the stage's step-0 eval (the model it started from)."""
    cpt_best = _rows(report.table, "cpt", "all").checkpoint.item()
    cfg = load_config(None, [*_overrides(root, root / "probe_dom.jsonl", str(root / "runs")), "train.run_name=r2",
                             "plan.1.max_steps=2", "plan.1.eval_every=2"])
    res = run_plan(cfg, stages=["s1"], init_checkpoint=cpt_best, resume="never", in_process=True, console=False,
                   data_table=False)
    rep = forgetting_report(res.run_dir, probe_tokens=100_000, device="cpu", write=False)
    assert rep.meta["base"] == {"ref": cpt_best, "model": "tiny", "how": "the run's init checkpoint"}
    assert rep.meta["cpt_best"] is None and rep.table.cpt_best_loss.isna().all()
    start = next(m for m in read_metrics(res.run_dir) if m["stage"] == "s1" and m["step"] == 0)
    t = rep.table
    base = t[(t.stage == "base") & (t.kind == "source") & (t.bucket == "raw_val")]
    assert base.loss.item() == pytest.approx(start["raw_val_loss"], rel=1e-6)


def test_kl_is_p_base_against_p_ckpt_as_the_loop_computes_it(run, report):
    """Independently, with the loop's own loss functions on plain logits: the mean CE of the checkpoint and the
    mean KL(p_base ‖ p_ckpt) over the probe rows (the report's ``all`` row)."""
    from transformers import AutoTokenizer

    from kcpt.eval.probe import build_probe
    from kcpt.model.loading import load_causal_lm
    from kcpt.train.losses import kl_to_reference_sum, token_ce_sum

    cfg = load_config(Path(run) / "config.yaml")
    best = _rows(report.table, "s1", "all").checkpoint.item()
    tok = AutoTokenizer.from_pretrained(best)
    model = load_causal_lm(cfg.model, path=best).eval()
    base = load_causal_lm(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id).eval()
    probe = build_probe(cfg, tok)
    assert probe.sha256 == report.meta["probe"]["sha256"]
    ce = kl = n = 0.0
    with torch.no_grad():
        for i in range(len(probe.rows)):
            b = {k: torch.from_numpy(getattr(probe.rows, k)[i:i + 1]).long()
                 for k in ("input_ids", "position_ids", "labels")}
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
            ref = base(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
            s, c = token_ce_sum(logits, b["labels"])
            k, _ = kl_to_reference_sum(logits, ref, b["labels"])
            ce, kl, n = ce + float(s), kl + float(k), n + int(c)
    row = _rows(report.table, "s1", "all")
    assert n == row.tokens.item()
    assert row.loss.item() == pytest.approx(ce / n, rel=1e-5)
    assert row.kl_base.item() == pytest.approx(kl / n, rel=1e-3)


def test_perturbed_checkpoint_shows_positive_kl(run, report, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    best = _rows(report.table, "cpt", "all").checkpoint.item()
    model = AutoModelForCausalLM.from_pretrained(best)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(tmp_path / "perturbed")
    AutoTokenizer.from_pretrained(best).save_pretrained(tmp_path / "perturbed")
    rep = forgetting_report(run, checkpoints=[str(tmp_path / "perturbed")], probe_tokens=400, device="cpu",
                            write=False)
    rows = rep.table[(rep.table.stage != "base") & (rep.table.tokens > 0)]
    assert len(rows) > 0
    assert (rows.kl_base > 1e-3).all() and (rows.kl_cpt_best > 1e-3).all()
    assert (rows.delta_cpt_best.abs() > 0).all()


def test_buckets_partition_the_probe(report):
    t = report.table
    expected = {"source": {"raw_val", "probe_dom"}, "length": None,
                "domain": {"law", "news", "chat", "(missing)"}, "origin": {"law", "news", "chat", "(no match)"}}
    for stage in t.stage.unique():
        total = _rows(t, stage, "all")
        assert len(total) == 1 and total.tokens.item() == report.meta["probe"]["scored_tokens"]
        for kind, names in expected.items():
            rows = _rows(t, stage, kind)
            assert rows.tokens.sum() == total.tokens.item(), (stage, kind)
            assert rows.documents.sum() == total.documents.item(), (stage, kind)
            assert names is None or set(rows.bucket) == names
    dom = _rows(t, "s1", "domain").set_index("bucket").documents.to_dict()
    assert dom == {"law": 3, "news": 2, "chat": 1, "(missing)": 1 + 6}  # + the 6 demo raw_val documents
    assert set(_rows(t, "s1", "length").bucket) <= {"<32", "32-127", ">=128"}
    assert len(_rows(t, "s1", "length")) >= 2  # the long document is in another band than the short ones


def test_cli_prints_the_table_and_writes_the_files(run, capsys):
    run_dir = Path(run)
    for name in ("forgetting.json", "forgetting.parquet"):
        (run_dir / name).unlink(missing_ok=True)
    assert main(["report", str(run_dir), "--forgetting", "--probe-tokens", "200", "--checkpoint", "best"]) == 0
    out = capsys.readouterr().out
    assert "KL base" in out and "domain=(missing)" in out and "source=probe_dom" in out
    assert "s1" in out and "base" in out
    meta = json.loads((run_dir / "forgetting.json").read_text(encoding="utf-8"))
    table = pd.read_parquet(run_dir / "forgetting.parquet")
    assert meta["probe"]["probe_tokens"] == 200 and len(meta["rows"]) == len(table) > 0
    assert set(table.stage) == {"base", "cpt", "s1"}
    pd.testing.assert_frame_equal(load_forgetting(run_dir).table, table, check_dtype=False)
    assert main(["report", str(run_dir)]) == 0  # the plain run report shows the whole-probe rows
    out = capsys.readouterr().out
    assert "From forgetting.json" in out and "KL base" in out and "domain=" not in out


def test_raw_records_keep_requested_fields(tmp_path):
    """The probe's field buckets read user fields: JSONL keys and Parquet columns (only those asked for)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kcpt.data.rejects import RejectReport
    from kcpt.data.sources import read_documents

    (tmp_path / "a.jsonl").write_text('{"text": "가나다", "domain": "law", "other": 1}\n{"text": "라마바"}\n',
                                      encoding="utf-8")
    pq.write_table(pa.table({"text": ["사아자"], "domain": ["news"], "other": [2]}), tmp_path / "b.parquet")
    docs = list(read_documents([tmp_path / "a.jsonl", tmp_path / "b.parquet"], report=RejectReport(),
                               meta_fields=["domain"]))
    assert [d.meta.get("domain") for d in docs] == ["law", None, "news"]
    assert all("other" not in d.meta for d in docs)


@pytest.mark.parametrize("argv, needle", [
    (["--forgetting", "--set", "train.seed=1"], "only eval.* settings"),
    (["--forgetting", "--set", "eval.buckets.colour=red"], "eval.buckets.colour: unknown key"),
    (["--forgetting", "--checkpoint", "no-such-checkpoint"], "no such checkpoint"),
    (["--probe-tokens", "10"], "only with --forgetting"),
])
def test_cli_bad_input_is_one_line(run, capsys, argv, needle):
    assert main(["report", str(run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


@pytest.mark.parametrize("override, needle", [
    ("eval.buckets.colour=red", "eval.buckets.colour: unknown key"),
    ("eval.buckets.length_bands=[128, 32]", "strictly increasing"),
    ("eval.buckets.fields={d: {field: x, pattern: '('}}", "eval.buckets.fields.d.pattern: not a valid regular"),
    ("eval.buckets.fields={source: {field: x}}", "built-in bucket kind"),
    ("eval.forgetting.datasets=[qa_val]", "exam dataset"),
    ("eval.forgetting.datasets=[nope]", "unknown dataset 'nope'"),
    ("eval.forgetting.probe_tokens=0", "eval.forgetting.probe_tokens"),
])
def test_eval_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_report_settings_do_not_change_the_config_hash():
    a = load_config(None, [])
    b = load_config(None, ["eval.buckets.length_bands=[10]", "eval.forgetting.probe_tokens=5"])
    assert a.sha256() == b.sha256()


def test_s3_run_directory(s3_prefix, tmp_path):
    from kcpt import storage

    cfg = load_config(None, [*_overrides(tmp_path, _domain_file(tmp_path), s3_prefix),
                             "plan.0.max_steps=3", "plan.1.max_steps=3"])
    res = run_plan(cfg, resume="never", in_process=True, console=False, data_table=False)
    uri = str(res.run_dir)
    assert storage.is_uri(uri)
    assert main(["report", uri, "--forgetting", "--probe-tokens", "100"]) == 0
    store = storage.Store(uri)
    assert store.is_file("forgetting.json") and store.is_file("forgetting.parquet")
    rep = load_forgetting(uri)
    assert set(rep.table.stage) == {"base", "cpt", "s1"}
    assert all(c.startswith(uri) for c in rep.table[rep.table.stage != "base"].checkpoint)
    assert not any(math.isnan(x) for x in rep.table.kl_base)


def test_starting_a_run_over_removes_its_old_forgetting_report_and_eval_results(tmp_path):
    """`kcpt report` lists a run's forgetting report and every eval/lm_eval-*.json: after --overwrite it showed the
    deleted run's lm-eval results beside the new checkpoints."""
    from kcpt.eval.harness import EVAL_DIR
    from kcpt.train.rundir import RunDir

    rd = RunDir(tmp_path / "run").create(load_config())
    for name in ("forgetting.json", "forgetting.parquet"):
        (rd.root / name).write_text("old")
    (rd.root / EVAL_DIR).mkdir()
    (rd.root / EVAL_DIR / "lm_eval-03-stage3-step000040.json").write_text("{}")
    rd.start_over()
    assert not (rd.root / "forgetting.json").exists() and not (rd.root / "forgetting.parquet").exists()
    assert not (rd.root / EVAL_DIR).exists()
