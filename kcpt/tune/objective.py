"""The dual-constraint gate as a tuning objective.

For one trial (the evals of one stage-3 run, in order), with ``eps`` = ``stop.raw_tolerance``:

- feasible evals: ``raw_ratio ≤ 1 + eps`` where ``raw_ratio = raw_val_loss / baseline_raw_best``;
- the exam value follows the gate's metric (``stop.exam_metric``): the exam val loss, or with ``accuracy`` the
  exam error rate ``1 − exam_acc`` (so "lower is better" holds for both, and the target test
  ``exam_acc ≥ target`` is ``1 − exam_acc ≤ 1 − target``);
- selected eval: the feasible eval with the lowest exam value; when none is feasible, the eval with the
  lowest raw ratio (and the trial is infeasible);
- ``gate_passed``: the stage gate (raw ≤ baseline·(1+eps) AND exam ≤ target) held for ``consecutive`` evals
  in a row; ``steps_to_gate`` / ``tokens_to_gate`` (the eval's ``tokens_seen``: training tokens of the stage) at
  the eval where it first did; ``plan_tokens_to_gate`` adds ``tokens_before`` (the stages before it);
- ``objective`` (minimised), by ``GateSpec.objective``:

  - ``"exam"``: the exam val loss at the selected eval;
  - ``"tokens_to_gate"``: lexicographic in one number — gate passed before not passed, then fewer tokens to the
    pass, then lower exam loss. With ``u(x) = x / (1 + x)`` (monotone, in [0, 1)) and ``T0 = token_scale``
    (the base stage's token budget): passed → ``(1 − δ)·t/(t + T0) + δ·u(exam)`` ∈ [0, 1) with ``t`` =
    ``refined_tokens_to_gate`` and δ = :data:`TIE_WEIGHT`; not passed → ``1 + u(w)`` ∈ [1, 2), with ``w`` the worst exam
    value of the best window of ``consecutive`` raw-feasible evals in a row (what the gate tests; the exam value
    of the selected eval until such a window exists), so a run that came close to holding the gate ranks above
    one with a single lucky eval. So a passing trial
    always beats a non-passing one, fewer tokens win, and exam decides only between near-equal token counts
    (δ is far below one eval's share of the budget); a never-passing study degrades to the exam objective.
    Feasibility comes first through the constraint (Optuna ranks feasible trials before infeasible ones; TPE
    reads it), so no penalty enters the value told to Optuna.

- ``refined_tokens_to_gate``: tokens_to_gate counts whole evals, so trials whose gate holds at the same eval tie
  however early their exam crossed the target, and a seed that moves the crossing across an eval moves the
  count by a whole eval. Refined: tokens_to_gate − ``lead``, where ``lead`` is how long before the streak's
  first eval both margins, ``raw_ratio/(1 + eps) − 1`` and ``exam/target − 1`` (≤ 0: that half holds), were ≤ 0,
  each interpolated linearly from the eval before (the step-0 eval included; no eval before: 0).
  ``lead`` < one eval interval, so passes an eval apart keep their order (= one interval only for a streak from
  the first eval when the stage's start eval already met both halves: the same for every trial from that start);
- ``constraint`` = raw_ratio − (1 + eps) at the selected eval (≤ 0 feasible);
- ``score`` = objective + penalty · max(0, constraint): one number ASHA can rank trials by (running: at every
  eval it is the objective of the evals so far, so ASHA compares trials at equal tokens).

Evals at step 0 (the stage's starting point) are never selected: they measure the stage-2 checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

#: Keys of the running gate metrics added to every reported eval (see :meth:`GateTracker.update`).
GATE_KEYS = ("gate_score", "gate_objective", "gate_constraint", "gate_feasible", "gate_passed", "steps_to_gate",
             "tokens_to_gate", "refined_tokens_to_gate", "plan_tokens_to_gate", "selected_step",
             "selected_raw_val_loss", "selected_exam_val_loss", "selected_exam_acc", "selected_exam_em",
             "selected_exam_f1", "selected_raw_ratio", "num_evals")

TIE_WEIGHT = 0.01
"""δ of the ``tokens_to_gate`` objective: the exam loss's weight next to the token term."""


def _unit(x: float) -> float:
    x = max(x, 0.0)
    return x / (1.0 + x)


def lexicographic_value(passed: bool, tokens_to_gate: float | None, exam: float, token_scale: float) -> float:
    """The ``tokens_to_gate`` objective (see the module docstring): < 1 when passed, in [1, 2) otherwise."""
    if passed and tokens_to_gate is not None:
        t = float(tokens_to_gate)
        return (1.0 - TIE_WEIGHT) * t / (t + token_scale) + TIE_WEIGHT * _unit(exam)
    return 1.0 + _unit(exam)


@dataclass(frozen=True)
class GateSpec:
    """What the gate compares: the baseline raw loss, the tolerance, the exam target, the streak length."""

    baseline_raw_best: float | None
    eps: float
    exam_target: float | None
    consecutive: int = 1
    penalty: float = 100.0
    objective: Literal["exam", "tokens_to_gate"] = "exam"
    token_scale: float = 1.0e6
    """``T0`` of the ``tokens_to_gate`` objective: the base config's token budget of the stage."""
    tokens_before: int = 0
    """Training tokens of the stages before the gated one (``plan_tokens_to_gate`` = this + tokens_to_gate)."""
    exam_metric: Literal["loss", "accuracy"] = "loss"
    """The gate's exam metric (``stop.exam_metric``): the exam value is the loss, or ``1 − exam_acc``."""

    def exam_value(self, m: Mapping[str, Any]) -> float | None:
        """The exam value of one eval (lower is better): ``exam_val_loss``, or ``1 − exam_acc``."""
        if self.exam_metric == "accuracy":
            acc = _num(m.get("exam_acc"))
            return None if acc is None else 1.0 - acc
        return _num(m.get("exam_val_loss"))

    def exam_target_value(self) -> float | None:
        """``exam_target`` on the :meth:`exam_value` scale."""
        if self.exam_target is None:
            return None
        return 1.0 - self.exam_target if self.exam_metric == "accuracy" else self.exam_target

    @classmethod
    def from_stage(cls, stage: Any, baseline_raw_best: float | None, penalty: float = 100.0, *,
                   objective: Literal["exam", "tokens_to_gate"] = "exam", token_scale: float = 1.0e6,
                   tokens_before: int = 0) -> GateSpec:
        """From a :class:`~kcpt.config.StageConfig` (its ``stop`` section)."""
        return cls(baseline_raw_best, stage.stop.raw_tolerance, stage.stop.exam_target, stage.stop.consecutive,
                   penalty, objective, token_scale, tokens_before, stage.stop.exam_metric)


@dataclass
class GateOutcome:
    """The trial-level result of the gate objective (all ``None`` while no usable eval exists)."""

    gate_score: float | None = None
    gate_objective: float | None = None
    gate_constraint: float | None = None
    gate_feasible: bool = False
    gate_passed: bool = False
    steps_to_gate: int | None = None
    tokens_to_gate: int | None = None
    refined_tokens_to_gate: float | None = None
    plan_tokens_to_gate: int | None = None
    selected_step: int | None = None
    selected_raw_val_loss: float | None = None
    selected_exam_val_loss: float | None = None
    selected_exam_acc: float | None = None
    selected_exam_em: float | None = None
    selected_exam_f1: float | None = None
    selected_raw_ratio: float | None = None
    num_evals: int = 0

    def as_metrics(self) -> dict[str, Any]:
        """Flat dict with the :data:`GATE_KEYS` (``None`` becomes NaN for numeric keys, so loggers accept it)."""
        d = asdict(self)
        for k in ("gate_score", "gate_objective", "gate_constraint", "refined_tokens_to_gate", "selected_raw_val_loss",
                  "selected_exam_val_loss", "selected_exam_acc", "selected_exam_em", "selected_exam_f1",
                  "selected_raw_ratio"):
            if d[k] is None:
                d[k] = math.nan
        for k in ("steps_to_gate", "tokens_to_gate", "plan_tokens_to_gate", "selected_step"):
            if d[k] is None:
                d[k] = -1
        return d


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class GateTracker:
    """Running gate objective over the evals of one trial; feed evals in order with :meth:`update`."""

    def __init__(self, spec: GateSpec):
        self.spec = spec
        self.outcome = GateOutcome()
        self._best_feasible: tuple[float, Mapping[str, Any], float] | None = None
        self._best_ratio: tuple[float, Mapping[str, Any], float] | None = None
        self._streak = 0
        self._recent: list[tuple[bool, float]] = []  # (raw within bound, exam value) of the last N evals
        self._best_window: float | None = None
        self._prev: tuple[float, tuple[float, ...]] | None = None  # (tokens_seen, margins) of the previous eval
        self._lead = 0.0  # tokens before the current streak's first eval at which the margin crossed 0

    def margins(self, ratio: float, exam: float) -> tuple[float, ...]:
        """How far one eval is from each half of the gate (all ≤ 0: it holds there): the relative excess of the raw
        ratio over ``1 + eps`` and, with a target, of the exam value over it."""
        s = self.spec
        g = (ratio / (1.0 + s.eps) - 1.0,)
        target = s.exam_target_value()
        if target is None:
            return g
        return (*g, exam / target - 1.0 if target > 0 else exam - target)

    @staticmethod
    def _crossing_lead(prev: tuple[float, tuple[float, ...]] | None, tokens: float | None,
                       g: tuple[float, ...]) -> float:
        """Tokens before this eval (margins ``g``) at which every margin had crossed 0, each interpolated linearly
        from ``prev`` = (tokens, margins) of the eval before; 0 when unknown."""
        if prev is None or tokens is None or max(g) > 0 or tokens <= prev[0]:
            return 0.0
        t0, g0 = prev
        # fraction of the interval at which each half came within its bound (0: it already was); the later counts
        frac = max((a / (a - b) if a > 0 else 0.0) for a, b in zip(g0, g, strict=True))
        return (tokens - t0) * (1.0 - frac)

    def raw_ratio(self, m: Mapping[str, Any]) -> float | None:
        r = _num(m.get("raw_ratio"))
        if r is None and self.spec.baseline_raw_best:
            raw = _num(m.get("raw_val_loss"))
            r = None if raw is None else raw / self.spec.baseline_raw_best
        return r

    def update(self, m: Mapping[str, Any]) -> dict[str, Any]:
        """Add one eval's metrics (stage-loop names); return the running :class:`GateOutcome` as metrics."""
        o, s = self.outcome, self.spec
        step = int(m.get("step", -1))
        ratio, exam = self.raw_ratio(m), s.exam_value(m)
        tok = _num(m.get("tokens_seen"))
        if ratio is None or exam is None:  # a NaN/inf eval: no streak, window or interpolation spans it
            self._prev, self._recent = None, []
            reported = _num(m.get("gate_streak"))
            self._streak = int(reported) if reported is not None else 0
            return o.as_metrics()
        g, prev = self.margins(ratio, exam), self._prev
        self._prev = None if tok is None else (tok, g)
        if step == 0:
            return o.as_metrics()
        o.num_evals += 1
        feasible = ratio <= 1.0 + s.eps
        if feasible and (self._best_feasible is None or exam < self._best_feasible[0]):
            self._best_feasible = (exam, m, ratio)
        if self._best_ratio is None or ratio < self._best_ratio[2]:
            self._best_ratio = (exam, m, ratio)
        # gate streak: the loop's own bookkeeping when reported, else recomputed from the spec
        if "gate_streak" in m and _num(m.get("gate_streak")) is not None:
            self._streak = int(m["gate_streak"])
        else:
            target = s.exam_target_value()
            ok = feasible and (target is None or exam <= target)
            self._streak = self._streak + 1 if ok else 0
        if self._streak == 1:
            self._lead = self._crossing_lead(prev, tok, g)
        self._recent = [*self._recent, (feasible, exam)][-s.consecutive:]
        if len(self._recent) == s.consecutive and all(f for f, _ in self._recent):
            worst = max(e for _, e in self._recent)  # the window's exam value the gate has to beat
            self._best_window = worst if self._best_window is None else min(self._best_window, worst)
        if not o.gate_passed and self._streak >= s.consecutive:
            o.gate_passed = True
            o.steps_to_gate = step
            o.tokens_to_gate = None if tok is None else int(tok)
            o.refined_tokens_to_gate = None if tok is None else tok - self._lead
            o.plan_tokens_to_gate = None if tok is None else s.tokens_before + int(tok)
        exam_sel, msel, ratio_sel = self._best_feasible or self._best_ratio  # type: ignore[misc]
        o.gate_feasible = self._best_feasible is not None
        # not passed yet: rank by how close the best window of `consecutive` raw-feasible evals came to the exam
        # target (its worst exam value), the quantity the gate tests; before any such window, the best single eval
        exam_rank = exam_sel if o.gate_passed or self._best_window is None else self._best_window
        o.gate_objective = (exam_sel if s.objective == "exam" else
                            lexicographic_value(o.gate_passed, o.refined_tokens_to_gate, exam_rank, s.token_scale))
        o.gate_constraint = ratio_sel - (1.0 + s.eps)
        o.gate_score = o.gate_objective + s.penalty * max(0.0, o.gate_constraint)
        o.selected_step = int(msel.get("step", -1))
        o.selected_raw_val_loss = _num(msel.get("raw_val_loss"))
        o.selected_exam_val_loss = _num(msel.get("exam_val_loss"))
        o.selected_exam_acc = _num(msel.get("exam_acc"))
        o.selected_exam_em = _num(msel.get("exam_em"))
        o.selected_exam_f1 = _num(msel.get("exam_f1"))
        o.selected_raw_ratio = ratio_sel
        return o.as_metrics()


class ReplayedGateTracker:
    """A :class:`GateTracker` fed by a run that may evaluate steps again: after a worker group restart the loop
    resumes from its last checkpoint and reports the evals after it once more. An eval at a step not after the last
    one fed drops the tracked evals from that step on (counted twice, they filled windows that never happened)."""

    def __init__(self, spec: GateSpec):
        self.spec = spec
        self._tracker = GateTracker(spec)
        self._fed: list[Mapping[str, Any]] = []

    def update(self, m: Mapping[str, Any]) -> dict[str, Any]:
        step = int(m.get("step", -1))
        if self._fed and step <= int(self._fed[-1].get("step", -1)):
            self._fed = [r for r in self._fed if int(r.get("step", -1)) < step]
            self._tracker = GateTracker(self.spec)
            for r in self._fed:
                self._tracker.update(r)
        self._fed.append(dict(m))
        return self._tracker.update(m)


def gate_outcome(evals: Iterable[Mapping[str, Any]], spec: GateSpec) -> GateOutcome:
    """The :class:`GateOutcome` of a finished list of evals (in step order)."""
    t = GateTracker(spec)
    for m in evals:
        t.update(m)
    return t.outcome
