"""`kcpt eval`: lm-evaluation-harness on a tiny kcpt checkpoint, offline, with the exam set as a custom task.

One real lm-eval run (a child process, ~20 s on 2 cores) is shared by the module: the demo tokenizer + the built-in
tiny model (random init, seed 0) saved as a stage-2 checkpoint of a run directory, evaluated on the demo exam set
``exam_val`` (``--limit 12``: 12 multiple-choice + 12 short-answer items) plus ``kobest_boolq``, whose data is
not in the HF cache offline (skipped with a message).

Agreement (what the issue asks: lm-eval and kcpt's own eval agree on the same checkpoint):

- against a reference computed here in a few lines of torch (kcpt's boundary rule: ``prompt + choice`` tokenized
  once with offsets, the tokens ending after the prompt scored, one unpadded forward per choice): every choice's
  log-likelihood within 1e-4 nats (lm-eval scores right-padded batches of several choices; float32 sums of ~5-30
  log-probs from differently shaped matmuls differ by ~1e-6), and lm-eval's ``acc`` / ``acc_norm`` per item equal
  to the argmax of the reference (raw / divided by the choice's characters). Exact agreement of the
  choices is expected because no two choices are within the tolerance (checked: the test fails otherwise).
- against :func:`kcpt.eval.exam_scoring.score_exam` (written by H1; merged before this module): same per-item
  correctness for MC (``length_norm="none"`` ↔ ``acc``, ``"chars"`` ↔ ``acc_norm``) and the same greedy answers,
  exact match and char F1 for short answers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kcpt.cli import main
from kcpt.config import load_config
from kcpt.data.exam import render_prompt
from kcpt.errors import InputError
from kcpt.eval import harness

LIMIT = 12
LL_ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory with one checkpoint: the demo tokenizer + the tiny model (random init)."""
    from kcpt.model.loading import build_tiny_model
    from kcpt.model.tokenizer import load_tokenizer, tokenizer_sha256
    from kcpt.train.checkpoint import build_manifest, save_checkpoint
    from kcpt.train.rundir import RunDir

    root = tmp_path_factory.mktemp("lm_eval")
    cfg = load_config(None, [f"train.output_dir={root / 'runs'}", "train.run_name=tiny"])
    tok = load_tokenizer(cfg.tokenizer)
    model = build_tiny_model(cfg.model, len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    rd = RunDir(root / "runs" / "tiny").create(cfg)
    rd.write_summary({"stages": {}, "stage_order": [], "baseline_raw_best": None})
    manifest = build_manifest(tokenizer_sha256=tokenizer_sha256(tok), data_sha256={}, config_sha256=None,
                              base_model="tiny", restore_mode="full", step=4, stage="stage2", stage_index=2)
    ckpt = save_checkpoint(rd.checkpoints / "02-stage2-step000004", model=model, tokenizer=tok, trainer_state={},
                           manifest=manifest)
    return rd, ckpt, cfg


@pytest.fixture(scope="module")
def lm_eval_run(tiny_run):
    rd, ckpt, _ = tiny_run
    code = main(["eval", str(ckpt), "--tasks", "kcpt_exam,kobest_boolq", "--limit", str(LIMIT),
                 "--batch-size", "4"])
    assert code == 0
    path = rd.root / "eval" / "lm_eval-02-stage2-step000004.json"
    res = json.loads(path.read_text(encoding="utf-8"))
    samples = [json.loads(line) for line in path.with_name("lm_eval-02-stage2-step000004.samples.jsonl")
               .read_text(encoding="utf-8").splitlines()]
    return res, samples


@pytest.fixture(scope="module")
def exam_items(tiny_run):
    _, _, cfg = tiny_run
    return harness.read_exam_set(cfg, "exam_val")


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, ckpt, _ = tiny_run
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(ckpt)


def reference_logliks(model, tok, prompt: str, choices: list[str]) -> list[float]:
    """kcpt's rule, independently: tokenize ``prompt + choice`` once with offsets; sum log p of the tokens whose span
    ends after the prompt (a token straddling the boundary, e.g. the prompt's space merged into the choice, counts);
    one forward per choice, no padding."""
    out = []
    for c in choices:
        enc = tok(prompt + c, add_special_tokens=True, split_special_tokens=True, return_offsets_mapping=True)
        ids = enc["input_ids"]
        first = next(i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > len(prompt))
        assert first > 0
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        out.append(sum(logp[i - 1, ids[i]].item() for i in range(first, len(ids))))
    return out


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def _margin(xs: list[float]) -> float:
    top = sorted(xs, reverse=True)
    return top[0] - top[1]


# --------------------------------------------------------------------------------------------------- export


def test_export_renders_exactly_kcpts_text(tmp_path, exam_items, model_and_tokenizer):
    _, tok = model_and_tokenizer
    template = load_config(None).data.template
    exp = harness.export_exam_tasks(exam_items, template, tmp_path, tok)
    assert exp.tasks == ["kcpt_exam", "kcpt_exam_mc", "kcpt_exam_gen"]
    mc = [json.loads(x) for x in (tmp_path / "kcpt_exam_mc.jsonl").read_text(encoding="utf-8").splitlines()]
    gen = [json.loads(x) for x in (tmp_path / "kcpt_exam_gen.jsonl").read_text(encoding="utf-8").splitlines()]
    assert (exp.n_mc, exp.n_short) == (len(mc), len(gen)) == (24, 55)
    by_id = {it.id: it for it in exam_items}
    for row in mc:
        it = by_id[row["id"]]
        assert row["prompt"] == render_prompt(it, template) and row["prompt"].endswith("답: ")
        assert row["choices"] == it.choices and it.choices[row["label"]] == it.answer
    for row in gen:
        assert row["context"] + " " == render_prompt(by_id[row["id"]], template)
    longest = max(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) for r in gen)
    assert exp.max_gen_toks == longest + 8
    import yaml

    cfg = yaml.safe_load((tmp_path / "kcpt_exam_mc.yaml").read_text(encoding="utf-8"))
    assert cfg["output_type"] == "multiple_choice" and cfg["target_delimiter"] == "" and cfg["doc_to_text"] == "prompt"
    assert cfg["dataset_path"] == "json" and Path(cfg["dataset_kwargs"]["data_files"]["test"]).is_file()


def test_export_refuses_an_answer_that_is_no_choice(tmp_path, exam_items, model_and_tokenizer):
    from dataclasses import replace

    bad = next(it for it in exam_items if it.choices)
    bad = replace(bad, answer="제999조")
    with pytest.raises(InputError, match=rf"'{bad.id}'.*not one of its choices"):
        harness.export_exam_tasks([bad], load_config(None).data.template, tmp_path, model_and_tokenizer[1])


# --------------------------------------------------------------------------------------------------- the run


def test_results_go_into_the_run_and_the_report(lm_eval_run, tiny_run, capsys):
    res, samples = lm_eval_run
    rd, _, _ = tiny_run
    k = res["kcpt"]
    assert k["exam_set"] == "exam_val" and k["stage"] == "stage2" and k["run"] == str(rd.root)
    assert k["exam_items"]["multiple_choice"] == 24 and k["exam_items"]["short_answer"] == 55
    assert "OfflineModeIsEnabled" in k["skipped"]["kobest_boolq"]   # the child really ran with the Hub off
    assert res["n-samples"]["kcpt_exam_mc"]["effective"] == LIMIT
    assert res["n-samples"]["kcpt_exam_gen"]["effective"] == LIMIT
    mc = res["results"]["kcpt_exam_mc"]
    assert mc["acc,none"] == pytest.approx(sum(s["acc"] for s in samples if s["task"] == "kcpt_exam_mc") / LIMIT)
    assert {"exact_match,none", "char_f1,none"} <= set(res["results"]["kcpt_exam_gen"])
    from kcpt.analysis.run_report import format_run_report

    report = format_run_report(rd.root)
    assert "lm-evaluation-harness" in report
    line = next(x for x in report.splitlines() if "kcpt_exam_mc" in x and " acc " in x)
    assert f"{mc['acc,none']:.4f}" in line and "02-stage2-step000004" in line
    assert "kobest_boolq skipped" in report


def test_lm_eval_loglikelihoods_match_kcpts_boundary_rule(lm_eval_run, exam_items, model_and_tokenizer):
    _, samples = lm_eval_run
    model, tok = model_and_tokenizer
    template = load_config(None).data.template
    by_id = {it.id: it for it in exam_items}
    mc = [s for s in samples if s["task"] == "kcpt_exam_mc"]
    assert len(mc) == LIMIT
    for s in mc:
        it = by_id[s["id"]]
        prompt = render_prompt(it, template)
        ref = reference_logliks(model, tok, prompt, it.choices)
        got = [r[0] for r in s["resps"]]
        assert got == pytest.approx(ref, abs=LL_ATOL), it.id
        normed = [v / len(c) for v, c in zip(ref, it.choices, strict=True)]
        assert _margin(ref) > 2 * LL_ATOL and _margin(normed) > 2 * LL_ATOL, f"{it.id}: a near tie; pick another seed"
        gold = it.choices.index(it.answer)
        assert s["acc"] == float(_argmax(ref) == gold), it.id
        assert s["acc_norm"] == float(_argmax(normed) == gold), it.id


def test_lm_eval_agrees_with_kcpt_exam_scoring(lm_eval_run, exam_items, model_and_tokenizer):
    """Needs kcpt.eval.exam_scoring (H1's branch, merged first)."""
    from kcpt.eval.exam_scoring import char_f1, normalize_answer, score_exam

    res, samples = lm_eval_run
    model, tok = model_and_tokenizer
    template = load_config(None).data.template
    mc_items = [it for it in exam_items if it.choices][:LIMIT]
    short_items = [it for it in exam_items if not it.choices][:LIMIT]
    lm = {(s["task"], s["id"]): s for s in samples}
    for norm, metric in (("none", "acc"), ("chars", "acc_norm")):
        kc = score_exam(model, tok, mc_items, template, batch_size=4, length_norm=norm)
        assert [float(r["correct"]) for r in kc.per_item] == [lm["kcpt_exam_mc", it.id][metric] for it in mc_items]
        assert kc.accuracy == pytest.approx(sum(lm["kcpt_exam_mc", it.id][metric] for it in mc_items) / LIMIT)
    # the same decoding budget: lm-eval's max_gen_toks was sized on all short items of the exam set, not the first 12
    kc = score_exam(model, tok, short_items, template, batch_size=4, max_new_tokens=res["kcpt"]["max_gen_toks"])
    for r, it in zip(kc.per_item, short_items, strict=True):
        s = lm["kcpt_exam_gen", it.id]
        assert normalize_answer(s["resps"][0]) == r["pred"], it.id
        assert s["exact_match"] == float(r["correct"])
        assert math.isclose(s["char_f1"], char_f1(s["resps"][0], it.answer))


# --------------------------------------------------------------------------------------------------- errors


def test_bad_requests_are_one_line_errors(tiny_run, tmp_path, capsys):
    rd, ckpt, _ = tiny_run
    loose = tmp_path / "loose"
    import shutil

    shutil.copytree(ckpt, loose)
    assert main(["eval", str(loose)]) == 2
    assert "not inside a kcpt run directory" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--exam-set", "raw_val"]) == 2
    assert "no exam dataset named 'raw_val'" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--tasks", "kobest_bolq"]) == 2   # a real child run: lm-eval's task index
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kcpt eval: error: --tasks: unknown lm-eval task 'kobest_bolq' (did you mean "
                              "kobest_boolq")


def test_a_checkpoint_in_a_bucket_run_is_found_and_its_results_land_there(tiny_run, s3_prefix):
    from kcpt import storage
    from kcpt.train.checkpoint import MANIFEST
    from kcpt.train.rundir import MARKER, RunDir

    rd, ckpt, _ = tiny_run
    run_uri = f"{s3_prefix}/runs/tiny"
    storage.Store(run_uri).upload_file(rd.root / MARKER, MARKER)
    storage.publish_tree(ckpt, f"{run_uri}/checkpoints/{ckpt.name}", marker=MANIFEST)
    info = harness.locate_checkpoint(f"{run_uri}/checkpoints/{ckpt.name}")
    assert info.run == run_uri and info.name == ckpt.name and info.manifest["stage"] == "stage2"
    assert (info.local / "model.safetensors").is_file()
    res = {"results": {"kcpt_exam_mc": {"acc,none": 0.5, "acc_stderr,none": "N/A"}},
           "n-samples": {"kcpt_exam_mc": {"effective": 2}}, "kcpt": {"checkpoint_name": ckpt.name}}
    where = harness.write_results(res, b"{}\n", info.name, RunDir(run_uri), None)
    assert where == f"{run_uri}/eval/lm_eval-{ckpt.name}.json"
    assert storage.Store(run_uri).is_file(f"eval/lm_eval-{ckpt.name}.samples.jsonl")
    table = harness.format_lm_eval_results(harness.load_lm_eval_results(run_uri))
    assert table.splitlines()[-1].split() == [ckpt.name, "kcpt_exam_mc", "acc", "0.5000", "2"]


def test_the_exported_exam_set_is_the_one_training_scored(tmp_path):
    """``kcpt eval`` exports the items preparation kept (``items.jsonl``, what ``exam_acc`` scores), not every item of
    the inputs: at ``data.seq_len`` 48 preparation drops the longer exam items, and lm-eval's ``n`` counted them."""
    from transformers import AutoTokenizer

    from kcpt.data.exam_io import ITEMS_FILE, read_items_file
    from kcpt.data.prepare import prepare_all

    cfg = load_config(None, [f"data.prepared_root={tmp_path}", "data.seq_len=48", "logging.progress=false"])
    prepared = prepare_all(cfg, ["exam_val"])["exam_val"]
    every = harness.read_exam_set(cfg, "exam_val")
    kept, left_out = harness.trained_exam_items(every, cfg, AutoTokenizer.from_pretrained(prepared / "tokenizer"))
    assert [i.id for i in kept] == [i.id for i in read_items_file(prepared / ITEMS_FILE)]
    assert left_out and len(kept) + len(left_out) == len(every)
    assert "seq_len 48" in left_out[0]
