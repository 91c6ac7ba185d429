"""Which checkpoints a stage keeps and hands to the next: its (raw, exam) Pareto front and the ``start_from``
choices.

Inputs are a stage's saved evals ``{step, raw, exam, checkpoint}`` (losses in nats, lower is better; ``exam`` is
``None`` for stages without an exam eval). Choices (``StageConfig.start_from`` of the *next* stage):

- ``best``: the stage's best by its own rule (given by the caller);
- ``best_raw`` / ``best_exam``: the front's two ends (lowest raw; lowest exam, ties to the lower raw);
- ``pareto_knee``: the front point nearest the ideal corner once raw and exam are each min-max scaled over the
  front to [0, 1] (ties to the later step); on a one-point front that point;
- ``last``: the latest saved eval.
Without exam losses the front is the lowest-raw eval and every choice but ``best``/``last`` is that one.
"""

from __future__ import annotations

import math
from typing import Any

from kcpt.analysis.pareto import pareto_front

CHOICES = ("best", "best_raw", "best_exam", "pareto_knee", "last")


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def front_evals(evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evals on the (raw, exam) Pareto front (raw only when no eval has an exam loss), in step order."""
    ok = [e for e in evals if _finite(e["raw"])]
    with_exam = [e for e in ok if _finite(e.get("exam"))]
    if not with_exam:
        return [min(ok, key=lambda e: (e["raw"], e["step"]))] if ok else []
    idx = pareto_front([(e["raw"], e["exam"]) for e in with_exam])
    return sorted((with_exam[i] for i in idx), key=lambda e: e["step"])


def knee(front: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not front:
        return None
    if front[0].get("exam") is None:
        return front[0]
    raws, exams = [e["raw"] for e in front], [e["exam"] for e in front]

    def scaled(x: float, lo: float, hi: float) -> float:
        return 0.0 if hi <= lo else (x - lo) / (hi - lo)

    def dist(e: dict[str, Any]) -> tuple[float, int]:
        r, x = scaled(e["raw"], min(raws), max(raws)), scaled(e["exam"], min(exams), max(exams))
        return (math.hypot(r, x), -e["step"])

    return min(front, key=dist)


def handoff_candidates(evals: list[dict[str, Any]], *, best: str | None) -> tuple[dict[str, str | None],
                                                                                 list[str]]:
    """``({choice: checkpoint}, front checkpoints)`` of a finished stage (see the module docstring)."""
    front = front_evals(evals)
    if not front:
        last = evals[-1]["checkpoint"] if evals else None
        return {c: (best if c == "best" else last) or best for c in CHOICES}, []
    best_raw = min(front, key=lambda e: (e["raw"], e["step"]))
    best_exam = min(front, key=lambda e: (e["exam"] if e.get("exam") is not None else e["raw"], e["raw"]))
    k = knee(front)
    cands = {"best": best or best_raw["checkpoint"], "best_raw": best_raw["checkpoint"],
             "best_exam": best_exam["checkpoint"], "pareto_knee": k["checkpoint"] if k else None,
             "last": evals[-1]["checkpoint"]}
    return cands, [e["checkpoint"] for e in front]


def keep_list(plan: Any) -> list[str]:
    """Checkpoints pruning must keep: every stage's best, Pareto front and hand-off choices, the CPT best and the
    current start."""
    keep = [*plan.best.values(), plan.cpt_best, plan.start_from]
    for front in plan.fronts.values():
        keep += front
    for cands in plan.handoff.values():
        keep += cands.values()
    return [p for p in keep if p]
