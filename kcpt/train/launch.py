"""Launch the plan on Ray Train: one ``TorchTrainer.fit()`` runs every requested stage.

``run_plan`` prepares (or reuses) the datasets the stages need, creates the run directory, decides where to
resume from, starts a local Ray when there is none (explicit ``num_cpus``), and runs
:func:`kcpt.train.loop.stage_loop_per_worker` on ``train.num_workers`` workers (DDP over gloo on CPU, NCCL on
GPU, or DeepSpeed ZeRO when ``train.deepspeed`` is set). ``FailureConfig(max_failures)`` replaces a dead worker
group, which resumes from the last checkpoint it reported.

The run directory must be visible to every worker and to the driver (one machine, or shared storage on a
cluster): checkpoints, metrics.jsonl and summary.json live there, and the Ray Train checkpoints are pointers to
the kcpt checkpoints in it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kcpt.config import KcptConfig
from kcpt.errors import CheckpointError, ConfigError, KcptError, TrainingAborted
from kcpt.train import checkpoint as ckpt_lib
from kcpt.train.loop import LocalSession, check_baselines, datasets_needed, expected_manifest, stage_loop_per_worker
from kcpt.train.rundir import RunDir, read_metrics, run_dir_for

log = logging.getLogger(__name__)

__all__ = ["PlanResult", "run_plan", "stage_loop_per_worker", "latest_checkpoint"]


@dataclass
class PlanResult:
    """What a plan run leaves: per-stage summaries (see ``summary.json``), best checkpoints, the baseline."""

    run_dir: Path
    summaries: dict[str, dict[str, Any]]
    best_checkpoints: dict[str, str | None]
    baseline_raw_best: float | None
    stages: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir)


def latest_checkpoint(run_dir: RunDir, stages: list[str]) -> Path | None:
    """The most advanced checkpoint of the run (by stage position, then step), or None."""
    return run_dir.latest_checkpoint(stages)


def _start_ray(cfg: KcptConfig, address: str | None) -> bool:
    """Join ``address`` / ``RAY_ADDRESS`` or start a local Ray sized for the workers (:mod:`kcpt.raystart`); True
    if this call started it."""
    from kcpt.raystart import start_ray

    need = math.ceil(cfg.train.num_workers * cfg.train.cpus_per_worker) + 1
    if not start_ray(address, num_cpus=need, num_gpus=cfg.train.num_workers if cfg.train.use_gpu else None):
        return False
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = cfg.logging.progress
    return True


def run_plan(cfg: KcptConfig, *, stages: list[str] | None = None, run_dir: Path | None = None,
             init_checkpoint: Path | None = None, baseline_raw_best: float | None = None,
             resume: Literal["auto", "never", "overwrite"] = "auto", force: bool = False, address: str | None = None,
             callbacks: list | None = None, reference_checkpoint: Path | None = None,
             in_process: bool = False) -> PlanResult:
    """Run ``stages`` (default: the whole plan, in order) in one Ray Train ``fit()``; returns the summaries.

    - ``init_checkpoint``: the first stage starts from these weights (e.g. stage 3 from the stage-2 best);
    - ``baseline_raw_best``: the raw baseline for gate/exam rules when no stage of this run sets it;
    - ``reference_checkpoint``: the KL reference for ``kl_reference: cpt_best`` when this run has no CPT stage
      (default: ``init_checkpoint``);
    - ``resume="auto"``: continue exactly from the run directory's latest checkpoint if there is one (its
      tokenizer/data hashes must match unless ``force``); ``"never"``: a new run — refused (InputError naming
      ``--resume`` and ``--overwrite``) if the run directory already holds results (:meth:`RunDir.has_results`);
      ``"overwrite"``: start over, deleting the previous results once everything was validated;
    - ``address``: an existing Ray cluster; default a local Ray started (and stopped) here;
    - ``callbacks``: passed to ``RunConfig(callbacks=...)``;
    - ``in_process``: no Ray — one worker in this process (debugging, fast tests; ``train.num_workers`` ignored).

    A stage whose stop rule needs ``baseline_raw_best`` that neither an earlier stage nor ``baseline_raw_best``
    provides is refused here, before anything runs. A deterministic abort inside the loop (too many anomaly
    rollbacks) raises :class:`TrainingAborted` once, with the run directory as the last checkpoint left it.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from kcpt.data.prepare import prepare_all

    stages = list(stages) if stages is not None else [s.name for s in cfg.plan]
    if not stages:
        raise ConfigError("plan: no stage to run")
    for s in stages:
        try:
            cfg.stage(s)
        except KeyError:
            raise ConfigError(f"stages: no stage named '{s}' in plan ({[x.name for x in cfg.plan]})") from None
    check_baselines(cfg, stages, baseline_raw_best)
    if resume not in ("auto", "never", "overwrite"):
        raise ConfigError(f"resume must be 'auto', 'never' or 'overwrite', got {resume!r}")
    rd = RunDir(Path(run_dir) if run_dir is not None else run_dir_for(cfg)).root.resolve()
    rd = RunDir(rd)
    rd.check_owned()  # never write into (or clean) a directory kcpt did not create
    if resume == "never":
        rd.refuse_existing()  # no silent destruction: only "overwrite" replaces a run that has results

    # Validate everything (inputs exist and read, tokenizer loads, checkpoints fit) before deleting anything.
    if cfg.train.deepspeed is not None:
        from kcpt.train.engine import deepspeed_config

        deepspeed_config(cfg)  # the user's DeepSpeed JSON merges with kcpt's keys (ConfigError otherwise)
    needed = datasets_needed(cfg, stages)
    prepared = prepare_all(cfg, needed, progress=cfg.logging.progress, address=address)
    prepared = {k: Path(v).resolve() for k, v in prepared.items()}
    expected = expected_manifest(cfg, prepared)
    for p, what in ((init_checkpoint, "init_checkpoint"), (reference_checkpoint, "reference_checkpoint")):
        if p is not None:
            if not Path(p).is_dir():
                raise CheckpointError(f"{what} {p}: not a directory")
            ckpt_lib.check_compatible(ckpt_lib.read_manifest(p), expected, mode="weights_only", force=force)
            ckpt_lib.verify_weights(p)

    resume_from: Path | None = None
    if resume in ("never", "overwrite"):
        protect = [Path(i) for n in needed for i in cfg.data.datasets[n].inputs if not i.startswith("demo:")]
        protect += [Path(p) for p in (init_checkpoint, reference_checkpoint) if p is not None]
        rd.start_over(protect)
    rd.create(cfg)
    rd.aborted_path.unlink(missing_ok=True)
    ckpt_lib.remove_stale_temps(rd.checkpoints)  # leftovers of saves killed in an earlier attempt
    if resume == "auto":
        resume_from = latest_checkpoint(rd, stages)
        if resume_from is not None:
            ckpt_lib.check_compatible(ckpt_lib.read_manifest(resume_from), expected, mode="full", force=force)
            state = ckpt_lib.load_trainer_state(resume_from)
            order = (state.get("plan") or {}).get("stage_order") if isinstance(state.get("plan"), dict) else None
            if order != stages:
                raise CheckpointError(f"{resume_from}: the run directory holds a run of stages "
                                      f"{order}, not {stages}; use another run name or "
                                      "--overwrite")
            ckpt_lib.verify_weights(resume_from)
            log.info("resuming from %s", resume_from)

    t = cfg.train
    loop_config = {
        "cfg": cfg.model_dump(mode="json"), "stages": stages, "run_dir": str(rd.root),
        "prepared": {k: str(v) for k, v in prepared.items()},
        "init_checkpoint": str(Path(init_checkpoint).resolve()) if init_checkpoint else None,
        "reference_checkpoint": str(Path(reference_checkpoint).resolve()) if reference_checkpoint else None,
        "baseline_raw_best": baseline_raw_best,
        "resume_from": str(resume_from) if resume_from else None,
    }
    t0 = time.perf_counter()
    if in_process:
        stage_loop_per_worker(loop_config, LocalSession())
        return _result(rd, stages, t0)
    started = _start_ray(cfg, address)
    try:
        trainer = TorchTrainer(
            stage_loop_per_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                         resources_per_worker={"CPU": t.cpus_per_worker,
                                                               **({"GPU": 1} if t.use_gpu else {})}),
            run_config=RunConfig(storage_path=str(rd.ray_storage), name=f"fit-{time.strftime('%Y%m%d-%H%M%S')}",
                                 failure_config=FailureConfig(max_failures=t.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 callbacks=callbacks),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except KcptError:
        raise
    except Exception as e:  # unwrap Ray's wrapper around a KcptError raised inside a worker
        cause: BaseException | None = e
        while cause is not None:
            if isinstance(cause, KcptError):
                raise type(cause)(str(cause)) from e
            cause = cause.__cause__ or getattr(cause, "cause", None)
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    return _result(rd, stages, t0)


def _result(rd: RunDir, stages: list[str], t0: float) -> PlanResult:
    aborted = rd.read_aborted()
    if aborted is not None:
        raise TrainingAborted(aborted)
    summary = rd.read_summary()
    summaries = {s: summary["stages"][s] for s in stages if s in summary.get("stages", {})}
    return PlanResult(run_dir=rd.root, summaries=summaries,
                      best_checkpoints={s: v.get("best_checkpoint") for s, v in summaries.items()},
                      baseline_raw_best=summary.get("baseline_raw_best"), stages=stages,
                      wall_s=time.perf_counter() - t0)
