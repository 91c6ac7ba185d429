"""Re-evaluation of the best trials on more seeds, and the choice of the best trial from it.

A trial is one training run at one seed: its gate objective is a noisy draw (``tokens_to_gate`` is counted in
whole evals, and a seed moves the gate's pass by an eval or two). With ``tune.reeval.top_k`` > 0 the tune job
re-runs the ``top_k`` best feasible trials at ``tune.reeval.seeds`` more training seeds once the search ends
(:func:`kcpt.tune.launch.reevaluate`) and ``best_config.yaml`` is the trial with the lowest mean score over all
its runs.

Storage: one study user attribute per re-evaluation run, ``reeval/<trial number>/<seed>`` →
:class:`ReevalRecord` as a dict (finished trials cannot take new trial attributes; study attributes can, from any
process, and a resumed experiment skips the runs already recorded).

Score of one run: ``gate_score`` = objective + penalty · max(0, constraint) — the objective for a feasible run
(with ``tokens_to_gate``: < 1 when the gate held, ≥ 1 when not), so an infeasible re-run counts against its trial.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kcpt.tune.searcher import CONSTRAINT_NAME

PREFIX = "reeval/"


@dataclass(frozen=True)
class ReevalRecord:
    """One re-evaluation run of a trial's parameters at another training seed."""

    trial_number: int
    seed: int
    score: float
    objective: float | None
    constraint: float | None
    gate_passed: bool
    tokens_to_gate: int | None
    run_dir: str

    @property
    def key(self) -> str:
        return f"{PREFIX}{self.trial_number}/{self.seed}"


def save_record(study: optuna.Study, rec: ReevalRecord) -> None:
    study.set_user_attr(rec.key, asdict(rec))


def records(study: optuna.Study) -> dict[int, list[ReevalRecord]]:
    """Trial number → its re-evaluation runs (by seed)."""
    out: dict[int, list[ReevalRecord]] = {}
    for k, v in study.user_attrs.items():
        if k.startswith(PREFIX) and isinstance(v, dict):
            rec = ReevalRecord(**v)
            out.setdefault(rec.trial_number, []).append(rec)
    return {n: sorted(rs, key=lambda r: r.seed) for n, rs in out.items()}


def own_score(t: FrozenTrial) -> float:
    """The trial's own run as a score: its value (a candidate is COMPLETE and feasible)."""
    return float(t.value) if t.value is not None else math.inf


def candidates(study: optuna.Study, top_k: int) -> list[FrozenTrial]:
    """The ``top_k`` COMPLETE feasible trials with the lowest objective (Optuna's order: value, then number)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)
            and (t.constraints or {}).get(CONSTRAINT_NAME, math.inf) <= 0]
    return sorted(done, key=lambda t: (t.value, t.number))[:top_k]


def summary(t: FrozenTrial, recs: list[ReevalRecord]) -> dict[str, Any]:
    """Mean score and gate passes over the trial's own run and its re-evaluation runs."""
    scores = [own_score(t), *(r.score for r in recs)]
    passed = [bool(t.user_attrs.get("gate_passed")), *(r.gate_passed for r in recs)]
    tokens = [t.user_attrs.get("tokens_to_gate"), *(r.tokens_to_gate for r in recs)]
    tokens = [int(x) if p and isinstance(x, (int, float)) and x >= 0 else None
              for x, p in zip(tokens, passed, strict=True)]
    return {"runs": len(scores), "mean_score": float(sum(scores) / len(scores)), "gate_passes": sum(passed),
            "scores": scores, "tokens_to_gate": tokens, "seeds": [None, *(r.seed for r in recs)]}


def best_trial(study: optuna.Study) -> tuple[FrozenTrial | None, dict[str, Any] | None]:
    """The trial ``best_config.yaml`` is made from, and its re-evaluation summary.

    With re-evaluation records: among the re-evaluated feasible trials, the lowest mean score over all their
    runs (ties: the lower trial number). Without: ``study.best_trial`` (feasible trials only) and ``None``.
    """
    recs = records(study)
    if recs:
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        sums = {n: summary(by_number[n], rs) for n, rs in recs.items()
                if n in by_number and by_number[n].state == TrialState.COMPLETE}
        if sums:
            n = min(sums, key=lambda k: (sums[k]["mean_score"], k))
            return by_number[n], sums[n]
    try:
        return study.best_trial, None
    except ValueError:
        return None, None
