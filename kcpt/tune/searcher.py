"""Ray Tune's OptunaSearch with the gate's constraint and honest trial states.

Stock ``OptunaSearch`` tells Optuna only the objective of the last result: a metric-based constraint never
reaches the study, and a trial stopped early by ASHA becomes COMPLETE with an early value. This subclass:

- on completion, calls ``trial.set_constraint("raw_gate", gate_constraint)`` (Optuna 5; Optuna's TPE reads
  ``trial.constraints`` itself, so the sampler is constrained with no ``constraints_func``) before ``tell``;
- tells COMPLETE with ``gate_objective`` only when the trial ran its stage to the end (the trainable's last
  report carries ``trial_final=True``, or the last eval already ended the stage: ``stage_done=True`` — ASHA
  may stop a trial on the very eval at which its gate passed); a trial stopped by the scheduler earlier is told
  PRUNED (its intermediate ``gate_score`` values stay for the sampler), an errored one FAIL;
- stores the gate summary (``gate_passed``, ``steps_to_gate``, …, ``checkpoint_path``, ``run_dir``,
  ``ray_trial_id``, and ``experiment``: the experiment that asked for it, ``owner``) as Optuna user attributes, so
  the study alone holds the trial table, and a study shared by several experiments tells each its own trials.
- enqueues ``enqueue`` (the recipe's settings, :func:`kcpt.tune.space.recipe_points`) as the first trials of a
  study that has none yet (``study.enqueue_trial``): a resumed or shared study is not enqueued twice;
- after a resume (``Tuner.restore`` from a save older than the study), a re-run trial that the study already
  holds as finished is neither reported nor told again: its first outcome stays, no error.

The best trial is ``study.best_trial`` (feasible trials only), never Tune's ``get_best_result``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from kcpt.tune.experiment import OWNER_ATTR
from kcpt.tune.objective import GATE_KEYS

logger = logging.getLogger(__name__)

CONSTRAINT_NAME = "raw_gate"
FINAL_KEY = "trial_final"
DONE_KEY = "stage_done"
_USER_ATTR_KEYS = (*GATE_KEYS, "checkpoint_path", "run_dir", "trial_dir", "stop_reason")


def ends_trial(result: dict | None) -> bool:
    """Whether ``result`` carries the trial's outcome: its trainable's last report (``trial_final``) or the eval
    that ended its stage (``stage_done``). A trial stopped after such a report is COMPLETE, earlier it is PRUNED."""
    return bool(result) and bool(result.get(FINAL_KEY) or result.get(DONE_KEY))


def static_space(kind: str) -> bool:
    """Whether the sampler ``kind`` needs the space sampled static (:func:`kcpt.tune.space.suggest_params`): the GP
    models only parameters every trial has."""
    return kind == "gp"


def make_sampler(kind: str, *, seed: int, n_startup_trials: int) -> optuna.samplers.BaseSampler:
    """``"tpe"``: TPE, ``"gp"``: Optuna's Gaussian-process sampler (both constrained through ``set_constraint``;
    sample the space with ``static=True`` for the GP, see :func:`kcpt.tune.space.suggest_params`), ``"random"``:
    uniform random search."""
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler '{kind}' (tpe | gp | random)")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):
        v = v.item()
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


class ConstrainedOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that passes the gate constraint to Optuna and marks early-stopped trials PRUNED.

    ``metric`` (what Tune's scheduler and the intermediate reports use) is normally ``gate_score``;
    ``objective_key`` / ``constraint_key`` name the result entries told to Optuna at completion. ``after_ask``
    (picklable: Tune saves the searcher) runs after each new Optuna trial, before Tune can save a state that
    names it: a URI experiment publishes its study snapshot there, so the bucket's study is never older than
    Tune's state (a resume would otherwise meet a trial the study does not hold).
    """

    def __init__(self, *args: Any, objective_key: str = "gate_objective", constraint_key: str = "gate_constraint",
                 enqueue: list[dict[str, Any]] | None = None, after_ask: Callable[[], None] | None = None,
                 owner: str | None = None, **kwargs: Any):
        self._enqueue = list(enqueue or [])
        self._after_ask = after_ask
        self._owner = owner
        super().__init__(*args, **kwargs)
        self._objective_key = objective_key
        self._constraint_key = constraint_key
        self._final_results: dict[str, dict[str, Any]] = {}
        self._last_results: dict[str, dict[str, Any]] = {}

    def _setup_study(self, mode: Any) -> None:
        super()._setup_study(mode)
        if self._enqueue and not self._ot_study.get_trials(deepcopy=False):
            for point in self._enqueue:
                self._ot_study.enqueue_trial(point, user_attrs={"enqueued": "recipe"})
            logger.info("enqueued %d recipe trial(s) first", len(self._enqueue))

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    def suggest(self, trial_id: str) -> dict | None:
        cfg = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and "ray_trial_id" not in ot_trial.user_attrs:
            ot_trial.set_user_attr("ray_trial_id", trial_id)
            if getattr(self, "_owner", None) is not None:
                ot_trial.set_user_attr(OWNER_ATTR, self._owner)
        if ot_trial is not None and getattr(self, "_after_ask", None) is not None:
            self._after_ask()
        return cfg

    def _already_finished(self, trial_id: str) -> bool:
        """True when the study already holds a final state for this trial: a trial re-run after a resume whose
        first run was told before the driver died (Tune's saved state was older). Its first outcome stays."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return False
        try:
            stored = ot_trial.study._storage.get_trial(ot_trial._trial_id)
        except KeyError:  # a study snapshot older than Tune's state (published before this trial was asked)
            logger.warning("trial %s (Optuna #%d) is not in the study's storage; its result is not told",
                           trial_id, ot_trial.number)
            self._completed_trials.add(trial_id)
            return True
        if stored.state.is_finished():
            logger.warning("trial %s (Optuna #%d) is already finished in the study; its re-run is not told",
                           trial_id, ot_trial.number)
            self._completed_trials.add(trial_id)
            return True
        return False

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or self._already_finished(trial_id):
            return
        self._last_results[trial_id] = dict(result)
        if ends_trial(result):
            self._final_results[trial_id] = dict(result)
        value = result.get(self.metric)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return  # no usable eval yet: nothing for Optuna's intermediate values
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or self._already_finished(trial_id):
            return
        ot_trial = self._ot_trials[trial_id]
        final = self._final_results.get(trial_id)
        if ends_trial(result):
            final = dict(result)
        summary = final or (dict(result) if result else None) or self._last_results.get(trial_id) or {}
        for k in _USER_ATTR_KEYS:
            if k in summary:
                ot_trial.set_user_attr(k, _clean(summary[k]))
        constraint = summary.get(self._constraint_key)
        objective = summary.get(self._objective_key)
        has_constraint = isinstance(constraint, (int, float)) and math.isfinite(constraint)
        has_objective = isinstance(objective, (int, float)) and math.isfinite(objective)
        if has_constraint:
            ot_trial.set_constraint(CONSTRAINT_NAME, float(constraint))
        if error:
            state, value = TrialState.FAIL, None
        elif final is not None and has_objective and has_constraint:
            state, value = TrialState.COMPLETE, float(objective)
        elif final is not None:
            # ran to the end without a single usable eval: nothing to learn from but the failure
            state, value = TrialState.FAIL, None
        else:
            state, value = TrialState.PRUNED, None  # stopped early by the scheduler
            # the result that made the scheduler stop the trial reaches on_trial_complete, not on_trial_result
            score, step = summary.get(self.metric), summary.get("training_iteration")
            if isinstance(score, (int, float)) and math.isfinite(score) and step is not None:
                ot_trial.report(float(score), int(step))  # Optuna ignores a step already reported
        ot_trial.set_user_attr("stopped_early", final is None and not error)
        try:
            self._ot_study.tell(ot_trial, value, state=state)
        except Exception as exc:  # noqa: BLE001 - Optuna refuses e.g. NaN values; keep tuning
            logger.warning("optuna tell failed for trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)
