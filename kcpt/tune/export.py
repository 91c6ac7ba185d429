"""Results of a tune experiment as plain files: ``trials.parquet``, ``best_config.yaml``, ``best_trial.json``.

Everything is read back from the Optuna study (the searcher stores the gate summary as user attributes) and
the experiment manifest, so export works after a crash or from another machine that can reach the storage.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from kcpt.config import dump_config, load_config
from kcpt.errors import InputError
from kcpt.tune import reeval
from kcpt.tune.experiment import OWNER_ATTR
from kcpt.tune.searcher import CONSTRAINT_NAME
from kcpt.tune.space import apply_params, mixture_weights, range_edges

#: Columns of trials.parquet besides one ``param_<name>`` column per sampled parameter.
TRIAL_COLUMNS = ("trial_number", "ray_trial_id", "status", "objective", "constraint", "feasible", "gate_passed",
                 "steps_to_gate", "tokens_to_gate", "refined_tokens_to_gate", "plan_tokens_to_gate", "selected_step",
                 "selected_raw_val_loss", "selected_exam_val_loss", "selected_exam_acc", "selected_exam_em",
                 "selected_exam_f1", "selected_raw_ratio", "num_evals", "stopped_early", "checkpoint_path",
                 "run_dir", "trial_dir", "experiment", "reeval_runs", "reeval_mean_score", "reeval_gate_passes")


@dataclass
class ExportPaths:
    trials: Path
    best_config: Path | None
    best: dict[str, Any] | None
    table: pd.DataFrame


def read_manifest(experiment_dir: str | Path) -> dict[str, Any]:
    path = Path(experiment_dir) / "experiment.json"
    if not path.exists():
        raise InputError(f"{path}: not a kcpt tune experiment (no experiment.json)", path=str(path))
    return json.loads(path.read_text(encoding="utf-8"))


def load_study(experiment_dir: str | Path, storage: str | None = None) -> optuna.Study:
    m = read_manifest(experiment_dir)
    from kcpt.tune.study_storage import open_storage

    return optuna.load_study(study_name=m["study_name"], storage=open_storage(storage or m["storage"]))


def _num(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per Optuna trial (see :data:`TRIAL_COLUMNS`); ``feasible`` is True only for COMPLETE trials
    whose constraint is ≤ 0. ``reeval_*``: over the trial's own run and its re-evaluation runs
    (:mod:`kcpt.tune.reeval`; ``reeval_runs`` = 0 and the others empty for a trial not re-evaluated)."""
    recs = reeval.records(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        c = t.constraints.get(CONSTRAINT_NAME) if t.constraints else None
        def _int(k: str, ua: dict[str, Any] = ua) -> int | None:
            v = _num(ua.get(k))
            return None if v is None or v < 0 else int(v)
        row: dict[str, Any] = {
            "trial_number": t.number, "ray_trial_id": ua.get("ray_trial_id"), "status": t.state.name,
            "objective": t.value if t.state == optuna.trial.TrialState.COMPLETE else _num(ua.get("gate_objective")),
            "constraint": c, "feasible": bool(t.state == optuna.trial.TrialState.COMPLETE and c is not None
                                              and c <= 0),
            "gate_passed": bool(ua.get("gate_passed", False)), "steps_to_gate": _int("steps_to_gate"),
            "tokens_to_gate": _int("tokens_to_gate"), "refined_tokens_to_gate": _num(ua.get("refined_tokens_to_gate")),
            "plan_tokens_to_gate": _int("plan_tokens_to_gate"), "selected_step": _int("selected_step"),
            "selected_raw_val_loss": _num(ua.get("selected_raw_val_loss")),
            "selected_exam_val_loss": _num(ua.get("selected_exam_val_loss")),
            "selected_exam_acc": _num(ua.get("selected_exam_acc")),
            "selected_exam_em": _num(ua.get("selected_exam_em")),
            "selected_exam_f1": _num(ua.get("selected_exam_f1")),
            "selected_raw_ratio": _num(ua.get("selected_raw_ratio")),
            "num_evals": int(ua.get("num_evals") or 0), "stopped_early": bool(ua.get("stopped_early", False)),
            "checkpoint_path": ua.get("checkpoint_path") or None, "run_dir": ua.get("run_dir"),
            "trial_dir": ua.get("trial_dir"), "experiment": ua.get(OWNER_ATTR), "reeval_runs": 0,
            "reeval_mean_score": None,
            "reeval_gate_passes": None,
        }
        if t.number in recs:
            r = reeval.summary(t, recs[t.number])
            row.update(reeval_runs=r["runs"], reeval_mean_score=r["mean_score"], reeval_gate_passes=r["gate_passes"])
        for k, v in t.params.items():
            row[f"param_{k}"] = v
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else list(TRIAL_COLUMNS))
    for k in ("steps_to_gate", "tokens_to_gate", "plan_tokens_to_gate", "selected_step", "reeval_gate_passes"):
        if k in df:
            df[k] = df[k].astype("Int64")
    return df


def _int_attr(t: optuna.trial.FrozenTrial, key: str) -> int | None:
    v = _num(t.user_attrs.get(key))
    return None if v is None or v < 0 else int(v)


def export_results(experiment_dir: str | Path) -> ExportPaths:
    """Write ``trials.parquet``, ``best_trial.json`` and (when a feasible trial exists) ``best_config.yaml``:
    the config of :func:`kcpt.tune.reeval.best_trial` (the best mean over re-evaluated trials' runs, else the
    study's best feasible trial)."""
    exp = Path(experiment_dir)
    m = read_manifest(exp)
    study = load_study(exp)
    df = trials_frame(study)
    trials_path = exp / "trials.parquet"
    df.to_parquet(trials_path, index=False)
    best, reeval_summary = reeval.best_trial(study)
    best_info: dict[str, Any] | None = None
    best_cfg_path: Path | None = exp / "best_config.yaml"
    if best is not None:
        cfg = load_config(exp / "config.yaml")
        params = dict(best.params)
        best_cfg = apply_params(cfg, params, m["stage"])
        dump_config(best_cfg, best_cfg_path)
        best_info = {"trial_number": best.number, "ray_trial_id": best.user_attrs.get("ray_trial_id"),
                     "objective": best.value, "constraint": best.constraints.get(CONSTRAINT_NAME),
                     "params": params, "mixture": mixture_weights(params, cfg.tune.space)
                     if "exam_fraction" in params else None,
                     "checkpoint_path": best.user_attrs.get("checkpoint_path"),
                     "gate_passed": best.user_attrs.get("gate_passed"),
                     "tokens_to_gate": _int_attr(best, "tokens_to_gate"),
                     "plan_tokens_to_gate": _int_attr(best, "plan_tokens_to_gate"),
                     "selected_exam_val_loss": _num(best.user_attrs.get("selected_exam_val_loss")),
                     "selected_exam_acc": _num(best.user_attrs.get("selected_exam_acc")),
                     "chosen_by": "study.best_trial (one run per trial)" if reeval_summary is None else
                     f"lowest mean score over {reeval_summary['runs']} runs (tune.reeval)",
                     "reeval": reeval_summary,
                     "at_range_edge": range_edges(params, cfg.tune.space)}
    else:
        if best_cfg_path.exists():
            best_cfg_path.unlink()
        best_cfg_path = None
    (exp / "best_trial.json").write_text(json.dumps(best_info, indent=2, default=str), encoding="utf-8")
    return ExportPaths(trials_path, best_cfg_path, best_info, df)
