"""Stop rules of a stage, evaluated once per eval: ``plateau`` (CPT), ``exam`` (stages 1/2), ``gate`` (stage 3)
and ``max_steps``. See :class:`kcpt.config.StopConfig` for the rules in words.

:func:`update_stop` mutates a :class:`StopState` (JSON-serialisable: ``to_dict``/``from_dict``, checkpointed
with the trainer state) and returns a :class:`StopDecision`. Raw is a loss in nats (lower is better). The exam
value is in the units of ``stop.exam_metric``: ``loss`` (the answer-only exam val loss, lower is better; the
target is met when exam ≤ target) or ``accuracy`` (exam accuracy, a fraction, higher is better; met when
exam ≥ target). Every comparison of exam values below — improvement, plateau, best — follows that direction.

Two notions of "better" are kept apart:

- *significant improvement* (:func:`improved`: by at least ``max(min_delta, min_delta_relative·|ref|)`` over the
  value at the last significant improvement, ``raw_ref`` / ``exam_ref``, in the metric's direction) resets the
  patience counters;
- the *best eval* of the stage (``best_metric`` / ``best_step``, ``StopDecision.new_best``) is the plain argmin
  (argmax for exam accuracy) of the rule's ranking metric among eligible evals — the checkpoint to keep as the
  stage's best: ``plateau``/``max_steps``: raw loss, every eval eligible; ``exam``: the exam metric among evals
  whose raw loss is within tolerance (all evals only with ``stop.raw_bound: false``); ``gate``: the exam metric
  among gate-ok evals.
  ``best_step`` stays ``None`` until an eligible eval happens.

A plateau is only a pass if the stage gained something on its start (the step-0 eval of the weights it started
from, :func:`record_start`; without one nothing is compared): ``plateau`` (and its ``max_steps`` end) needs a raw
val loss below the start's, ``exam_plateau`` an exam value better than the start's. Otherwise the stage stops
(or ends) as *not passed*, its reason suffixed ``": no gain on the start"`` — a CPT run whose LR is too high
"plateaus" at a raw loss above where it began, and must not be reported as done (nor set the baseline above
what the starting model already had, see :func:`baseline_of`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kcpt.config import StopConfig
from kcpt.errors import ConfigError


@dataclass
class StopState:
    best_raw: float | None = None
    """Lowest raw val loss seen in the stage (becomes ``baseline_raw_best`` when the stage ``sets_baseline``)."""
    best_raw_step: int | None = None
    best_exam: float | None = None
    """Best exam value of the stage in ``stop.exam_metric`` units (lowest loss / highest accuracy)."""
    best_exam_step: int | None = None
    evals_since_raw_improve: int = 0
    evals_since_exam_improve: int = 0
    gate_streak: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    raw_ref: float | None = None
    """Raw loss at the last significant improvement (reference for patience)."""
    exam_ref: float | None = None
    best_metric: float | None = None
    """Ranking metric of the stage's best eligible eval (see module docstring)."""
    best_step: int | None = None
    start_raw: float | None = None
    """Raw val loss of the weights the stage started from (its step-0 eval; ``None`` without one)."""
    start_exam: float | None = None
    """Exam value of those weights, in ``stop.exam_metric`` units (``None`` without one or without an exam)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StopState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class StopDecision:
    stop: bool
    passed: bool
    """Meaningful when ``stop``: the stage met its rule (the plan goes on) or not."""
    reason: str
    """Why it stops (``plateau``, ``exam_target``, ``exam_plateau``, ``gate``, ``max_steps``,
    ``max_steps: ...``) or, when it goes on, what blocks it (``raw_over_tolerance``) or ``""``."""
    gate_ok: bool
    """``gate``: raw and exam bounds both met at this eval; ``exam``: exam done and raw ok; else False."""
    gate_streak: int
    raw_improved: bool
    """Significant raw improvement (patience reset)."""
    exam_improved: bool
    raw_ok: bool | None
    """raw ≤ baseline·(1 + raw_tolerance); ``None`` when the rule has no raw bound (``plateau``/``max_steps``
    without a baseline, or ``exam`` with ``raw_bound: false``)."""
    new_best: bool = False
    """This eval is the stage's new best (save it as the best checkpoint)."""
    raw_bound: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def improved(new: float, best: float | None, stop: StopConfig, *, higher: bool = False) -> bool:
    """``new`` improves on ``best`` by at least ``max(min_delta, min_delta_relative·|best|)`` (and by > 0):
    lower is better, or higher with ``higher`` (exam accuracy).

    A non-finite ``new`` never improves; anything finite improves on ``None``.
    """
    if not _finite(new):
        return False
    if best is None or not math.isfinite(best):
        return True
    gain = new - best if higher else best - new
    need = max(stop.min_delta, stop.min_delta_relative * abs(best))
    return gain > 0 and (gain >= need or math.isclose(gain, need, rel_tol=1e-9))


def raw_bound(baseline_raw_best: float, stop: StopConfig) -> float:
    """Largest raw val loss allowed by the dual constraint: ``baseline · (1 + raw_tolerance)``."""
    return baseline_raw_best * (1.0 + stop.raw_tolerance)


def _le(x: float, bound: float) -> bool:
    """x ≤ bound, forgiving float rounding of the bound itself (2.00·1.03 vs 2.06)."""
    return x <= bound or math.isclose(x, bound, rel_tol=1e-12, abs_tol=0.0)


def exam_higher_is_better(stop: StopConfig) -> bool:
    """The exam metric of ``stop`` is accuracy (higher is better), not a loss."""
    return stop.exam_metric == "accuracy"


def exam_target_met(exam: float | None, stop: StopConfig) -> bool:
    """``exam`` meets ``stop.exam_target``: loss ≤ target, or accuracy ≥ target (False without a target)."""
    if exam is None or stop.exam_target is None or not _finite(exam):
        return False
    return _le(stop.exam_target, exam) if exam_higher_is_better(stop) else _le(exam, stop.exam_target)


def _better(new: float, best: float | None, higher: bool) -> bool:
    return best is None or (new > best if higher else new < best)


NO_GAIN = ": no gain on the start"


def record_start(state: StopState, *, raw: float, exam: float | None) -> None:
    """Record the step-0 eval (the stage's starting weights): the reference a plateau must beat to pass. It is not
    an eval of the stage's rule (no patience, best or gate counting)."""
    state.start_raw = raw if _finite(raw) else None
    state.start_exam = exam if _finite(exam) else None


def gained_on_start(state: StopState, stop: StopConfig, metric: str) -> bool:
    """The stage's best ``metric`` (``raw`` or ``exam``) beats its start: False when no eval gave a finite value
    (nothing was gained, whatever the start), True when only the start is unknown (no step-0 eval)."""
    start, best = (state.start_raw, state.best_raw) if metric == "raw" else (state.start_exam, state.best_exam)
    if best is None:
        return False
    return start is None or _better(best, start, metric == "exam" and exam_higher_is_better(stop))


def baseline_of(state: StopState) -> float | None:
    """The raw val loss a ``sets_baseline`` stage hands on as ``baseline_raw_best``: the lowest it reached, or its
    start when that is lower (a CPT run that made the model worse on held-out text does not lower the bar for
    what the later stages must keep)."""
    vals = [v for v in (state.best_raw, state.start_raw) if v is not None]
    return min(vals) if vals else None


def update_stop(state: StopState, stop: StopConfig, *, step: int, raw: float, exam: float | None,
                baseline_raw_best: float | None, final: bool = False,
                record: dict[str, Any] | None = None) -> StopDecision:
    """Record one eval (at optimizer step ``step``) and decide whether the stage stops.

    ``exam``: in ``stop.exam_metric`` units (see the module docstring). ``record``: more keys for this eval's
    ``history`` entry (the loop adds the exam loss and accuracy there, whichever the rule uses).

    ``final``: this is the last eval of the stage (``max_steps`` reached); the decision then always stops.
    ``exam`` is required for the ``exam`` and ``gate`` rules; ``baseline_raw_best`` for ``gate`` and for ``exam``
    unless ``stop.raw_bound`` is false (the launcher refuses such a stage before any step; this is the backstop).
    """
    if stop.rule in ("exam", "gate") and exam is None:
        raise ValueError(f"stop rule '{stop.rule}' needs an exam "
                         f"{'val loss' if stop.exam_metric == 'loss' else 'accuracy'} at every eval"
                         + (" (eval.exam_accuracy on, and multiple-choice items in the stage's eval_exam set)"
                            if stop.exam_metric == "accuracy" else ""))
    if stop.needs_baseline and baseline_raw_best is None:
        raise ConfigError(f"stop rule '{stop.rule}' needs baseline_raw_best (run a stage with sets_baseline first, "
                          "give the baseline explicitly" + (", or set stop.raw_bound: false)" if stop.rule == "exam"
                                                            else ")"))

    raw_improved = improved(raw, state.raw_ref, stop)
    if raw_improved:
        state.raw_ref, state.evals_since_raw_improve = raw, 0
    else:
        state.evals_since_raw_improve += 1
    if _finite(raw) and (state.best_raw is None or raw < state.best_raw):
        state.best_raw, state.best_raw_step = raw, step

    higher = exam_higher_is_better(stop)
    exam_improved = False
    if exam is not None:
        exam_improved = improved(exam, state.exam_ref, stop, higher=higher)
        if exam_improved:
            state.exam_ref, state.evals_since_exam_improve = exam, 0
        else:
            state.evals_since_exam_improve += 1
        if _finite(exam) and _better(exam, state.best_exam, higher):
            state.best_exam, state.best_exam_step = exam, step

    use_bound = baseline_raw_best is not None and stop.raw_bound
    bound = raw_bound(baseline_raw_best, stop) if use_bound else None
    raw_ok = None if bound is None else (_finite(raw) and _le(raw, bound))
    exam_hit = exam_target_met(exam, stop)

    stop_now, passed, reason, gate_ok = False, False, "", False
    eligible, metric, metric_higher = True, raw, False
    if stop.rule == "plateau":
        if state.evals_since_raw_improve >= stop.patience:
            stop_now, passed, reason = True, True, "plateau"
        elif final:
            stop_now, passed, reason = True, True, "max_steps"
        if passed and not gained_on_start(state, stop, "raw"):
            passed, reason = False, reason + NO_GAIN
    elif stop.rule == "max_steps":
        if final:
            stop_now, passed, reason = True, True, "max_steps"
    elif stop.rule == "exam":
        metric, eligible, metric_higher = exam, raw_ok is not False, higher
        if exam_hit:
            exam_reason = "exam_target"
        elif state.evals_since_exam_improve >= stop.patience:
            exam_reason = "exam_plateau"
        else:
            exam_reason = ""
        gate_ok = bool(exam_reason) and raw_ok is not False
        if exam_reason == "exam_plateau" and not gained_on_start(state, stop, "exam"):
            gate_ok, stop_now, reason = False, True, exam_reason + NO_GAIN  # plateaued where it began: not done
        elif gate_ok:
            stop_now, passed, reason = True, True, exam_reason
        elif exam_reason:
            reason = "raw_over_tolerance"
            if final:
                stop_now, reason = True, "max_steps: raw over tolerance"
        elif final:
            stop_now = True
            reason = "max_steps: exam not done" + (", raw over tolerance" if raw_ok is False else "")
        state.gate_streak = state.gate_streak + 1 if gate_ok else 0  # 1 at most: the stage stops there
    elif stop.rule == "gate":
        metric, metric_higher = exam, higher
        gate_ok = bool(raw_ok) and exam_hit
        eligible = gate_ok
        state.gate_streak = state.gate_streak + 1 if gate_ok else 0
        if state.gate_streak >= stop.consecutive:
            stop_now, passed, reason = True, True, "gate"
        elif final:
            stop_now, reason = True, (f"max_steps: gate held {state.gate_streak} consecutive evals, "
                                      f"needs {stop.consecutive}")
    else:  # pragma: no cover - StopConfig validates the rule
        raise ConfigError(f"unknown stop rule '{stop.rule}'")

    new_best = False
    if eligible and _finite(metric) and _better(metric, state.best_metric, metric_higher):
        state.best_metric, state.best_step, new_best = metric, step, True

    decision = StopDecision(stop=stop_now, passed=passed, reason=reason, gate_ok=gate_ok,
                            gate_streak=state.gate_streak, raw_improved=raw_improved, exam_improved=exam_improved,
                            raw_ok=raw_ok, new_best=new_best, raw_bound=bound)
    state.history.append({"step": step, "raw": raw, "exam": exam, **(record or {}),
                          **{k: v for k, v in decision.to_dict().items() if k != "raw_bound"}})
    return decision
