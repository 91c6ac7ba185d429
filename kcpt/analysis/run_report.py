"""Report of one training run directory: per-stage table, the Pareto-optimal checkpoints and the lm-eval results
of ``kcpt eval`` (``eval/lm_eval-*.json``).

Reads only files (``summary.json``, ``metrics.jsonl``, ``eval/``); needs no Ray. The Pareto front is over
(raw val loss, exam val loss), both minimised, among the evals that saved a checkpoint and measured an exam loss.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kcpt.analysis.pareto import pareto_records
from kcpt.errors import InputError
from kcpt.eval.harness import format_lm_eval_results, load_lm_eval_results
from kcpt.train.rundir import RunDir, read_metrics


def _f(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def start_values(metrics: list[dict[str, Any]], stage: str) -> dict[str, Any]:
    """The stage's first eval record (step 0 when ``train.eval_at_start``), or {}."""
    recs = [m for m in metrics if m.get("stage") == stage]
    return min(recs, key=lambda m: m["step"]) if recs else {}


def format_stage_table(summaries: dict[str, dict[str, Any]], metrics: list[dict[str, Any]] | None = None) -> str:
    """One line per stage: steps, stop reason, passed, start → best raw / exam loss and exam accuracy (``-`` when
    not scored), baseline, gate streak; then the stages' warnings (a stage that never gained on its start)."""
    metrics = metrics or []
    header = ["stage", "steps", "stop", "passed", "raw start", "raw best", "exam start", "exam best", "acc start",
              "acc best", "baseline",
              "raw/base", "gate streak", "rollbacks"]
    rows = []
    for name, s in summaries.items():
        st = start_values(metrics, name)
        base = s.get("baseline_raw_best")
        raw_best = s.get("best_raw_val_loss")
        rows.append([name, _f(s.get("steps")), s.get("stop_reason") or "-", _f(s.get("passed")),
                     _f(st.get("raw_val_loss")), _f(raw_best), _f(st.get("exam_val_loss")),
                     _f(s.get("best_exam_val_loss")), _f(st.get("exam_acc"), 3), _f(s.get("best_exam_acc"), 3),
                     _f(base),
                     _f(raw_best / base if raw_best is not None and base else None, 3),
                     _f(s.get("gate_streak")), _f(s.get("rollbacks"))])
    warnings = [f"warning: {s['warning']}" for s in summaries.values() if s.get("warning")]
    return "\n".join([_table(header, rows), *warnings])


def pareto_checkpoints(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Eval records with a checkpoint on their stage's (raw_val_loss, exam_val_loss) Pareto front.

    Each stage's front (what a later stage's ``start_from`` picks among, and what the loop keeps on disk) is
    computed over its own evals — per (``eval_raw``, ``eval_exam``) pair, since losses are only comparable on the
    same eval sets — and the fronts are concatenated in first-seen order."""
    cands = [m for m in metrics if m.get("checkpoint") and m.get("exam_val_loss") is not None
             and m.get("raw_val_loss") is not None]
    groups: dict[tuple[Any, Any, Any], list[dict[str, Any]]] = {}
    for m in cands:
        groups.setdefault((m.get("stage"), m.get("eval_raw"), m.get("eval_exam")), []).append(m)
    return [r for g in groups.values() for r in pareto_records(g, ["raw_val_loss", "exam_val_loss"])]


_NUM = (int, float)
_METRIC_TYPES: dict[str, tuple[type, ...]] = {
    "stage": (str,), "step": (int,), "raw_val_loss": _NUM, "exam_val_loss": _NUM, "exam_acc": _NUM,
    "checkpoint": (str,),
    "gate_ok": (bool,), "eval_raw": (str,), "eval_exam": (str,)}
_SUMMARY_TYPES: dict[str, tuple[type, ...]] = {
    "steps": (int,), "stop_reason": (str,), "passed": (bool,), "best_raw_val_loss": _NUM,
    "best_exam_val_loss": _NUM, "best_exam_acc": _NUM,
    "baseline_raw_best": _NUM, "gate_streak": (int,), "rollbacks": (int,), "warning": (str,)}


def _wrong_type(rec: dict[str, Any], types: dict[str, tuple[type, ...]], required: tuple[str, ...] = ()) -> str | None:
    for key in required:
        if key not in rec:
            return f"key '{key}' is missing"
    for key, allowed in types.items():
        v = rec.get(key)
        if v is not None and (not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed)):
            return f"key '{key}' has a {type(v).__name__} ({v!r:.40}), expected {'/'.join(t.__name__ for t in allowed)}"
    return None


def checked_run_files(rd: RunDir) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``summary.json`` and ``metrics.jsonl`` of a run, with the fields the report uses type-checked
    (:class:`InputError` naming the file, the record and the key otherwise)."""
    summary = rd.read_summary()
    stages, order = summary.get("stages", {}), summary.get("stage_order") or []
    if not isinstance(order, list) or not all(isinstance(x, str) for x in order):
        raise InputError("'stage_order' must be a list of stage names", path=str(rd.summary_path))
    for name, st in stages.items():
        problem = "not an object" if not isinstance(st, dict) else _wrong_type(st, _SUMMARY_TYPES)
        if problem:
            raise InputError(f"stage '{name}': {problem}", path=str(rd.summary_path))
    metrics = read_metrics(rd.root)
    for i, rec in enumerate(metrics, 1):
        problem = _wrong_type(rec, _METRIC_TYPES, ("stage", "step"))
        if problem:
            raise InputError(f"record {i}: {problem}; fix or remove it", path=str(rd.metrics_path))
    return summary, metrics


def _exists(ref: str) -> bool:
    """A checkpoint ref still there (a URI: its manifest is published)."""
    from kcpt import storage

    if storage.is_uri(ref):
        store, rel = storage.store_and_rel(ref)
        return store.is_file(f"{rel}/manifest.json")
    return Path(ref).exists()


def unfinished_stages(metrics: list[dict[str, Any]], finished: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Stage-table entries, from ``metrics.jsonl``, for the stages that have evals but no summary (a run running,
    interrupted or killed): steps = the last eval's step, best losses and accuracy so far, stop ``(unfinished)``."""
    def finite(recs: list[dict[str, Any]], key: str) -> list[float]:
        return [float(r[key]) for r in recs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    base = next((s.get("baseline_raw_best") for s in reversed(finished.values()) if s.get("baseline_raw_best")), None)
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(m.get("stage") for m in metrics):
        if not isinstance(name, str) or name in finished:
            continue
        recs = [m for m in metrics if m.get("stage") == name]
        last = max(recs, key=lambda m: m.get("step") or 0)
        raws, exams, accs = finite(recs, "raw_val_loss"), finite(recs, "exam_val_loss"), finite(recs, "exam_acc")
        out[name] = {"steps": last.get("step"), "stop_reason": "(unfinished)", "passed": None,
                     "best_raw_val_loss": min(raws, default=None), "best_exam_val_loss": min(exams, default=None),
                     "best_exam_acc": max(accs, default=None), "baseline_raw_best": base,
                     "gate_streak": last.get("gate_streak"), "rollbacks": last.get("rollbacks")}
    return out


def format_run_report(run_dir: str | Path) -> str:
    """The stage table and the Pareto-optimal checkpoints of a run directory (a local path or a URI)."""
    rd = RunDir(run_dir).pull()
    if not rd.summary_path.exists() and not rd.metrics_path.exists():
        raise InputError("not a kcpt run directory (no summary.json or metrics.jsonl)", path=str(run_dir))
    summary, metrics = checked_run_files(rd)
    order = summary.get("stage_order") or list(summary.get("stages", {}))
    stages = {k: summary["stages"][k] for k in order if k in summary.get("stages", {})}
    unfinished = unfinished_stages(metrics, stages)
    stages.update(unfinished)
    parts = [f"run: {rd.location}", "", format_stage_table(stages, metrics)]
    for name, s in unfinished.items():
        parts.append(f"note: stage '{name}' has no summary: its last eval is at step {s['steps']}. The run is still "
                     "running, or it stopped there: the same command with --resume continues it.")
    front = pareto_checkpoints(metrics)
    parts += ["", "Pareto-optimal checkpoints (raw val loss, exam val loss; both lower is better):"]
    if front:
        rows = [[m["stage"], str(m["step"]), _f(m["raw_val_loss"]), _f(m["exam_val_loss"]),
                 str(m.get("eval_exam") or "-"), _f(m.get("gate_ok")),
                 m["checkpoint"] + ("" if _exists(m["checkpoint"]) else "  (pruned)")] for m in front]
        parts.append(_table(["stage", "step", "raw", "exam", "exam set", "gate ok", "checkpoint"], rows))
    else:
        parts.append("(none: no eval with both losses saved a checkpoint)")
    parts += _forgetting_part(run_dir)
    lm_eval = load_lm_eval_results(run_dir)
    if lm_eval:
        parts += ["", "lm-evaluation-harness (kcpt eval; eval/lm_eval-<checkpoint>.json):",
                  format_lm_eval_results(lm_eval)]
    return "\n".join(parts)


def _forgetting_part(run_dir: str | Path) -> list[str]:
    """The whole-probe rows of the run's ``forgetting.json`` when one was written (``kcpt report RUN --forgetting``
    computes it; the per-bucket table is there)."""
    from kcpt.eval.forgetting import format_forgetting, load_forgetting

    try:
        report = load_forgetting(run_dir)
    except InputError:
        return []
    return ["", f"From forgetting.json (computed {report.meta.get('created')}; every bucket: kcpt report RUN "
            "--forgetting):", format_forgetting(report, kinds=["all"])]
