"""Loaders and the text report of a tuning experiment directory (made by :func:`kcpt.tune.launch.tune_stage3`).

Public functions used by ``kcpt report EXP_DIR`` and ``notebooks/inspect_trials.ipynb``; they read files and
the Optuna storage only (no Ray):

- :func:`load_manifest` — ``experiment.json`` (baseline, eps, exam target, storage, study name, paths);
- :func:`load_trials` — ``trials.parquet``, one row per trial;
- :func:`load_curves` — every eval of every trial (``runs/<ray_trial_id>/metrics.jsonl``);
- :func:`load_study` — the Optuna study; :func:`param_importances` — Optuna importances or ``None``;
- :func:`pareto_trials` — trials on the (raw, exam) Pareto front at their selected evals;
- :func:`best_config_text` — ``best_config.yaml``; :func:`format_trials_report` — the whole report as text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from kcpt.analysis.pareto import pareto_front
from kcpt.errors import InputError
from kcpt.tune.study_storage import redact


def experiment_dir_of(path: str | Path) -> Path:
    """The local experiment directory for ``path`` (the directory itself or its ``trials.parquet``; a URI such as
    ``s3://bucket/experiments/x``: its node-local mirror with the small files freshly pulled)."""
    from kcpt import storage
    from kcpt.tune.experiment import mirror_of

    if storage.is_uri(str(path)):
        uri = str(path).rstrip("/")
        return mirror_of(uri[: -len("/trials.parquet")] if uri.endswith("/trials.parquet") else uri)
    p = Path(path)
    return p.parent if p.name == "trials.parquet" else p


def load_manifest(exp_dir: str | Path) -> dict[str, Any]:
    exp = experiment_dir_of(exp_dir)
    path = exp / "experiment.json"
    if not path.is_file():
        raise InputError(f"{path}: not a kcpt tune experiment (no experiment.json)", path=str(path))
    return _json_object(path)


def _json_object(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"not valid JSON ({e}); the file is damaged", path=str(path)) from None
    if not isinstance(obj, dict):
        raise InputError("not a JSON object; the file is damaged", path=str(path))
    return obj


def load_trials(exp_dir: str | Path) -> pd.DataFrame:
    """``trials.parquet``: params (``param_*``), objective, constraint, feasible, gate_passed, steps_to_gate,
    tokens_to_gate, status, checkpoint_path, run_dir, trial_dir, selected-eval losses."""
    path = experiment_dir_of(exp_dir) / "trials.parquet"
    if not path.is_file():
        raise InputError(f"{path}: no trials.parquet (run `kcpt tune` first, or it did not finish)", path=str(path))
    import pyarrow as pa

    try:
        return pd.read_parquet(path)
    except (pa.ArrowException, ValueError) as e:
        raise InputError(f"cannot read as Parquet ({e}); the file is damaged", path=str(path)) from None


def load_curves(exp_dir: str | Path, trials: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per eval of every trial: trial_number, ray_trial_id, step, tokens_seen, raw_val_loss,
    exam_val_loss, exam_acc, exam_em, exam_f1, raw_ratio, train_loss (read from each trial's run dir
    ``metrics.jsonl``; exam accuracy columns are NaN where a run did not score it)."""
    from kcpt import storage
    from kcpt.train.rundir import read_metrics

    exp = experiment_dir_of(exp_dir)
    trials = load_trials(exp) if trials is None else trials
    manifest = load_manifest(exp)
    runs = str(manifest.get("runs_dir") or exp / "runs")
    rows: list[dict[str, Any]] = []
    keys = ("step", "tokens_seen", "raw_val_loss", "exam_val_loss", "exam_acc", "exam_em", "exam_f1", "raw_ratio",
            "train_loss")
    for _, t in trials.iterrows():
        run_dir = t["run_dir"] if isinstance(t.get("run_dir"), str) and t["run_dir"] else \
            storage.join(runs, str(t["ray_trial_id"]))
        for m in read_metrics(run_dir):  # a local path or a URI; a bad line is an InputError naming it
            if m.get("stage") not in (None, manifest.get("stage")):
                continue
            rows.append({"trial_number": int(t["trial_number"]), "ray_trial_id": t["ray_trial_id"],
                         **{k: m.get(k) for k in keys}})
    df = pd.DataFrame(rows, columns=["trial_number", "ray_trial_id", *keys])
    return df.astype({k: "float64" for k in keys if k not in ("step",)}).sort_values(["trial_number", "step"])


def load_study(exp_dir: str | Path, storage: str | None = None) -> Any:
    """The Optuna study (``storage`` overrides the URL recorded in experiment.json, e.g. a tunnelled DB)."""
    import optuna

    exp = experiment_dir_of(exp_dir)
    m = load_manifest(exp)
    from kcpt.tune.study_storage import open_storage

    url = storage or m["storage"]
    for scheme, name in (("sqlite:///", "optuna.db"), ("journal:///", "optuna.journal")):
        # a study file kept in the experiment dir, read from another copy of it (a mirror of a URI experiment)
        if url.startswith(scheme) and not Path(url[len(scheme):]).exists() and (exp / name).is_file():
            url = f"{scheme}{exp / name}"
    return optuna.load_study(study_name=m["study_name"], storage=open_storage(url))


def param_importances(study_or_dir: Any) -> dict[str, float] | None:
    """Optuna's parameter importances over COMPLETE trials, or ``None`` when fewer than 2 trials completed or
    the evaluator cannot rank (e.g. every trial has the same objective)."""
    import optuna

    study = study_or_dir if isinstance(study_or_dir, optuna.Study) else load_study(study_or_dir)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < 2:
        return None
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return None


def pareto_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials on the Pareto front over (selected raw val loss, selected exam val loss), both minimised."""
    if trials.empty:
        return trials
    pts = trials[["selected_raw_val_loss", "selected_exam_val_loss"]].astype("float64").values.tolist()
    return trials.iloc[pareto_front(pts)]


def best_config_text(exp_dir: str | Path) -> str | None:
    path = experiment_dir_of(exp_dir) / "best_config.yaml"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def best_trial_info(exp_dir: str | Path) -> dict[str, Any] | None:
    """``best_trial.json``; None when the experiment has no feasible trial (the file holds ``null``) or no export."""
    path = experiment_dir_of(exp_dir) / "best_trial.json"
    if not path.is_file() or path.read_text(encoding="utf-8").strip() == "null":
        return None
    return _json_object(path)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def trials_table(trials: pd.DataFrame) -> str:
    """Fixed-width table: number, status, objective, constraint, feasible, gate, steps to gate, (with
    re-evaluation) runs, gate passes and mean score over them, params."""
    if trials.empty:
        return "(no trials)"
    cols = [("trial_number", "#"), ("status", "status"), ("objective", "objective"),
            ("selected_exam_val_loss", "exam@sel"), ("selected_exam_acc", "acc@sel"), ("constraint", "raw_gate"),
            ("feasible", "feasible"),
            ("gate_passed", "gate"), ("steps_to_gate", "steps→gate"), ("tokens_to_gate", "tokens→gate"),
            ("selected_step", "sel_step")]
    if "reeval_runs" in trials.columns and (trials["reeval_runs"] > 0).any():  # tune.reeval: over all the runs
        cols += [("reeval_runs", "runs"), ("reeval_gate_passes", "passes"), ("reeval_mean_score", "mean_score")]
    cols = [(c, h) for c, h in cols if c in trials.columns]
    cols += [(c, c.removeprefix("param_")) for c in trials.columns if c.startswith("param_")]
    header = [h for _, h in cols]
    rows = [[_fmt(r.get(c)) for c, _ in cols] for _, r in trials.iterrows()]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def format_trials_report(exp_dir: str | Path) -> str:
    """The text ``kcpt report EXP_DIR`` prints: what was tuned, the trial table, the best feasible trial."""
    exp = experiment_dir_of(exp_dir)
    m = load_manifest(exp)
    trials = load_trials(exp)
    counts = trials["status"].value_counts().to_dict() if not trials.empty else {}
    lines = [f"experiment: {exp}",
             f"stage: {m.get('stage')}  study: {m.get('study_name')}  storage: {redact(str(m.get('storage')))}",
             f"baseline_raw_best: {_fmt(m.get('baseline_raw_best'))}  eps: {_fmt(m.get('eps'))}  "
             f"exam_target: {_fmt(m.get('exam_target'))} ({m.get('exam_metric') or 'loss'})",
             f"trials: {len(trials)} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'none'}); "
             f"feasible: {int(trials['feasible'].sum()) if not trials.empty else 0}; "
             f"gate passed: {int(trials['gate_passed'].sum()) if not trials.empty else 0}",
             "", trials_table(trials), ""]
    best = best_trial_info(exp)
    if best:
        lines.append(f"best feasible trial: #{best['trial_number']} objective={_fmt(best['objective'])} "
                     f"exam@sel={_fmt(best.get('selected_exam_val_loss'))} raw_gate={_fmt(best['constraint'])} "
                     f"gate_passed={_fmt(best.get('gate_passed'))} tokens_to_gate={_fmt(best.get('tokens_to_gate'))}")
        lines.append(f"  params: {best['params']}")
        if best.get("reeval"):
            r = best["reeval"]
            seeds, tokens = ", ".join(str(s) for s in r["seeds"][1:]), ", ".join(_fmt(t) for t in r["tokens_to_gate"])
            lines.append(f"  chosen by: {best['chosen_by']}: mean score {_fmt(r['mean_score'])}, gate held in "
                         f"{r['gate_passes']}/{r['runs']} runs; tokens_to_gate per run (own, then seeds {seeds}): "
                         f"{tokens}")
        from kcpt.tune.space import format_range_edges

        edges = format_range_edges(best.get("at_range_edge") or [])
        if edges:
            lines.append(f"  note: {edges}")
        lines.append(f"  checkpoint: {best.get('checkpoint_path')}")
        lines.append(f"  config: {exp / 'best_config.yaml'}")
    else:
        lines.append("best feasible trial: none (no COMPLETE trial with raw_gate ≤ 0)")
    return "\n".join(lines)
