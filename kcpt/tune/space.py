"""The stage-3 search space: what Optuna samples and how a sample becomes a stage config.

Parameters (flat names, as stored in the Optuna study):

- ``exam_fraction`` ∈ [low, high]: exam share of the mixture (qa + examples); raw gets ``1 − exam_fraction``.
- ``qa_fraction`` ∈ [low, high]: qa share inside the exam part; examples get ``1 − qa_fraction`` of it.
- ``lr``: peak learning rate (log-uniform when the range says ``log``).
- ``kl_on`` (categorical, only when ``kl_allow_off``) and ``kl_beta`` (log-uniform, sampled only when on);
  β = 0 means "KL off".
- ``mixture_shape`` (categorical, only when ``mixture_shapes`` lists more than one): ``fixed``, ``linear``
  (``exam_fraction`` → ``exam_fraction_end`` linearly over the stage; ``exam_fraction_end`` is sampled only
  then) or ``recipe_step`` (the recipe's 70:30 → 50:50 → 60:40 exam:raw step schedule; no ``exam_fraction``).
- ``micro_batch_size`` (categorical, only when ``micro_batch_sizes`` is not empty): rows per worker per step;
  the stage's step counts are scaled so that tokens per eval and the token budget stay the same
  (:func:`apply_params`).
- every ``extra`` entry, named by its dotted stage-config path (e.g. ``lr.min_ratio``; an integer field such as
  ``lr.warmup_steps`` is sampled with ``suggest_int`` over the integers of its range).

:func:`recipe_points` gives the recipe's own settings as parameter dicts, enqueued as the first trials.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import optuna

from kcpt.config import (
    FloatRange,
    KcptConfig,
    SearchSpace,
    _set_dotted,
    config_from_dict,
    get_dotted,
    integer_bounds,
    integer_stage_field,
)
from kcpt.errors import ConfigError

logger = logging.getLogger(__name__)

FIXED_PARAMS = ("exam_fraction", "exam_fraction_end", "qa_fraction", "lr", "kl_on", "kl_beta", "mixture_shape",
                "micro_batch_size")

RECIPE_EXAM_SCHEDULE = ((0.0, 0.7), (1 / 3, 0.5), (2 / 3, 0.6))
"""The recipe's stage-3 schedule: (start fraction of the stage, exam share of the mixture), held as steps."""


def suggest_params(trial: optuna.Trial, space: SearchSpace, *, static: bool = False) -> dict[str, Any]:
    """Define-by-run sampling of one point of ``space`` (used as the ``space`` of the Optuna searcher).

    Returns the sampled values plus ``kl_beta`` = 0.0 when KL is off (so every trial config has a β).
    ``static``: ``kl_beta`` is suggested in every trial, also when KL is off (then unused), so the KL part of the
    space is the same in every trial — what Optuna's ``GPSampler`` models jointly (a parameter that exists in
    some trials only, it samples at random).
    """
    ranges = float_ranges(space)

    def suggest(name: str) -> float:
        r = ranges[name]
        return trial.suggest_float(name, r.low, r.high, log=r.log)

    p: dict[str, Any] = {}
    shape = (trial.suggest_categorical("mixture_shape", list(space.mixture_shapes))
             if len(space.mixture_shapes) > 1 else space.mixture_shapes[0])
    if shape != "fixed":
        p["mixture_shape"] = shape
    for name in ("exam_fraction", "qa_fraction", "lr"):
        if name == "exam_fraction" and shape == "recipe_step":  # the schedule sets the exam share
            continue
        p[name] = suggest(name)
    if shape == "linear":
        p["exam_fraction_end"] = suggest("exam_fraction_end")
    kl_on = trial.suggest_categorical("kl_on", [True, False]) if space.kl_allow_off else True
    if kl_on or static:
        p["kl_beta"] = suggest("kl_beta")
    if not kl_on:
        p["kl_on"] = False
        p["kl_beta"] = 0.0
    if space.micro_batch_sizes:
        p["micro_batch_size"] = trial.suggest_categorical("micro_batch_size", list(space.micro_batch_sizes))
    for path, r in space.extra.items():
        if integer_stage_field(path):
            low, high = integer_bounds(r)
            p[path] = trial.suggest_int(path, low, high, log=r.log)
        else:
            p[path] = suggest(path)
    return p


EDGE_FRACTION = 0.02
"""A sampled float within this fraction of its range's span (in log space for a log range) of a bound is "at the
edge" (:func:`range_edges`)."""


def float_ranges(space: SearchSpace) -> dict[str, FloatRange]:
    """Every float parameter the space can sample, by its Optuna name (what :func:`suggest_params` samples from)."""
    out = {name: getattr(space, name) for name in ("exam_fraction", "qa_fraction", "lr", "kl_beta")}
    out["exam_fraction_end"] = space.exam_fraction
    return {**out, **space.extra}


def range_edges(params: Mapping[str, Any], space: SearchSpace) -> list[dict[str, Any]]:
    """The float parameters of ``params`` that sit at a bound of their search range (within
    :data:`EDGE_FRACTION` of the span): ``{"param", "value", "bound": "low"|"high", "edge", "range": [low, high]}``
    each (``edge``: the bound's value).
    A best trial at a bound says the optimum may lie outside the range (widen it in ``tune.space``). A ``kl_beta``
    that is not used (KL off) is not reported."""
    def scale(x: float, r: FloatRange) -> float:
        return math.log(x) if r.log else float(x)

    out = []
    for name, r in float_ranges(space).items():
        v = params.get(name)
        if v is None or (name == "kl_beta" and params.get("kl_on") is False) or (r.log and float(v) <= 0):
            continue
        lo, hi, x = scale(r.low, r), scale(r.high, r), scale(v, r)
        for bound, b, edge in (("low", lo, r.low), ("high", hi, r.high)):
            if abs(x - b) <= EDGE_FRACTION * (hi - lo):
                out.append({"param": name, "value": float(v), "bound": bound, "range": [r.low, r.high],
                            "edge": edge})
    return out


def format_range_edges(edges: list[dict[str, Any]]) -> str | None:
    """One line naming the parameters at a bound and what to do, or None when there are none."""
    if not edges:
        return None
    at = ", ".join(f"{e['param']} {e['value']:.4g} at its {e['bound']} bound {e['edge']:g}" for e in edges)
    return (f"the best trial sits at the edge of its search range ({at}): the optimum may lie outside it; widen "
            f"tune.space.<param> (e.g. --set 'tune.space.{edges[0]['param']}={{low: …, high: …}}') and tune again")


class SpaceSampler:
    """Picklable define-by-run callable for Ray's OptunaSearch (its searcher checkpoint uses plain pickle)."""

    def __init__(self, space: SearchSpace, static: bool = False):
        self.space, self.static = space, static

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        return suggest_params(trial, self.space, static=self.static)


def mixture_weights(params: Mapping[str, Any], space: SearchSpace) -> dict[str, float]:
    """Stage-3 source weights from the two fractions (they sum to 1)."""
    fe, fq = float(params["exam_fraction"]), float(params["qa_fraction"])
    return {space.qa_source: fe * fq, space.example_source: fe * (1.0 - fq), space.raw_source: 1.0 - fe}


def recipe_schedule(qa_fraction: float, space: SearchSpace) -> list[dict[str, Any]]:
    """The recipe's step phases (:data:`RECIPE_EXAM_SCHEDULE`) as ``mixture_schedule`` entries."""
    return [{"start_frac": frac, "weights": mixture_weights({"exam_fraction": fe, "qa_fraction": qa_fraction}, space)}
            for frac, fe in RECIPE_EXAM_SCHEDULE]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"stop": {"rule": "x"}}`` → ``{"stop.rule": "x"}`` (``--set tune.stage_overrides.stop.rule=x`` nests)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def apply_params(cfg: KcptConfig, params: Mapping[str, Any], stage: str | None = None) -> KcptConfig:
    """A new validated config whose tuned stage carries ``params`` (plus ``tune.stage_overrides``).

    The overrides are applied into the stage and the returned config has none left (``tune.stage_overrides`` =
    {}): applied again — by the validator on this config, or by a later ``apply_params`` — they would undo the
    micro-batch scaling (an override ``eval_every: 5`` is 5 steps at the base micro-batch, not at the trial's).

    Sets the stage's ``sources`` (from the fractions), ``lr.peak``, ``kl_beta``, ``micro_batch_size`` (with
    ``max_steps``, ``eval_every`` and ``lr.warmup_steps`` scaled by old / new micro-batch: the same tokens) and
    every extra dotted path. Raises ConfigError when a parameter does not fit the stage config.
    """
    stage = stage or cfg.tune.stage
    space = cfg.tune.space
    data = cfg.model_dump(mode="json")
    idx = next((i for i, st in enumerate(cfg.plan) if st.name == stage), None)
    if idx is None:
        raise ConfigError(f"tune.stage: no stage named '{stage}' in plan")
    st = data["plan"][idx]
    for path, value in _flatten(cfg.tune.stage_overrides).items():
        _set_dotted(st, path, value)
    data["tune"]["stage_overrides"] = {}
    if params.get("mixture_shape") == "recipe_step" and "qa_fraction" in params:
        phases = recipe_schedule(float(params["qa_fraction"]), space)
        st["sources"], st["mixture_schedule"], st["mixture_mode"] = phases[0]["weights"], phases, "step"
    elif params.get("mixture_shape") == "linear" and "exam_fraction_end" in params:
        start = mixture_weights(params, space)
        end = mixture_weights({**params, "exam_fraction": params["exam_fraction_end"]}, space)
        st["sources"], st["mixture_mode"] = start, "linear"
        st["mixture_schedule"] = [{"start_frac": 0.0, "weights": start}, {"start_frac": 1.0, "weights": end}]
    elif "exam_fraction" in params and "qa_fraction" in params:
        st["sources"] = mixture_weights(params, space)
        st["mixture_schedule"] = []
        st["mixture_mode"] = "linear"
    if "lr" in params:
        st["lr"]["peak"] = float(params["lr"])
    if params.get("kl_on") is False:  # off wins over a β a static space sampled anyway
        st["kl_beta"] = 0.0
    elif "kl_beta" in params:
        st["kl_beta"] = float(params["kl_beta"])
    if "micro_batch_size" in params:
        m = int(params["micro_batch_size"])
        ref = st.get("micro_batch_size") or cfg.train.micro_batch_size
        st["micro_batch_size"] = m
        # whole steps for max_steps / eval_every (checked when the config loads); warm-up rounds
        st["max_steps"], st["eval_every"] = st["max_steps"] * ref // m, st["eval_every"] * ref // m
        st["lr"]["warmup_steps"] = round(st["lr"]["warmup_steps"] * ref / m)
    for path, value in params.items():
        if path not in FIXED_PARAMS:
            _set_dotted(st, path, value)
    return config_from_dict(data, source=f"tune params for stage '{stage}'")


def _clip(name: str, v: float, r: Any) -> float:
    if not r.low <= v <= r.high:
        logger.warning("recipe %s=%g lies outside the search range [%g, %g]: enqueued at the bound", name, v,
                       r.low, r.high)
    return min(max(v, r.low), r.high)


def recipe_points(cfg: KcptConfig, stage: str | None = None) -> list[dict[str, Any]]:
    """The recipe's settings as Optuna parameter dicts (names as in :func:`suggest_params`), to enqueue first:

    1. the tuned stage as configured (its ``sources`` split into exam / qa fractions, ``lr.peak``, ``kl_beta``;
       β = 0 is "KL off"), as a ``fixed`` mixture — the recipe default (the demo: 70:30 exam:raw);
    2. when ``space.mixture_shapes`` offers ``recipe_step``: the same with the recipe's 70:30 → 50:50 → 60:40
       step schedule.

    Values outside the search ranges are clipped to them (with a warning). A stage whose sources are not the
    space's qa / example / raw sources, or a space without the ``fixed`` shape, gives no first point.
    """
    stage = stage or cfg.tune.stage
    space = cfg.tune.space
    st = apply_params(cfg, {}, stage).stage(stage)  # with tune.stage_overrides
    w = dict(st.sources)
    total = sum(w.values())
    known = {space.qa_source, space.example_source, space.raw_source}
    if not total or set(w) - known:
        logger.warning("stage '%s' sources %s are not the search space's: no recipe trial enqueued", stage, list(w))
        return []
    qa, ex, raw = (w.get(k, 0.0) / total for k in (space.qa_source, space.example_source, space.raw_source))
    base: dict[str, Any] = {
        "qa_fraction": _clip("qa_fraction", qa / (qa + ex) if qa + ex else 0.5, space.qa_fraction),
        "lr": _clip("lr", float(st.lr.peak), space.lr),
    }
    if st.kl_beta > 0:
        if space.kl_allow_off:
            base["kl_on"] = True
        base["kl_beta"] = _clip("kl_beta", float(st.kl_beta), space.kl_beta)
    elif space.kl_allow_off:
        base["kl_on"] = False
    else:
        base["kl_beta"] = space.kl_beta.low
    stage_values = st.model_dump(mode="json")
    for path, r in space.extra.items():  # the stage's own value: the recipe trial trains the stage as configured
        value = get_dotted(stage_values, path)
        if value is None:
            logger.warning("recipe %s is unset in stage '%s': enqueued without it (sampled)", path, stage)
            continue
        clipped = _clip(path, float(value), r)
        base[path] = round(clipped) if integer_stage_field(path) else clipped
    if space.micro_batch_sizes:
        mb = cfg.micro_batch(st)
        base["micro_batch_size"] = min(space.micro_batch_sizes, key=lambda m: (abs(m - mb), m))
        if base["micro_batch_size"] != mb:
            logger.warning("recipe micro_batch_size=%d is not among tune.space.micro_batch_sizes %s: enqueued at %d",
                           mb, space.micro_batch_sizes, base["micro_batch_size"])
    shapes = list(space.mixture_shapes)
    multi = len(shapes) > 1
    points = []
    if "fixed" in shapes:
        points.append({**({"mixture_shape": "fixed"} if multi else {}), **base,
                       "exam_fraction": _clip("exam_fraction", 1.0 - raw, space.exam_fraction)})
    if "recipe_step" in shapes:
        points.append({**({"mixture_shape": "recipe_step"} if multi else {}), **base})
    return points
