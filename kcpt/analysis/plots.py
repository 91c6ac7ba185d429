"""Matplotlib figures of a tuning experiment (inputs from :mod:`kcpt.analysis.trials`) and of a run's forgetting /
drift table (:mod:`kcpt.eval.forgetting`). Each function draws on the given axes (or a new figure) and returns the
figure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from kcpt.analysis.trials import pareto_trials


def _axes(ax: Any, n: int = 1, figsize: tuple[float, float] = (6, 4)) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure if n == 1 else ax[0].figure, ax
    fig, axes = plt.subplots(1, n, figsize=(figsize[0] * n, figsize[1]))
    return fig, axes


def plot_curves(curves: pd.DataFrame, manifest: Mapping[str, Any], ax: Any = None) -> Any:
    """Per-trial raw val loss (left, with the baseline…baseline·(1+eps) band) and exam val loss (right, with
    the exam target) against the step."""
    fig, (ax_raw, ax_exam) = _axes(ax, 2)
    for num, g in curves.groupby("trial_number"):
        ax_raw.plot(g["step"], g["raw_val_loss"], marker=".", label=f"#{num}")
        ax_exam.plot(g["step"], g["exam_val_loss"], marker=".", label=f"#{num}")
    base, eps = manifest.get("baseline_raw_best"), manifest.get("eps")
    if base is not None and eps is not None:
        ax_raw.axhspan(base, base * (1 + eps), color="tab:green", alpha=0.15, label=f"baseline…+{eps:.0%}")
        ax_raw.axhline(base * (1 + eps), color="tab:green", ls="--", lw=1)
    if manifest.get("exam_target") is not None:
        ax_exam.axhline(manifest["exam_target"], color="tab:red", ls="--", lw=1, label="exam target")
    ax_raw.set(xlabel="step", ylabel="raw val loss", title="raw Korean (replay) val loss")
    ax_exam.set(xlabel="step", ylabel="exam val loss (answer-only)", title="exam val loss")
    for a in (ax_raw, ax_exam):
        a.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_objective_vs_constraint(trials: pd.DataFrame, ax: Any = None) -> Any:
    """Objective against the constraint, coloured by feasibility (green: feasible, red: infeasible, grey: stopped
    early by ASHA or failed — never feasible). Trials without both values (failed before an eval) are left out."""
    fig, ax = _axes(ax)
    complete = trials["status"] == "COMPLETE"
    feasible = trials["feasible"].fillna(False).astype(bool)
    groups = ((complete & feasible, "tab:green", "feasible"),
              (complete & ~feasible, "tab:red", "infeasible"),
              (~complete, "tab:grey", "pruned / failed"))
    for mask, colour, label in groups:
        g = trials[mask].astype({"constraint": float, "objective": float}).dropna(subset=["constraint", "objective"])
        if g.empty:
            continue
        ax.scatter(g["constraint"], g["objective"], c=colour, label=label)
        for _, r in g.iterrows():
            ax.annotate(f"#{r['trial_number']}", (r["constraint"], r["objective"]), fontsize="small")
    ax.axvline(0.0, color="grey", ls="--", lw=1)
    ax.set(xlabel="constraint: raw/baseline − (1+eps)  (≤ 0 feasible)", ylabel="objective (tune.objective; lower "
           "is better)",
           title="objective vs constraint")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_pareto(trials: pd.DataFrame, ax: Any = None) -> Any:
    """Trials at their selected eval in (raw val loss, exam val loss); the Pareto front joined by a line."""
    fig, ax = _axes(ax)
    ax.scatter(trials["selected_raw_val_loss"], trials["selected_exam_val_loss"], c="tab:blue", alpha=0.6,
               label="trials")
    front = pareto_trials(trials).sort_values("selected_raw_val_loss")
    ax.plot(front["selected_raw_val_loss"], front["selected_exam_val_loss"], "o-", c="tab:orange",
            label="Pareto front")
    ax.set(xlabel="raw val loss", ylabel="exam val loss", title="Pareto front (both minimised)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_importances(importances: Mapping[str, float] | None, ax: Any = None) -> Any:
    """Horizontal bars of Optuna parameter importances (a note instead when there are none)."""
    fig, ax = _axes(ax)
    if not importances:
        ax.text(0.5, 0.5, "importances need ≥ 2 COMPLETE trials", ha="center", va="center")
        ax.set_axis_off()
    else:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (Optuna default evaluator)", title="parameter importances")
    fig.tight_layout()
    return fig


def plot_forgetting(table: pd.DataFrame, kind: str = "all", ax: Any = None) -> Any:
    """The forgetting / drift table (:func:`kcpt.eval.forgetting.forgetting_report`) per stage: raw loss minus the
    base model's (left; below 0: better than the base) and KL(p_base ‖ p_ckpt) (right), one line per bucket of
    ``kind`` (``all``, ``source``, ``length`` or a field bucket), stages in run order (the base model first)."""
    fig, (ax_delta, ax_kl) = _axes(ax, 2)
    rows = table[table["kind"] == kind]
    if rows.empty:
        raise ValueError(f"no bucket kind '{kind}' in the table (kinds: {sorted(table['kind'].unique())})")
    point = [str(s) if pd.isna(st) else f"{s}@{int(st)}" for s, st in zip(rows["stage"], rows["step"], strict=True)]
    labels = list(dict.fromkeys(point))
    x_of = pd.Series([labels.index(p) for p in point], index=rows.index)
    for bucket, g in rows.groupby("bucket", sort=False):
        x = x_of[g.index]
        ax_delta.plot(x, g["delta_base"], marker="o", label=str(bucket))
        ax_kl.plot(x, g["kl_base"], marker="o", label=str(bucket))
    ax_delta.axhline(0.0, color="grey", ls="--", lw=1)
    ax_delta.set(ylabel="raw loss − base loss (nats)", title=f"forgetting vs base ({kind})")
    ax_kl.set(ylabel="KL(p_base ‖ p_ckpt) per token (nats)", title=f"drift from base ({kind})")
    for a in (ax_delta, ax_kl):
        a.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        a.legend(fontsize="small")
    fig.tight_layout()
    return fig
