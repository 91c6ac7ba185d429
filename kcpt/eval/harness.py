"""lm-evaluation-harness on kcpt checkpoints (``kcpt eval``; needs the ``kcpt[eval]`` extra).

**The exam set as lm-eval tasks** (:func:`export_exam_tasks`): a group ``kcpt_exam`` of

- ``kcpt_exam_mc`` (``output_type: multiple_choice``) for items with ``choices``: ``doc_to_text`` is the prompt
  exactly as kcpt renders it (:func:`kcpt.data.exam.render_prompt`, ending in ``"답: "``), ``doc_to_choice`` the
  choices, ``target_delimiter: ""`` (the prompt's own trailing space is the delimiter), ``doc_to_target`` the index
  of the choice equal to the answer. lm-eval 0.4.13 (``TemplateLM._encode_pair``) moves the context's trailing
  whitespace into the continuation, tokenizes ``context + continuation`` once and scores the tokens after those of
  the (stripped) context: the tokens kcpt's boundary rule scores (a token ending after the prompt is an answer
  token; BPE merges the prompt's trailing space into the choice's first word). ``acc`` is the argmax of the
  log-likelihoods, ``acc_norm`` divides them by ``len(choice)`` characters, as
  :func:`kcpt.eval.exam_scoring.score_exam` with ``length_norm="none"`` / ``"chars"``.
- ``kcpt_exam_gen`` (``generate_until``) for short-answer items: greedy decoding from the prompt without its
  trailing whitespace until EOS or ``max_gen_toks`` (the longest reference answer in tokens + 8), scored with
  kcpt's normalised ``exact_match`` and character-level ``char_f1`` (:mod:`kcpt.eval.exam_scoring`).

The task directory (YAML + JSONL with ``dataset_path: json`` / ``data_files``) also works with the ``lm_eval``
CLI: ``lm_eval --include_path DIR --tasks kcpt_exam ...`` (kcpt must be importable for the generation metrics).

**Running** (:func:`run_lm_eval`): lm-eval runs in a child process whose environment has ``HF_HUB_OFFLINE=1``
and ``HF_DATASETS_OFFLINE=1`` (huggingface_hub and datasets read them once, at import, so only a fresh process
is reliably offline). Standard tasks (``kobest_*``, ``kmmlu``, ``haerae``, any lm-eval task name) are passed
through; one whose data is not in the local HF datasets cache is skipped with a message (none left: an error).

**Results**: ``<run>/eval/lm_eval-<checkpoint>.json`` when the checkpoint lies in a run's ``checkpoints/`` (a URI
run: uploaded too), else ``<output_dir>/lm_eval-<checkpoint>.json``; beside it ``….samples.jsonl``, one line per
scored document. The JSON holds lm-eval's ``results`` / ``configs`` / ``versions`` / ``n-samples`` and a
``kcpt`` block (checkpoint, exam set, item counts, tasks skipped and why). ``kcpt report RUN`` shows them
(:func:`format_lm_eval_results`).

This module imports neither torch nor lm_eval at import time (``kcpt report`` uses it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from kcpt import storage
from kcpt.config import ExamTemplate, KcptConfig
from kcpt.data.types import ExamItem
from kcpt.errors import ConfigError, InputError, KcptError

EXAM_GROUP = "kcpt_exam"
MC_TASK = "kcpt_exam_mc"
GEN_TASK = "kcpt_exam_gen"
EXAM_TASKS = (EXAM_GROUP, MC_TASK, GEN_TASK)
UTILS_MODULE = "kcpt_exam_utils"
EVAL_DIR = "eval"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
EXIT_TASK_ERROR = 3
"""Exit status of the child when the tasks cannot run (unknown names, no data offline): its message is in the
results file."""

# ----------------------------------------------------------------------------------------------------- export


@dataclass
class ExamExport:
    """What :func:`export_exam_tasks` wrote: the task directory and the task names in it (the group first)."""

    task_dir: Path
    tasks: list[str]
    n_mc: int
    n_short: int
    max_gen_toks: int | None
    skipped: list[str] = field(default_factory=list)
    """Messages of items that could not be rendered (more choices than ``choice_labels``)."""


_UTILS_SOURCE = '''"""Written by kcpt (kcpt.eval.harness): the generation metrics of kcpt_exam_gen, kcpt's own."""

from kcpt.eval.exam_scoring import char_f1, exact_match


def process_results(doc, results):
    pred = results[0]
    return {"exact_match": float(exact_match(pred, doc["answer"])), "char_f1": char_f1(pred, doc["answer"])}
'''


def _task_yaml(task: str, data: Path, extra: dict[str, Any], metrics: list[str], function: str | None = None) -> str:
    cfg = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
           "test_split": "test", **extra,
           "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
           "metadata": {"version": 1}}
    text = yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False)
    return text + (f"process_results: !function {function}\n" if function else "")


def export_exam_tasks(items: list[ExamItem], template: ExamTemplate, out_dir: str | Path, tokenizer: Any) -> ExamExport:
    """Write the lm-eval task group ``kcpt_exam`` for ``items`` into ``out_dir`` (see the module docstring).

    ``tokenizer`` sizes ``max_gen_toks`` (longest short answer in tokens + 8). An item with more choices than the
    template's labels is left out (its message in ``skipped``); an MC item whose answer is no choice is an
    :class:`InputError`. At least one item must remain."""
    from kcpt.data.exam import TooManyChoices, render_prompt
    from kcpt.eval.exam_scoring import GEN_EXTRA_TOKENS, gold_index

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mc, gen, skipped = [], [], []
    for it in items:
        try:
            prompt = render_prompt(it, template)
        except TooManyChoices as e:
            skipped.append(str(e))
            continue
        if it.choices:
            mc.append({"id": it.id, "prompt": prompt, "choices": it.choices, "label": gold_index(it)})
        else:
            gen.append({"id": it.id, "context": prompt.rstrip(), "answer": it.answer})
    if not mc and not gen:
        raise InputError("no exam item to evaluate" + (f" ({len(skipped)} skipped: {skipped[0]})" if skipped else ""))
    tasks = []
    if mc:
        _write_jsonl(out / f"{MC_TASK}.jsonl", mc)
        (out / f"{MC_TASK}.yaml").write_text(_task_yaml(
            MC_TASK, out / f"{MC_TASK}.jsonl",
            {"output_type": "multiple_choice", "doc_to_text": "prompt", "doc_to_choice": "choices",
             "doc_to_target": "label", "target_delimiter": ""}, ["acc", "acc_norm"]), encoding="utf-8")
        tasks.append(MC_TASK)
    max_gen = None
    if gen:
        longest = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in gen)
        max_gen = longest + GEN_EXTRA_TOKENS
        _write_jsonl(out / f"{GEN_TASK}.jsonl", gen)
        (out / f"{UTILS_MODULE}.py").write_text(_UTILS_SOURCE, encoding="utf-8")
        (out / f"{GEN_TASK}.yaml").write_text(_task_yaml(
            GEN_TASK, out / f"{GEN_TASK}.jsonl",
            {"output_type": "generate_until", "doc_to_text": "context", "doc_to_target": "answer",
             "target_delimiter": "", "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_gen}},
            ["exact_match", "char_f1"], f"{UTILS_MODULE}.process_results"), encoding="utf-8")
        tasks.append(GEN_TASK)
    (out / f"{EXAM_GROUP}.yaml").write_text(yaml.safe_dump(
        {"group": EXAM_GROUP, "task": tasks, "metadata": {"version": 1}}, sort_keys=False), encoding="utf-8")
    return ExamExport(out, [EXAM_GROUP, *tasks], len(mc), len(gen), max_gen, skipped)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# ------------------------------------------------------------------------------------------- exam set, checkpoint


def read_exam_set(cfg: KcptConfig, name: str) -> list[ExamItem]:
    """The items of the exam dataset ``name`` of ``cfg`` (its inputs, its ``exam_kind``); bad records are counted
    skips as in ``kcpt prepare`` (errors with ``data.strict``)."""
    from kcpt.data.demo import resolve_inputs
    from kcpt.data.exam_io import read_exam_items
    from kcpt.data.rejects import RejectReport

    ds = cfg.data.datasets.get(name)
    if ds is None or ds.kind != "exam":
        exams = sorted(k for k, d in cfg.data.datasets.items() if d.kind == "exam")
        raise ConfigError(f"--exam-set: no exam dataset named '{name}' in data.datasets (exam datasets: {exams})")
    return list(read_exam_items(resolve_inputs(ds.inputs), report=RejectReport(), strict=cfg.data.strict,
                                kind=ds.exam_kind, max_line_chars=cfg.data.filters.max_line_chars))


def trained_exam_items(items: list[ExamItem], cfg: KcptConfig, tokenizer) -> tuple[list[ExamItem], list[str]]:
    """The items preparation keeps for training and ``exam_acc``, and why each other one was left out (longer than
    ``data.seq_len`` tokens with ``tokenizer``, or more choices than the template labels)."""
    from kcpt.data.exam import ExamTooLong, TooManyChoices, encode_exam_item

    kept: list[ExamItem] = []
    left_out: list[str] = []
    for item in items:
        try:
            encode_exam_item(item, tokenizer, cfg.data.template, cfg.data.seq_len)
        except (ExamTooLong, TooManyChoices) as e:
            left_out.append(str(e))
            continue
        kept.append(item)
    return kept, left_out


def default_exam_set(cfg: KcptConfig, stage: str | None) -> str:
    """The exam set a checkpoint is judged on: its stage's ``eval_exam``, else the first ``eval_exam`` of the
    plan (a CPT checkpoint); ConfigError when the plan has none."""
    by_stage = {s.name: s.eval_exam for s in cfg.plan}
    if stage is not None and by_stage.get(stage):
        return by_stage[stage]  # type: ignore[return-value]
    for s in cfg.plan:
        if s.eval_exam:
            return s.eval_exam
    raise ConfigError("no stage of the plan has an eval_exam: pass --exam-set NAME (an exam dataset of "
                      "data.datasets)")


@dataclass
class CheckpointInfo:
    """Where a checkpoint (or plain HF model directory) is and which run it belongs to."""

    ref: str
    local: Path
    name: str
    manifest: dict[str, Any]
    run: str | None
    """The run directory (path or URI) holding it in ``checkpoints/``, else None."""


def locate_checkpoint(ref: str) -> CheckpointInfo:
    """Resolve a checkpoint ref (local path or URI; a URI is downloaded once, :func:`kcpt.train.checkpoint.fetch`).
    A directory with ``config.json`` and no kcpt manifest is taken as a plain HF model (no run)."""
    from kcpt.train import checkpoint as ckpt
    from kcpt.train.rundir import MARKER

    ref = str(ref).rstrip("/")
    local = ckpt.fetch(ref, engine=False)
    if not local.is_dir():
        raise InputError("no checkpoint directory here", path=ref)
    manifest: dict[str, Any] = {}
    if (local / ckpt.MANIFEST).is_file() or not (local / "config.json").is_file():
        manifest = ckpt.read_manifest(local)
    name = ref.rsplit("/", 1)[-1] if storage.is_uri(ref) else local.resolve().name
    run = None
    if storage.is_uri(ref):
        parent, _, _ = ref.rpartition("/")
        root, _, leaf = parent.rpartition("/")
        if leaf == "checkpoints" and storage.Store(root).is_file(MARKER):
            run = root
    else:
        parent = local.resolve().parent
        if parent.name == "checkpoints" and (parent.parent / MARKER).is_file():
            run = str(parent.parent)
    return CheckpointInfo(ref, local, name, manifest, run)


# ----------------------------------------------------------------------------------------------------- running


@dataclass
class EvalOutcome:
    path: str
    """Where the results JSON was written (path or URI)."""
    results: dict[str, Any]


def run_lm_eval(checkpoint: str, *, tasks: list[str] | None = None, limit: int | None = None, batch_size: int = 8,
                output_dir: str | None = None, exam_set: str | None = None, config: str | None = None,
                device: str | None = None, task_dir: str | None = None, quiet: bool = False) -> EvalOutcome:
    """Run lm-eval on ``checkpoint`` (see the module docstring) and write the results; returns them.

    ``tasks``: lm-eval task/group names (default ``["kcpt_exam"]``; ``kcpt_exam``, ``kcpt_exam_mc`` and
    ``kcpt_exam_gen`` are the exported exam set). ``limit``: at most this many documents per task. ``exam_set``:
    the exam dataset (default :func:`default_exam_set`); ``config``: the config that defines it when the
    checkpoint is not in a run (default: the run's ``config.yaml``, else kcpt's defaults). ``task_dir``: keep the
    exported exam task there (default: a temporary directory). ``quiet``: lm-eval's output is not shown (it is
    still returned in errors)."""
    from kcpt.config import load_config
    from kcpt.train.rundir import RunDir

    tasks = list(tasks or [EXAM_GROUP])
    if not tasks or any(not t.strip() for t in tasks):
        raise ConfigError("--tasks: give lm-eval task names separated by commas")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    info = locate_checkpoint(checkpoint)
    rd = RunDir(info.run).pull() if info.run is not None else None
    if output_dir is None and rd is None:
        raise ConfigError(f"{checkpoint}: not inside a kcpt run directory (<run>/checkpoints/<name>): pass "
                          "--output-dir for the results")
    if config is not None:
        cfg = load_config(config)
    elif rd is not None and rd.config_path.is_file():
        cfg = load_config(rd.config_path)
    else:
        cfg = load_config(None)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="kcpt-lm-eval-") as tmp:
        work = Path(tmp)
        export, name = None, None
        if any(t in EXAM_TASKS for t in tasks):
            from transformers import AutoTokenizer

            name = exam_set or default_exam_set(cfg, info.manifest.get("stage"))
            tok = AutoTokenizer.from_pretrained(info.local)
            # the items training scored (exam_acc): preparation drops those longer than seq_len
            items, left_out = trained_exam_items(read_exam_set(cfg, name), cfg, tok)
            if left_out:
                print(f"exam set '{name}': {len(left_out)} items left out, as preparation leaves them out of training "
                      f"and exam_acc (e.g. {left_out[0]})", flush=True)
            export = export_exam_tasks(items, cfg.data.template, Path(task_dir) if task_dir else work / "tasks", tok)
            export.skipped[:0] = left_out
            missing = [t for t in tasks if t in EXAM_TASKS and t not in export.tasks]
            if missing:
                kind = "multiple-choice" if MC_TASK in missing else "short-answer"
                raise InputError(f"exam set '{name}' has no {kind} items: task {missing[0]} would be empty")
        spec = {"model_dir": str(info.local), "tasks": tasks, "limit": limit, "batch_size": batch_size,
                "device": device, "include_path": str(export.task_dir) if export else None,
                "exam_tasks": list(EXAM_TASKS), "out": str(work / "results.json"),
                "samples": str(work / "samples.jsonl")}
        (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        env = {**os.environ, **OFFLINE_ENV}
        proc = subprocess.run([sys.executable, "-m", "kcpt.eval.harness", str(work / "spec.json")], env=env,
                              stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None,
                              text=True)
        out = work / "results.json"
        res = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else None
        if res is not None and "error" in res:
            raise InputError(res["error"])
        if proc.returncode != 0 or res is None:
            tail = (proc.stdout or "")[-2000:] if quiet else "its output is above"
            raise KcptError(f"lm-eval failed (exit {proc.returncode}): {tail}")
        res["kcpt"] = {
            "checkpoint": info.ref, "checkpoint_name": info.name, "run": info.run,
            "stage": info.manifest.get("stage"), "step": info.manifest.get("step"),
            "exam_set": name,
            "exam_items": {"multiple_choice": export.n_mc, "short_answer": export.n_short,
                           "left_out": export.skipped} if export else None,
            "max_gen_toks": export.max_gen_toks if export else None,
            "tasks": tasks, "skipped": res.pop("skipped", {}), "limit": limit, "batch_size": batch_size,
            "seconds": round(time.time() - started, 1),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "offline": True}
        samples = (work / "samples.jsonl").read_bytes() if (work / "samples.jsonl").is_file() else b""
        path = write_results(res, samples, info.name, rd if output_dir is None else None, output_dir)
    return EvalOutcome(path, res)


def results_name(checkpoint_name: str) -> str:
    return f"lm_eval-{checkpoint_name}.json"


def write_results(res: dict[str, Any], samples: bytes, name: str, rd: Any, output_dir: str | None) -> str:
    """Write ``lm_eval-<name>.json`` and ``….samples.jsonl`` into ``<rd>/eval/`` (a :class:`RunDir`; uploaded when it
    is a URI run), else into ``output_dir`` (a path or URI); returns the JSON's path or URI."""
    text = json.dumps(res, indent=1, ensure_ascii=False)
    fname, sname = results_name(name), results_name(name)[:-len(".json")] + ".samples.jsonl"
    if rd is not None:
        local = rd.root / EVAL_DIR
        local.mkdir(parents=True, exist_ok=True)
        _atomic_write(local / sname, samples)
        _atomic_write(local / fname, text.encode("utf-8"))
        if rd.remote is not None:
            rd.remote.upload_file(local / sname, f"{EVAL_DIR}/{sname}")
            rd.remote.upload_file(local / fname, f"{EVAL_DIR}/{fname}")
        return storage.join(rd.location, EVAL_DIR, fname)
    assert output_dir is not None
    if storage.is_uri(output_dir):
        store = storage.Store(output_dir)
        store.write_bytes(sname, samples)
        store.write_text(fname, text)
        return storage.join(output_dir, fname)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / sname, samples)
    _atomic_write(out / fname, text.encode("utf-8"))
    return str(out / fname)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------- reading


def load_lm_eval_results(run_dir: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(file name, results)`` of every ``eval/lm_eval-*.json`` of a run directory (a URI: downloaded into the
    run's local mirror first), sorted by name. An unreadable file is an InputError naming it."""
    from kcpt.train.rundir import RunDir

    rd = RunDir(run_dir)
    if rd.remote is not None:
        for rel in rd.remote.walk(EVAL_DIR):
            if rel.startswith("lm_eval-") and rel.endswith(".json"):
                rd.remote.download_file(f"{EVAL_DIR}/{rel}", rd.root / EVAL_DIR / rel)
    found = []
    for p in sorted((rd.root / EVAL_DIR).glob("lm_eval-*.json")):
        try:
            res = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"unreadable lm-eval results ({e}); remove the file or re-run kcpt eval", path=str(p)
                             ) from None
        if not isinstance(res, dict) or not isinstance(res.get("results"), dict):
            raise InputError("not lm-eval results (no 'results' object); remove the file or re-run kcpt eval",
                             path=str(p))
        found.append((p.name, res))
    return found


def result_rows(res: dict[str, Any]) -> list[tuple[str, str, float, int | None]]:
    """``(task, metric, value, n)`` of lm-eval results: every numeric metric (``name,filter``; the filter is
    shown unless it is ``none``), without stderr entries; ``n``: documents scored."""
    rows = []
    n_samples = res.get("n-samples") or {}
    for task, metrics in res["results"].items():
        if not isinstance(metrics, dict):
            continue
        n = (n_samples.get(task) or {}).get("effective")
        for key, v in metrics.items():
            if "," not in key or "_stderr" in key or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            metric, _, filt = key.partition(",")
            rows.append((task, metric if filt == "none" else f"{metric} ({filt})", float(v), n))
    return rows


def format_lm_eval_results(results: list[tuple[str, dict[str, Any]]]) -> str:
    """A table checkpoint / task / metric / value / n of :func:`load_lm_eval_results`, and the skipped tasks."""
    from kcpt.analysis.run_report import _table

    rows, notes = [], []
    for fname, res in results:
        k = res.get("kcpt") or {}
        ckpt = str(k.get("checkpoint_name") or fname)
        for task, metric, value, n in result_rows(res):
            rows.append([ckpt, task, metric, f"{value:.4f}", "-" if n is None else str(n)])
        for task, why in (k.get("skipped") or {}).items():
            notes.append(f"  {ckpt}: {task} skipped: {why}")
    return _table(["checkpoint", "task", "metric", "value", "n"], rows) + ("\n" + "\n".join(notes) if notes else "")


# ------------------------------------------------------------------------------------------------ child process


class _TaskProblem(Exception):
    pass


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, str):
        try:
            return v.item()
        except (ValueError, TypeError):
            pass
    if v is None or isinstance(v, str | int | float | bool):
        return v
    return str(v)


def _resolve_tasks(tm: Any, names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The names that can run and ``{name: why}`` of those skipped because their data is not available offline.
    Unknown names, or nothing left to run, raise :class:`_TaskProblem` with a one-line message."""
    import difflib

    known = set(tm.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, known, n=3)
            hints.append(f"'{n}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise _TaskProblem(f"--tasks: unknown lm-eval task {'; '.join(hints)}; `lm_eval ls tasks` lists them")
    runnable, skipped = [], {}
    for n in names:
        try:
            tm.load([n])
        except Exception as e:  # noqa: BLE001 - datasets raises ConnectionError, FileNotFoundError, ... offline
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            skipped[n] = (f"its data is not available offline ({first}); kcpt eval runs lm-eval with "
                          "HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1: load the dataset once where the Hub is "
                          "reachable (e.g. `lm_eval --tasks " + n + " --limit 1 ...`) and copy the HF cache "
                          "(~/.cache/huggingface or $HF_HOME) to this machine")
            continue
        runnable.append(n)
    if not runnable:
        raise _TaskProblem("no task can run: " + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    return runnable, skipped


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import logging

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    exam = set(spec["exam_tasks"])
    tm = TaskManager(include_path=spec["include_path"],
                     include_defaults=any(t not in exam for t in spec["tasks"]))
    runnable, skipped = _resolve_tasks(tm, spec["tasks"])
    for n, why in skipped.items():
        print(f"kcpt eval: warning: task {n} skipped: {why}", file=sys.stderr)
    device = spec["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = HFLM(pretrained=spec["model_dir"], device=device, batch_size=spec["batch_size"])
    res = lm_eval.simple_evaluate(model=lm, tasks=runnable, task_manager=tm, limit=spec["limit"], log_samples=True,
                                  bootstrap_iters=0)
    assert res is not None
    with open(spec["samples"], "w", encoding="utf-8") as f:
        for task, samples in (res.get("samples") or {}).items():
            for s in samples:
                doc = s.get("doc") or {}
                row = {"task": task, "doc_id": s.get("doc_id"), "id": doc.get("id") if isinstance(doc, dict) else None,
                       "target": s.get("target"), "resps": s.get("filtered_resps"),
                       **{m: s.get(m) for m in s.get("metrics", [])}}
                f.write(json.dumps(_json_safe(row), ensure_ascii=False) + "\n")
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
            "lm_eval_version", "transformers_version", "max_length", "date")
    return {**{k: _json_safe(res[k]) for k in keep if k in res}, "skipped": skipped}


def _child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    try:
        out = _child(spec)
        code = 0
    except _TaskProblem as e:
        out, code = {"error": str(e)}, EXIT_TASK_ERROR
    Path(spec["out"]).write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
