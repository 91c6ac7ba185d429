"""Ray Tune + Optuna over one stage of the plan (stage 3 by default), with the gate as objective.

:func:`tune_stage3` is what ``jobs/tune_stage3.py`` and ``kcpt tune`` call:

1. start (or join) Ray; 2. make or reuse the checkpoints of the stages before the tuned one
(:func:`ensure_prerequisites`, one run dir per config hash); 3. run a ``Tuner`` whose trials each run the tuned
stage with their sampled config from the SAME previous-stage best checkpoint and the SAME ``baseline_raw_best``
(via :func:`kcpt.train.launch.run_plan`: one TorchTrainer per trial, or, at world size 1, the loop in the
trial's own actor, :func:`trial_in_actor`; metrics forwarded to Tune by :class:`GateReportCallback`), searched
by :class:`~kcpt.tune.searcher.ConstrainedOptunaSearch` and stopped early by ASHA; 4. export ``trials.parquet``
and ``best_config.yaml`` (:mod:`kcpt.tune.export`).

Experiment directory (absolute)::

    experiment.json   what was tuned: storage URL, study name, baseline, eps, exam target, paths
    config.yaml       the base config
    optuna.db         the Optuna study (default; ``tune.storage``: journal file or any RDB, see study_storage)
    tune/             Ray Tune's experiment (result.json / progress.csv / TensorBoard events per trial);
                      tune-2/ … the runs a resume with a larger num_samples added
    runs/<trial_id>/  the stage-loop run dir of each trial (metrics.jsonl, summary.json, checkpoints/, tb/)
    trials.parquet    one row per trial;  best_config.yaml   the full config of the best feasible trial

The experiment directory, ``train.output_dir`` (prerequisite run) and ``data.prepared_root`` may be URIs
(``s3://…``): Tune's state and the trials' run directories then live in the bucket, and the small files above
are published there after every finished trial (:mod:`kcpt.tune.experiment`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from kcpt import storage as store_lib
from kcpt.config import KcptConfig, dump_config
from kcpt.errors import CheckpointError, ConfigError
from kcpt.hashing import sha256_json
from kcpt.lease import held
from kcpt.tune.experiment import (
    TUNE_RUN_NAME,
    Publisher,
    accounted_trials,
    check_experiment,
    clear_experiment,
    experiment_uri,
    fail_interrupted_trials,
    previous_config,
    publish_experiment,
    resolve_experiment,
    tune_run_name,
    tune_runs,
)
from kcpt.tune.objective import GateSpec, ReplayedGateTracker, gate_outcome
from kcpt.tune.progress import TuneConsole
from kcpt.tune.searcher import DONE_KEY, FINAL_KEY, ConstrainedOptunaSearch, ends_trial, make_sampler, static_space
from kcpt.tune.space import SpaceSampler, apply_params, recipe_points
from kcpt.tune.study_storage import open_storage

METRIC = "gate_score"
STOPPED_TRIAL_GRACE_S = 15
"""Seconds Tune waits for a stopped (ASHA-pruned) trial before it kills the trial actor. A trial's function is
blocked in its TorchTrainer.fit() (or in its in-actor loop between two reports) and does not see Tune's stop
request, so with Tune's default (``TUNE_FORCE_TRIAL_CLEANUP_S`` = 600) a pruned trial kept training — and holding
its workers and placement group — for up to 10 minutes. Killing the trial actor takes its Train controller with
it, and Ray Train's placement-group cleaner frees the workers. Set ``TUNE_FORCE_TRIAL_CLEANUP_S`` yourself to
override."""
TOKENS_ATTR = "tokens_seen"
"""ASHA's time attribute with ``tune.asha.time_attr: tokens``: the stage loop's cumulative training tokens."""


# --------------------------------------------------------------------------- prerequisites


@dataclass
class Prerequisites:
    """Where every trial starts: the previous stage's best checkpoint and the baseline raw loss."""

    run_dir: Path | str
    init_checkpoint: Path | str | None
    baseline_raw_best: float | None
    reference_checkpoint: Path | str | None = None
    """The KL reference (``kl_reference: cpt_best``): the best checkpoint of the stage that set the baseline."""
    reused: bool = False
    tokens_before: int = 0
    """Training tokens of the stages before the tuned one (base model → its start checkpoint)."""


def stages_before(cfg: KcptConfig, stage: str | None = None) -> list[str]:
    names = [st.name for st in cfg.plan]
    stage = stage or cfg.tune.stage
    return names[: names.index(stage)]


def prerequisite_key(cfg: KcptConfig, stage: str | None = None) -> str:
    """Hash of everything the pre-tune stages depend on (model, tokenizer, data, those stages, train)."""
    before = set(stages_before(cfg, stage))
    d = cfg.model_dump(mode="json")
    for k in ("run_name", "output_dir"):
        d["train"].pop(k, None)
    d["data"].pop("prepared_root", None)  # where prepared data is cached, not what it holds
    d["data"].pop("held_out_overlap", None)  # a check on the data, not what it is
    return sha256_json({"model": d["model"], "tokenizer": d["tokenizer"], "data": d["data"], "train": d["train"],
                        "plan": [s for s in d["plan"] if s["name"] in before]})


def _plan_field(result: Any, name: str, default: Any = None) -> Any:
    return getattr(result, name, None) if not isinstance(result, Mapping) else result.get(name, default)


def _best_checkpoint_from_summary(summary: Mapping[str, Any], stage: str) -> str | None:
    st = (summary.get("stages") or {}).get(stage) or {}
    for k in ("best_checkpoint", "best_checkpoint_path", "best_path"):
        if st.get(k):
            return str(st[k])
    bc = summary.get("best_checkpoints") or {}
    return str(bc[stage]) if bc.get(stage) else None


def _read_prerequisites(cfg: KcptConfig, run_dir: Path | str, before: list[str]) -> Prerequisites:
    from kcpt.train.rundir import RunDir

    summary = RunDir(run_dir).pull().read_summary()

    def best(stage: str) -> Path | str | None:
        ckpt = _best_checkpoint_from_summary(summary, stage)
        if ckpt is None:
            return None
        if store_lib.is_uri(ckpt) or Path(ckpt).is_absolute():
            return ckpt if store_lib.is_uri(ckpt) else Path(ckpt)
        return store_lib.join(run_dir, ckpt) if store_lib.is_uri(str(run_dir)) else Path(run_dir) / ckpt

    last = before[-1] if before else None
    init = best(last) if last else None
    if last and init is None:
        raise CheckpointError(f"{run_dir}/summary.json: no best checkpoint recorded for stage '{last}'")
    ref_stage = next((s for s in before if cfg.stage(s).sets_baseline), None)
    baseline = summary.get("baseline_raw_best")
    tokens = sum(int(((summary.get("stages") or {}).get(s) or {}).get("tokens_seen") or 0) for s in before)
    return Prerequisites(run_dir, init, None if baseline is None else float(baseline),
                         best(ref_stage) if ref_stage else None, tokens_before=tokens)


def ensure_prerequisites(cfg: KcptConfig, *, stage: str | None = None, root: Path | str | None = None,
                         address: str | None = None) -> Prerequisites:
    """Run (or reuse) the stages before ``stage`` in ``<root>/prereq-<hash12>/`` and return where trials start.

    Reused when that run dir's ``summary.json`` records every stage before ``stage``. ``root`` defaults to
    ``train.output_dir``. At world size 1 without DeepSpeed the stages run in one Ray task
    (``run_plan(in_task=True)``), as the trials run in their actors: no Ray Train controller and worker group to
    start for a single worker.
    """
    from kcpt.train.rundir import RunDir

    before = stages_before(cfg, stage)
    root = str(root if root is not None else cfg.train.output_dir)
    name = f"prereq-{prerequisite_key(cfg, stage)[:12]}"
    run_dir: Path | str = store_lib.join(root, name) if store_lib.is_uri(root) else Path(root).resolve() / name
    if not before:
        return Prerequisites(run_dir, None, None)
    rd = RunDir(run_dir)
    # a second tune of the same config on this machine waits for the first's prerequisites, then reuses them
    with rd.in_use(wait=True, on_wait=lambda msg: print(f"prerequisites: {msg}", flush=True)):
        rd.pull()
        if rd.summary_path.exists():
            done = rd.read_summary().get("stages") or {}
            if all(s in done for s in before):
                pre = _read_prerequisites(cfg, run_dir, before)
                pre.reused = True
                return pre
        from kcpt.train.launch import one_worker, run_plan

        run_plan(cfg, stages=before, run_dir=run_dir, resume="auto", address=address, data_table=False,
                 in_task=one_worker(cfg))
        return _read_prerequisites(cfg, run_dir, before)


# --------------------------------------------------------------------------- per-trial reporting


class GateReportCallback(TuneReportCallback):
    """Forwards each eval the stage loop reports (rank 0's metrics) to Ray Tune, with the running gate
    objective (:data:`kcpt.tune.objective.GATE_KEYS`) added. Runs on the Ray Train controller."""

    def __init__(self, spec: GateSpec, stage: str, extra: Mapping[str, Any] | None = None, *,
                 max_steps: int | None = None, stops_at_gate: bool = False):
        super().__init__()
        self._tracker = ReplayedGateTracker(spec)
        self._stage = stage
        self._extra = dict(extra or {})
        self._max_steps = max_steps
        self._stops_at_gate = stops_at_gate

    def tune_metrics(self, metrics: Mapping[str, Any], checkpoint_path: str | None) -> dict[str, Any] | None:
        """What Tune gets for one report of the loop (rank 0's ``metrics``), or None for another stage's."""
        m = dict(metrics)
        if m.get("stage") not in (None, self._stage):
            return None
        step = int(m.get("step", -1))
        m.update(self._tracker.update(m))
        m.update(self._extra)
        m[FINAL_KEY] = False
        # this eval ends the stage (the loop stops after it): a scheduler stop now loses nothing
        m[DONE_KEY] = bool((self._stops_at_gate and m["gate_passed"] and m["steps_to_gate"] == step)
                           or (self._max_steps is not None and step >= self._max_steps))
        if checkpoint_path:
            m["checkpoint_path"] = checkpoint_path
        return m

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        """Ray Train path: runs on the trial's Train controller, hands the metrics to the trial's actor."""
        m = self.tune_metrics(metrics[0], checkpoint.path if checkpoint else None)
        if m is not None:
            self._training_actor_item_queue.put(m)

    def report_in_actor(self, metrics: dict[str, Any], checkpoint_path: str | None) -> None:
        """In-actor path (:func:`trial_in_actor`): the loop's ``on_report`` in the trial's own actor."""
        m = self.tune_metrics(metrics, checkpoint_path)
        if m is not None:
            tune.report(m)


TrialRunner = Callable[..., Any]
"""``runner(cfg, *, stage, run_dir, init_checkpoint, baseline_raw_best, callbacks) -> PlanResult | dict``."""


def trial_in_actor(cfg: KcptConfig) -> bool:
    """Whether a trial of ``cfg`` runs its stage loop in its own Tune actor instead of a TorchTrainer: at world
    size 1 (:meth:`KcptConfig.tune_workers`) without DeepSpeed. The actor then holds the worker's resources
    (:func:`trial_resources`); a Ray Train fit would add a controller and a worker process per trial (their
    start-up, a process group of one, a health-check poll per report) for the same single worker."""
    return cfg.tune_workers() == 1 and cfg.train.deepspeed is None


def trial_resources(cfg: KcptConfig) -> dict[str, float]:
    """Ray resources of one trial's actor: the worker's CPUs (and GPU) when the loop runs in it, else 1 CPU (its
    TorchTrainer's workers ask for their own)."""
    if trial_in_actor(cfg):
        from kcpt.train.launch import worker_resources

        return worker_resources(cfg)
    return {"CPU": 1.0}


def _run_stage(cfg: KcptConfig, stage: str, **kw: Any) -> Any:
    """The tuned stage via :func:`kcpt.train.launch.run_plan` with a trial's fixed arguments (resumed from its run
    dir when one exists; no console, no data table); ``kw``: where it runs and from what."""
    from kcpt.train.launch import run_plan

    return run_plan(cfg, stages=[stage], resume="auto", console=False, data_table=False, **kw)


def run_stage_trial(cfg: KcptConfig, *, stage: str, run_dir: Path | str, init_checkpoint: Path | str | None,
                    baseline_raw_best: float | None, reference_checkpoint: Path | str | None,
                    callbacks: list[Any]) -> Any:
    """Default trial runner: the real stage loop via :func:`kcpt.train.launch.run_plan`. When
    :func:`trial_in_actor` allows it, in one process: this one when a trial calls (a :class:`GateReportCallback`
    in ``callbacks``; its reports go straight to Tune), else — a re-evaluation run from the driver — one Ray task
    holding a trial's resources (``run_plan(in_task=True)``, :func:`trial_resources`), so re-runs train exactly as
    the trials did. Otherwise one TorchTrainer."""
    where = {"run_dir": run_dir, "init_checkpoint": init_checkpoint, "baseline_raw_best": baseline_raw_best,
             "reference_checkpoint": reference_checkpoint}
    gate = next((c for c in callbacks if isinstance(c, GateReportCallback)), None)
    if trial_in_actor(cfg) and gate is not None:
        return _run_stage(cfg, stage, in_process=True, on_report=gate.report_in_actor, **where)
    if trial_in_actor(cfg):
        return _run_stage(cfg, stage, in_task=True, **where)
    return _run_stage(cfg, stage, callbacks=callbacks, **where)


@dataclass
class TrialContext:
    """Everything a trial needs besides its sampled parameters (sent once to the trial actors)."""

    base_config: dict[str, Any]
    stage: str
    init_checkpoint: str | None
    baseline_raw_best: float | None
    runs_dir: str
    reference_checkpoint: str | None = None
    runner: TrialRunner = run_stage_trial
    tokens_before: int = 0
    tune_dir: str | None = None
    """The experiment's Tune directory: a trial's ``trial_dir`` is its sub-directory there (result.json …)."""


def _stage_evals(run_dir: Path | str, stage: str) -> list[dict[str, Any]]:
    from kcpt.train.rundir import read_metrics

    return [m for m in read_metrics(run_dir) if m.get("stage") in (None, stage)]


def _best_checkpoint_of(result: Any, run_dir: Path | str, stage: str) -> str | None:
    from kcpt.train.rundir import RunDir

    best = _plan_field(result, "best_checkpoints") or {}
    if isinstance(best, Mapping) and best.get(stage):
        return str(best[stage])
    rd = RunDir(run_dir).pull()
    if rd.summary_path.exists():
        return _best_checkpoint_from_summary(rd.read_summary(), stage)
    return None


def tokens_per_step(cfg: KcptConfig, stage: str | None = None) -> int:
    """Training tokens (row positions) of one optimizer step of a tune trial of ``stage`` (default the tuned
    one) at ``cfg``'s batch shape (``tune.stage_overrides`` applied)."""
    stage = stage or cfg.tune.stage
    return _step_tokens(apply_params(cfg, {}, stage), stage)


def _step_tokens(applied: KcptConfig, stage: str) -> int:
    t = applied.train
    return applied.micro_batch(stage) * applied.data.seq_len * t.grad_accum * applied.tune_workers()


def stage_token_budget(cfg: KcptConfig, stage: str | None = None) -> int:
    """Training tokens of the tuned stage run to its ``max_steps`` (``tune.stage_overrides`` applied)."""
    stage = stage or cfg.tune.stage
    applied = apply_params(cfg, {}, stage)
    return applied.stage(stage).max_steps * _step_tokens(applied, stage)


def gate_spec(cfg: KcptConfig, stage: str, baseline_raw_best: float | None, tokens_before: int = 0) -> GateSpec:
    """The trials' gate objective: ``tune.objective``, scaled by the BASE config's stage token budget (the same
    ``T0`` for every trial, whatever its sampled settings)."""
    st = apply_params(cfg, {}, stage).stage(stage)
    return GateSpec.from_stage(st, baseline_raw_best, cfg.tune.infeasible_penalty, objective=cfg.tune.objective,
                               token_scale=float(stage_token_budget(cfg, stage)), tokens_before=tokens_before)


def trial_config(base: KcptConfig, params: dict[str, Any], stage: str) -> KcptConfig:
    """The config a trial (or a re-evaluation run) of ``params`` trains: the tuned ``stage`` of ``base`` at a fixed
    world size, :meth:`KcptConfig.tune_workers` (an elastic ``train.min_workers`` is for the long runs)."""
    cfg = apply_params(base, params, stage)
    cfg.train.num_workers = base.tune_workers()
    cfg.train.min_workers = None
    return cfg


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune function trainable: run the tuned stage with the sampled ``config`` and report its gate summary
    as a last result with ``trial_final=True`` (the searcher tells Optuna COMPLETE only for such trials)."""
    from kcpt.config import config_from_dict

    base = config_from_dict(ctx.base_config, "<tune base config>")
    cfg = trial_config(base, config, ctx.stage)
    trial_id = tune.get_context().get_trial_id()
    run_dir = (store_lib.join(ctx.runs_dir, trial_id) if store_lib.is_uri(ctx.runs_dir)
               else Path(ctx.runs_dir) / trial_id)
    spec = gate_spec(base, ctx.stage, ctx.baseline_raw_best, ctx.tokens_before)
    # Tune's trial dir in the experiment. Not get_trial_dir() itself: in an actor reused from an earlier trial
    # (tune reuse_actors) that is the actor's scratch working directory, with the same name
    trial_dir = tune.get_context().get_trial_dir()
    if ctx.tune_dir is not None:
        trial_dir = store_lib.join(ctx.tune_dir, os.path.basename(trial_dir.rstrip("/")))
    extra = {"run_dir": str(run_dir), "trial_dir": trial_dir}
    result = ctx.runner(cfg, stage=ctx.stage, run_dir=run_dir,
                        init_checkpoint=ctx.init_checkpoint, baseline_raw_best=ctx.baseline_raw_best,
                        reference_checkpoint=ctx.reference_checkpoint,
                        callbacks=[GateReportCallback(spec, ctx.stage, extra, max_steps=cfg.stage(ctx.stage).max_steps,
                                                      stops_at_gate=cfg.stage(ctx.stage).stop.rule == "gate")])
    evals = _stage_evals(run_dir, ctx.stage)
    outcome = gate_outcome(evals, spec)
    final = {**outcome.as_metrics(), **extra, FINAL_KEY: True,
             "tokens_seen": max([int(m.get("tokens_seen") or 0) for m in evals], default=0),
             "checkpoint_path": _best_checkpoint_of(result, run_dir, ctx.stage) or ""}
    tune.report(final)


def reevaluate(study: Any, ctx: TrialContext, *, top_k: int, seeds: int, log: Callable[[str], None] = print,
               on_record: Callable[[Any], None] | None = None) -> list[Any]:
    """Re-run the ``top_k`` best feasible trials of ``study`` at ``seeds`` more training seeds (``train.seed + 1``
    …) with ``ctx.runner`` — the trials' own runner, world size and execution path (:func:`run_stage_trial`), from
    the same start checkpoint — and record each run in the study (:mod:`kcpt.tune.reeval`; then
    ``on_record(record)``). Runs already recorded (a resumed experiment) are skipped; a run dir left by a killed run
    resumes. A run that raises is logged and left unrecorded (the choice uses the runs that finished). Returns the
    new records."""
    from kcpt.config import config_from_dict
    from kcpt.tune import reeval

    base = config_from_dict(ctx.base_config, "<tune base config>")
    spec = gate_spec(base, ctx.stage, ctx.baseline_raw_best, ctx.tokens_before)
    done = {(r.trial_number, r.seed) for rs in reeval.records(study).values() for r in rs}
    todo = [(t, base.train.seed + i) for t in reeval.candidates(study, top_k) for i in range(1, seeds + 1)]
    new = []
    for j, (t, seed) in enumerate(todo, 1):
        if (t.number, seed) in done:
            continue
        cfg = trial_config(base, t.params, ctx.stage)
        cfg.train.seed = seed
        name = f"reeval-{t.number}-seed{seed}"
        run_dir = store_lib.join(ctx.runs_dir, name) if store_lib.is_uri(ctx.runs_dir) else Path(ctx.runs_dir) / name
        try:
            ctx.runner(cfg, stage=ctx.stage, run_dir=run_dir, init_checkpoint=ctx.init_checkpoint,
                       baseline_raw_best=ctx.baseline_raw_best, reference_checkpoint=ctx.reference_checkpoint,
                       callbacks=[])
        except Exception as e:  # noqa: BLE001 - one lost re-run must not lose the experiment's results
            log(f"re-eval {j}/{len(todo)}: trial #{t.number} at seed {seed} failed ({type(e).__name__}: {e}); "
                f"not recorded — its run dir: {run_dir}")
            continue
        o = gate_outcome(_stage_evals(run_dir, ctx.stage), spec)
        rec = reeval.ReevalRecord(t.number, seed, math.inf if o.gate_score is None else float(o.gate_score),
                                  o.gate_objective, o.gate_constraint, o.gate_passed, o.tokens_to_gate, str(run_dir))
        reeval.save_record(study, rec)
        if on_record is not None:
            on_record(rec)
        new.append(rec)
        log(f"re-eval {j}/{len(todo)}: trial #{t.number} at seed {seed}: "
            f"{'gate held at ' + str(o.tokens_to_gate) + ' tokens' if o.gate_passed else 'gate did not hold'}, "
            f"score {rec.score:.4f} (the trial's own run: {reeval.own_score(t):.4f})")
    return new


# --------------------------------------------------------------------------- the tune job


class PublishExperiment(tune.Callback):
    """Publishes a URI experiment's small files (study snapshot included) after every finished trial, so a driver
    lost mid-experiment leaves a resumable state in the bucket."""

    def __init__(self, uri: str, local: Path) -> None:
        self.uri, self.local = uri, local

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        publish_experiment(self.uri, self.local)


@dataclass
class TuneRunResult:
    experiment_dir: Path
    """The experiment's local directory (for a URI experiment: its mirror; see ``experiment_uri``)."""
    storage: str
    study_name: str
    prerequisites: Prerequisites
    trials_path: Path
    best_config_path: Path | None
    best: dict[str, Any] | None
    table: str
    extra: dict[str, Any] = field(default_factory=dict)


def ray_cpus_needed(cfg: KcptConfig) -> int:
    """Logical CPUs for a local Ray: per concurrent trial 1 (the trial) + its Train workers, or the one worker's
    CPUs when the trial's loop runs in its actor (:func:`trial_in_actor`); at least 3."""
    per_trial = (math.ceil(cfg.train.cpus_per_worker) if trial_in_actor(cfg)
                 else 1 + math.ceil(cfg.tune_workers() * cfg.train.cpus_per_worker))
    return max(3, cfg.tune.max_concurrent * per_trial)


def init_ray(cfg: KcptConfig, address: str | None = None) -> bool:
    """Join ``address`` (or ``RAY_ADDRESS``, set inside ``ray job submit``) or start a local Ray with explicit
    ``num_cpus``. Returns True when this call started Ray (the caller shuts it down)."""
    from kcpt.raystart import start_ray

    return start_ray(address, num_cpus=cfg.tune.num_cpus or ray_cpus_needed(cfg), verbose=cfg.logging.verbose)


def _logger_callbacks(cfg: KcptConfig, experiment_dir: Path) -> list[Any]:
    cbs: list[Any] = []
    if cfg.logging.mlflow_tracking_uri:
        try:
            import mlflow  # noqa: F401
            from ray.air.integrations.mlflow import MLflowLoggerCallback
        except ImportError as e:
            raise ConfigError("logging.mlflow_tracking_uri is set but mlflow is not installed "
                              "(pip install 'kcpt[mlflow]')") from e
        cbs.append(MLflowLoggerCallback(tracking_uri=cfg.logging.mlflow_tracking_uri,
                                        experiment_name=f"{cfg.tune.study_name}", save_artifact=False))
    return cbs


def build_searcher(cfg: KcptConfig, *, storage: str, study_name: str, sampler: str = "tpe",
                   after_ask: Callable[[], None] | None = None, owner: str | None = None,
                   seed: int | None = None) -> ConstrainedOptunaSearch:
    """The searcher on the study ``study_name`` in ``storage`` (a URL of :mod:`kcpt.tune.study_storage`);
    ``after_ask``, ``owner`` (the experiment's directory or URI, stored on each trial it asks for): see
    :class:`ConstrainedOptunaSearch`; ``seed``: the sampler's (default ``tune.sampler_seed``)."""
    space = cfg.tune.space
    return ConstrainedOptunaSearch(
        space=SpaceSampler(space, static=static_space(sampler)),
        metric=METRIC, mode="min",
        sampler=make_sampler(sampler, seed=cfg.tune.sampler_seed if seed is None else seed,
                             n_startup_trials=cfg.tune.n_startup_trials),
        study_name=study_name, storage=open_storage(storage),
        enqueue=recipe_points(cfg) if cfg.tune.enqueue_recipe else None, after_ask=after_ask, owner=owner,
    )


def asha_on(cfg: KcptConfig, sampler: str = "tpe") -> bool:
    """``tune.asha.enabled``, except with the GP sampler: Optuna's ``GPSampler`` learns from COMPLETE trials only,
    so a trial ASHA stops teaches it nothing and it proposes the same point again (measured on the demo: the last 6
    of 16 trials at one point, every one stopped at its first rung; docs/tuning.md)."""
    return cfg.tune.asha.enabled and sampler != "gp"


def asha_bounds(cfg: KcptConfig) -> tuple[str, int, int]:
    """``(time_attr, max_t, grace_period)`` of ASHA on ``tune.asha``'s fidelity. :class:`ConfigError` when the
    grace period reaches past ``max_t`` (ASHA would assert inside Ray, after the prerequisites)."""
    a = cfg.tune.asha
    st = apply_params(cfg, {}, cfg.tune.stage).stage(cfg.tune.stage)
    if a.time_attr == "tokens":
        # fidelity = training tokens of the stage; max_t beyond the budget so ASHA never stops a trial at its
        # last eval before the trial's own final report (a trial with larger batches may also pass the budget)
        per_eval = st.eval_every * tokens_per_step(cfg)
        attr, max_t = TOKENS_ATTR, 2 * stage_token_budget(cfg) + per_eval
        grace = a.grace_tokens or a.grace_period * per_eval
        unit = f"tokens ({per_eval} per eval)"
    else:
        # evals (+ the step-0 eval and the final summary report)
        attr, max_t, grace = "training_iteration", math.ceil(st.max_steps / st.eval_every) + 2, a.grace_period
        unit = "evals"
    if grace > max_t:
        key = "grace_tokens" if a.time_attr == "tokens" and a.grace_tokens else "grace_period"
        raise ConfigError(f"tune.asha.{key}: a grace of {grace} {unit} is longer than a trial of stage "
                          f"'{cfg.tune.stage}' can run ({max_t}): lower it, or lengthen the stage "
                          "(tune.stage_overrides.max_steps)")
    return attr, max_t, grace


def build_scheduler(cfg: KcptConfig, sampler: str = "tpe") -> Any:
    """ASHA on ``tune.asha``'s fidelity (:func:`asha_bounds`), or ``None`` when :func:`asha_on` is False."""
    if not asha_on(cfg, sampler):
        return None
    from ray.tune.schedulers import ASHAScheduler

    attr, max_t, grace = asha_bounds(cfg)
    return ASHAScheduler(time_attr=attr, max_t=max_t, grace_period=grace,
                         reduction_factor=cfg.tune.asha.reduction_factor)


def unfinished_trials(results: Any, expected: int) -> int:
    """Trials of a finished ``Tuner.fit`` (its ``ResultGrid``) that did not end, or never started (``expected``
    trials were asked for); 0 for a search that ran to its end. A trial ended when it errored, when its last report
    carries its outcome (:func:`~kcpt.tune.searcher.ends_trial`) or when the scheduler stopped it (Tune marks that
    report ``done``). Not Tune's trial status: after Ctrl-C, Tune saves its state with the running trials in it and
    then stops them, which sets them TERMINATED."""
    ended = 0
    for i in range(len(results)):
        r = results[i]
        m = r.metrics or {}
        ended += r.error is not None or ends_trial(m) or bool(m.get("done"))
    return len(results) - ended + max(expected - len(results), 0)


def quiet_tune(verbose: bool) -> None:
    """Unless ``verbose``: Tune's legacy output engine (``RAY_AIR_NEW_OUTPUT=0``: with ``verbose=0`` it prints
    nothing, where the new engine still prints its experiment box and paths) and Optuna's INFO logs off; the
    console shows :class:`~kcpt.tune.progress.TuneConsole`'s lines instead."""
    import os

    import optuna

    if verbose:
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def show_data(cfg: KcptConfig, stages: list[str], *, address: str | None = None) -> None:
    """Prepare (or reuse) the datasets ``stages`` use and print the data table (:mod:`kcpt.data.report`)."""
    from kcpt.console import is_tty
    from kcpt.data.prepare import prepare_all
    from kcpt.data.report import announce_data
    from kcpt.train.plan import datasets_needed

    statuses: dict[str, str] = {}
    prepared = prepare_all(cfg, datasets_needed(cfg, stages), progress=cfg.logging.progress and is_tty(),
                           address=address, statuses=statuses)
    announce_data(prepared, statuses, limit=cfg.data.max_reject_fraction,
                  filters=cfg.data.filters.model_dump(mode="json"))
    from kcpt.data.shards import fetch_prepared
    from kcpt.train.plan import held_out_warnings

    local = {k: fetch_prepared(v, shards=False) for k, v in prepared.items()}
    for line in held_out_warnings(cfg, stages, local):
        print(line, flush=True)


def _trainable(ctx: TrialContext, location: str, name: str, cfg: KcptConfig) -> Any:
    run_ctx = replace(ctx, tune_dir=store_lib.join(location, name))
    return tune.with_resources(tune.with_parameters(run_trial, ctx=run_ctx), trial_resources(cfg))


def _restore_tuner(ctx: TrialContext, location: str, name: str, cfg: KcptConfig) -> tune.Tuner:
    """Tune run ``name`` restored from its saved state: unfinished and errored trials resumed, ASHA and the
    searcher as saved."""
    return tune.Tuner.restore(store_lib.join(location, name), trainable=_trainable(ctx, location, name, cfg),
                              resume_errored=True, restart_errored=False, resume_unfinished=True)


def _new_tuner(ctx: TrialContext, location: str, name: str, cfg: KcptConfig, *, num_samples: int, storage: str,
               study_name: str, sampler: str, uri: str | None, exp_dir: Path, verbose: int | None) -> tune.Tuner:
    """A new Tune run ``name`` of ``num_samples`` trials on the study. On a study that already holds trials (a
    grown resume, a shared study) the sampler's seed is derived from ``tune.sampler_seed`` and the number of trials,
    so a random draw does not repeat the first run's points."""
    return tune.Tuner(
        _trainable(ctx, location, name, cfg),
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(cfg, storage=storage, study_name=study_name, sampler=sampler,
                                      after_ask=None if uri is None else Publisher(uri), owner=location,
                                      seed=sampler_seed(cfg.tune.sampler_seed, storage, study_name)),
            scheduler=build_scheduler(cfg, sampler), metric=METRIC, mode="min",
            num_samples=num_samples, max_concurrent_trials=cfg.tune.max_concurrent,
            # the next trial's loop runs in the finished trial's process (no new Python, no torch import:
            # ~5 s a trial here); a pruned trial's loop ends at the report Tune stopped it on
            reuse_actors=trial_in_actor(cfg)),
        run_config=tune.RunConfig(
            name=name, storage_path=location,
            verbose=(1 if cfg.logging.verbose else 0) if verbose is None else verbose,
            callbacks=[*_logger_callbacks(cfg, exp_dir),
                       TuneConsole(num_samples, progress=cfg.logging.progress,
                                   **_console_start(storage, study_name, location)),
                       *([PublishExperiment(uri, exp_dir)] if uri else [])]),
    )


def _console_start(storage: str, study_name: str, owner: str) -> dict[str, Any]:
    """Where an added Tune run's console counts on from: the experiment's ended trials and the study's best
    feasible trial (:class:`~kcpt.tune.progress.TuneConsole`)."""
    from kcpt.tune import reeval
    from kcpt.tune.study_storage import existing_study

    study = existing_study(storage, study_name)
    if study is None:
        return {}
    best = reeval.candidates(study, 1)
    return {"earlier": accounted_trials(storage, study_name, owner),
            "best": (float(best[0].value), str(best[0].user_attrs.get("ray_trial_id", f"#{best[0].number}")))
            if best else None}


def sampler_seed(seed: int, storage: str, study_name: str) -> int:
    """``seed`` for a study without trials; else a seed derived from it and the study's trial count."""
    import numpy as np

    from kcpt.tune.study_storage import existing_study

    study = existing_study(storage, study_name)
    n = 0 if study is None else len(study.get_trials(deepcopy=False))
    return seed if n == 0 else int(np.random.SeedSequence([seed, n]).generate_state(1)[0])


def tune_stage3(cfg: KcptConfig, *, experiment_dir: str | Path | None = None, resume: bool = False,
                overwrite: bool = False, address: str | None = None, runner: TrialRunner | None = None,
                prerequisites: Prerequisites | None = None, sampler: str = "tpe",
                verbose: int | None = None) -> TuneRunResult:
    """Tune ``cfg.tune.stage`` (see the module docstring). ``cfg.tune`` supplies num_samples, max_concurrent,
    storage (:mod:`kcpt.tune.study_storage`), study_name. ``runner`` replaces the real stage loop (tests of the
    plumbing only).

    An existing experiment (``experiment.json``, or the study already in its storage) needs ``resume`` or
    ``overwrite`` (:func:`kcpt.tune.experiment.check_experiment`). ``resume`` restores Tune's experiment state
    (``Tuner.restore``): finished trials stay, trials that were running are re-run under the same Ray trial id and
    Optuna trial number (their run dirs resume from their latest checkpoints), and the search continues to
    the ``num_samples`` it was asked for; a larger ``num_samples`` then adds a Tune run of the missing trials on
    the same study (:func:`tune_run_name`; ``experiment.json``'s ``tune_runs``). Optuna trials still RUNNING
    once the run ends (asked for after Tune's last saved state, so no Tune trial owns them) are marked FAIL with
    ``interrupted=True``. ``overwrite`` deletes the study and the experiment's files first.

    Console (:mod:`kcpt.console`): the data table of every dataset the prerequisites and the tuned stage use
    (``data.max_reject_fraction`` applies), the prerequisite stages' eval lines when they run, then one line per
    trial (:class:`~kcpt.tune.progress.TuneConsole`); Tune's own ``verbose`` is 0 unless ``logging.verbose``
    (or ``verbose`` is given)."""
    from kcpt.analysis.trials import trials_table
    from kcpt.tune.export import export_results

    cfg.check_tuned_stage()
    if asha_on(cfg, sampler):
        asha_bounds(cfg)  # a grace ASHA cannot keep is refused before Ray starts or the experiment is made
    cfg, exp_dir, storage = resolve_experiment(cfg, experiment_dir)
    uri = experiment_uri(cfg, experiment_dir)
    location = uri or str(exp_dir)  # where Tune's state and the trials' run dirs live
    study_name = cfg.tune.study_name
    # one driver per experiment, on this machine and across machines (a bucket lease for a URI): a second one
    # would fail the first's running trials as interrupted and export over its results
    with held(location if uri else str(exp_dir.resolve()), store_lib.Store(uri) if uri else None, what="tune",
              elsewhere="give this one another --experiment-dir", shown=location):
        mode = check_experiment(exp_dir, storage_url=storage, study_name=study_name, resume=resume,
                                overwrite=overwrite, config_sha256=cfg.sha256(), owner=location, config=cfg)
        if mode == "overwrite":
            clear_experiment(exp_dir, storage_url=storage, study_name=study_name, uri=uri)
        exp_dir.mkdir(parents=True, exist_ok=True)
        stage = cfg.tune.stage
        interrupted: list[int] = []
        unfinished = expected = 0
        segments: list[dict[str, Any]] = []  # the experiment's Tune runs (tune_runs)
        os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", str(STOPPED_TRIAL_GRACE_S))  # read by Tune's controller
        quiet_tune(cfg.logging.verbose)
        started = init_ray(cfg, address)
        try:
            show_data(cfg, [*stages_before(cfg, stage), stage], address=address)
            pre = prerequisites or ensure_prerequisites(cfg, stage=stage, address=address)
            print(f"prerequisites ({', '.join(stages_before(cfg, stage)) or 'none'}): "
                  f"{'reused' if pre.reused else 'made'} in {pre.run_dir}; every trial starts from "
                  f"{pre.init_checkpoint}", flush=True)
            if cfg.tune.asha.enabled and not asha_on(cfg, sampler):
                print("ASHA is off for --sampler gp: the GP learns from complete trials only, and a trial stopped "
                      "early would teach it nothing (docs/tuning.md)", flush=True)
            st = apply_params(cfg, {}, stage).stage(stage)
            exam_value = "1 - exam_acc" if st.stop.exam_metric == "accuracy" else "exam_val_loss"
            previous = previous_config(exp_dir) if mode == "resume" else None
            if mode == "resume":
                segments = tune_runs(exp_dir, previous)
            dump_config(cfg, exp_dir / "config.yaml")
            manifest = {
                "kind": "kcpt-tune", "stage": stage, "study_name": study_name, "storage": storage,
                "metric": METRIC, "objective": cfg.tune.objective,
                "objective_value": (f"gate_objective: {exam_value} at the selected eval, min" if cfg.tune.objective
                                    == "exam" else "gate_objective: lexicographic (gate passed, tokens_to_gate, "
                                    f"{exam_value}), min; see kcpt.tune.objective"),
                "exam_metric": st.stop.exam_metric,
                "token_scale": stage_token_budget(cfg), "tokens_before": pre.tokens_before,
                "asha": asha_on(cfg, sampler),
                "asha_time_attr": TOKENS_ATTR if cfg.tune.asha.time_attr == "tokens" else "training_iteration",
                "constraint": "raw_gate = raw_ratio - (1 + eps) at the selected eval (<= 0 feasible)",
                "baseline_raw_best": pre.baseline_raw_best, "eps": st.stop.raw_tolerance,
                "exam_target": st.stop.exam_target, "consecutive": st.stop.consecutive,
                "init_checkpoint": None if pre.init_checkpoint is None else str(pre.init_checkpoint),
                "prereq_run_dir": str(pre.run_dir), "tune_dir": store_lib.join(location, TUNE_RUN_NAME),
                "runs_dir": store_lib.join(location, "runs"), "config_sha256": cfg.sha256(),
                "experiment_sha256": cfg.experiment_sha256(), "sampler": sampler,
                "experiment_uri": uri,
                "trial_workers": cfg.tune_workers(), "trial_in_actor": trial_in_actor(cfg),
                "reeval": cfg.tune.reeval.model_dump(),
            }

            def write_manifest() -> None:
                manifest["tune_runs"] = segments
                (exp_dir / "experiment.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
                publish_experiment(uri, exp_dir)

            write_manifest()
            ctx = TrialContext(cfg.model_dump(mode="json"), stage,
                               None if pre.init_checkpoint is None else str(pre.init_checkpoint),
                               pre.baseline_raw_best, store_lib.join(location, "runs"),
                               None if pre.reference_checkpoint is None else str(pre.reference_checkpoint),
                               runner or run_stage_trial, pre.tokens_before)
            last = segments[-1] if segments else None
            if last is not None and tune.Tuner.can_restore(store_lib.join(location, last["name"])):
                # Tune's saved state of the experiment's last run: finished trials stay, the others resume
                expected = int(last["num_samples"])
                unfinished = unfinished_trials(_restore_tuner(ctx, location, last["name"], cfg).fit(), expected)
            elif last is not None:
                segments.pop()  # killed before Tune saved any state: its trials are counted from the study below
            if not unfinished:
                interrupted = fail_interrupted_trials(storage, study_name, location)
                more = cfg.tune.num_samples - accounted_trials(storage, study_name, location)
                if more > 0:
                    name = tune_run_name(len(segments))
                    if segments:
                        print(f"tune.num_samples is {cfg.tune.num_samples}: {more} more trial(s) on the study "
                              f"(Tune's run {name})", flush=True)
                    segments.append({"name": name, "num_samples": more})
                    write_manifest()
                    expected = more
                    tuner = _new_tuner(ctx, location, name, cfg, storage=storage, study_name=study_name,
                                       num_samples=more, sampler=sampler, uri=uri, exp_dir=exp_dir, verbose=verbose)
                    unfinished = unfinished_trials(tuner.fit(), expected)
                    if not unfinished:
                        interrupted += fail_interrupted_trials(storage, study_name, location)
            if cfg.tune.reeval.top_k and not unfinished:
                import optuna

                study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
                print(f"re-evaluating the {cfg.tune.reeval.top_k} best feasible trial(s) at "
                      f"{cfg.tune.reeval.seeds} more seed(s) each", flush=True)
                reevaluate(study, ctx, top_k=cfg.tune.reeval.top_k, seeds=cfg.tune.reeval.seeds,
                           log=lambda line: print(line, flush=True),
                           on_record=lambda _: publish_experiment(uri, exp_dir))  # a bucket keeps each record
        finally:
            if started:
                ray.shutdown()
        paths = export_results(exp_dir)
        publish_experiment(uri, exp_dir)
        if unfinished:
            raise KeyboardInterrupt(f"{unfinished} of {expected} trial(s) unfinished; Tune saved the experiment "
                                    f"({uri or exp_dir}) and its trials' checkpoints: run the same command with "
                                    "--resume to finish them and the search")
        return TuneRunResult(exp_dir, storage, study_name, pre, paths.trials, paths.best_config, paths.best,
                             trials_table(paths.table), {"mode": mode, "interrupted_trials": interrupted,
                                                         "experiment_uri": uri,
                                                         "tune_runs": [r["name"] for r in segments]})
