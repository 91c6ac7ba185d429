"""Launch the plan on Ray Train: one ``TorchTrainer.fit()`` runs every requested stage.

``run_plan`` prepares (or reuses) the datasets the stages need, creates the run directory, decides where to
resume from, starts a local Ray when there is none (explicit ``num_cpus``), and runs
:func:`kcpt.train.loop.stage_loop_per_worker` on ``train.num_workers`` workers (DDP over gloo on CPU, NCCL on
GPU, or DeepSpeed ZeRO when ``train.deepspeed`` is set). ``FailureConfig(max_failures)`` replaces a dead worker
group, which resumes from the last checkpoint it reported.

Storage: ``train.output_dir`` and ``data.prepared_root`` (and checkpoints passed in) may be local paths, shared-FS
paths or URIs (``s3://``, ``gs://``; :mod:`kcpt.storage`). With URIs nothing is shared between nodes but the
object store: workers download prepared data and checkpoints into node-local scratch, rank 0 publishes run files
and checkpoints (manifest last). On a multi-node Ray cluster a relative local path is refused (it would name a
different directory on every node); an absolute local path is taken to be a shared filesystem.
Ray Train's own storage (``RunConfig(storage_path=<run>/ray)``) holds pointers to the kcpt checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kcpt import storage
from kcpt.config import KcptConfig, load_config, only_relaid_out, rows_per_step, training_changes
from kcpt.console import Console, console_feed, is_tty
from kcpt.data.report import announce_data
from kcpt.data.shards import fetch_prepared, read_manifest
from kcpt.errors import CheckpointError, ConfigError, KcptError, Terminated, TrainingAborted
from kcpt.train import checkpoint as ckpt_lib
from kcpt.train.engine import check_engine_state
from kcpt.train.layout import step_micro_batches
from kcpt.train.plan import (
    check_baselines,
    check_rows,
    datasets_needed,
    expected_manifest,
    held_out_warnings,
    stage_sources,
    stage_warnings,
)
from kcpt.train.rundir import RunDir, read_metrics, run_dir_of
from kcpt.train.streams import ShardReader
from kcpt.train.worker_errors import ErrorBox

log = logging.getLogger(__name__)

__all__ = ["PlanResult", "run_plan", "stage_loop_per_worker", "latest_checkpoint", "one_worker",
           "worker_resources"]


@dataclass
class PlanResult:
    """What a plan run leaves: per-stage summaries (see ``summary.json``), best checkpoints, the baseline."""

    run_dir: Path | str
    """The run directory: a local path, or its URI."""
    summaries: dict[str, dict[str, Any]]
    best_checkpoints: dict[str, str | None]
    baseline_raw_best: float | None
    stages: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir)


def stage_loop_per_worker(config: dict[str, Any], session: Any = None) -> None:
    """Each Ray Train worker's entry: :func:`kcpt.train.loop.stage_loop_per_worker`, imported where it runs (the
    driver never loads torch / transformers for it: ~4 s less per job start)."""
    from kcpt.train import loop

    loop.stage_loop_per_worker(config, session)


def latest_checkpoint(run_dir: RunDir, stages: list[str]) -> str | None:
    """The ref (path or URI) of the most advanced checkpoint of the run (by stage position, then step), or None."""
    return run_dir.latest_checkpoint(stages)


def check_cluster_paths(cfg: KcptConfig, run_dir: str | Path | None, checkpoints: list[str | Path | None]) -> None:
    """On a Ray cluster of more than one node, refuse relative local paths for what workers read or write (each
    node would resolve them in its own working directory)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    named = [("train.output_dir", cfg.train.output_dir), ("data.prepared_root", cfg.data.prepared_root),
             ("--run-dir", run_dir), *(("checkpoint", c) for c in checkpoints)]
    for key, value in named:
        if value is None or storage.is_uri(str(value)):
            continue
        if not Path(str(value)).expanduser().is_absolute():
            raise ConfigError(f"{key}: '{value}' is a relative local path, but this Ray cluster has {len(nodes)} "
                              "nodes that do not share a working directory: use an object-store URI "
                              "(s3://bucket/prefix, gs://bucket/prefix) or an absolute path on a filesystem every "
                              "node mounts (EFS, Filestore, NFS)")


def _start_ray(cfg: KcptConfig, address: str | None) -> bool:
    """Join ``address`` / ``RAY_ADDRESS`` or start a local Ray sized for the workers (:mod:`kcpt.raystart`); True
    if this call started it."""
    from kcpt.raystart import start_ray

    need = math.ceil(cfg.train.num_workers * cfg.train.cpus_per_worker) + 1
    # no dashboard: this driver owns the Train run, so a leaked placement group ends with the job (kcpt.raystart)
    if not start_ray(address, num_cpus=need, num_gpus=cfg.train.num_workers if cfg.train.use_gpu else None,
                     verbose=cfg.logging.verbose, dashboard=False):
        return False
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = cfg.logging.progress
    return True


def run_plan(cfg: KcptConfig, *, stages: list[str] | None = None, run_dir: Path | str | None = None,
             init_checkpoint: Path | str | None = None, baseline_raw_best: float | None = None,
             resume: Literal["auto", "never", "overwrite"] = "auto", force: bool = False, address: str | None = None,
             callbacks: list | None = None, reference_checkpoint: Path | str | None = None,
             in_process: bool = False, in_task: bool = False, console: bool = True, data_table: bool = True,
             on_report: Callable[[dict[str, Any], str | None], None] | None = None) -> PlanResult:
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
    - ``in_process``: no Ray Train — one worker in this process (debugging, fast tests, a Tune trial at world
      size 1; ``train.num_workers`` ignored); ``on_report(metrics, checkpoint_path)`` then receives each eval
      report as the loop makes it (what a Ray Train callback's ``after_report`` gets on the Ray Train path);
    - ``in_task``: no Ray Train at world size 1 (``train.num_workers`` 1, no DeepSpeed) — the one worker runs in a
      Ray task holding one worker's resources (``cpus_per_worker``, 1 GPU with ``use_gpu``), so no Train controller
      or worker group starts (the tune's prerequisite stages, :func:`kcpt.tune.launch.ensure_prerequisites`). A
      task that dies or raises anything but a KcptError is retried up to ``train.max_failures`` times and continues
      from the run directory's latest checkpoint, as a replaced Train worker group does; ``data.loader: ray_data``
      reads like ``stream`` there (no trainer datasets), as in-process;
    - ``console``: print the eval lines / progress bars and the stage decisions here (:mod:`kcpt.console`);
    - ``data_table``: print the data table (:mod:`kcpt.data.report`) before training and apply
      ``data.max_reject_fraction`` (InputError, before anything is deleted or trained).

    A stage whose stop rule needs ``baseline_raw_best`` that neither an earlier stage nor ``baseline_raw_best``
    provides is refused here, before anything runs. A deterministic abort inside the loop (too many anomaly
    rollbacks) raises :class:`TrainingAborted` once, with the run directory as the last checkpoint left it.
    """
    cfg = absolute_model_paths(cfg)
    check_positions(cfg)
    stages = list(stages) if stages is not None else [s.name for s in cfg.plan]
    if not stages:
        raise ConfigError("plan: no stage to run")
    for s in stages:
        try:
            cfg.stage(s)
        except KeyError:
            raise ConfigError(f"stages: no stage named '{s}' in plan ({[x.name for x in cfg.plan]})") from None
    check_baselines(cfg, stages, baseline_raw_best, reference_checkpoint=reference_checkpoint,
                    init_checkpoint=init_checkpoint)
    if on_report is not None and not in_process:
        raise ConfigError("run_plan: on_report is for in_process runs (Ray Train runs take callbacks)")
    if in_task and (in_process or not one_worker(cfg)):
        raise ConfigError("run_plan: in_task runs one worker in a Ray task: train.num_workers must be 1, without "
                          "DeepSpeed and without in_process")
    if resume not in ("auto", "never", "overwrite"):
        raise ConfigError(f"resume must be 'auto', 'never' or 'overwrite', got {resume!r}")
    for key, value in (("train.output_dir", cfg.train.output_dir), ("data.prepared_root", cfg.data.prepared_root),
                       ("run_dir", run_dir)):
        if value is not None:
            storage.check_uri(str(value), key)
    rd = run_dir_of(cfg, run_dir)
    rd.check_owned()  # never write into (or clean) a directory kcpt did not create
    with rd.in_use():  # one run at a time in a local run directory
        if resume == "never":
            rd.refuse_existing()  # no silent destruction: only "overwrite" replaces a run that has results
        if cfg.train.deepspeed is not None:
            from kcpt.train.engine import deepspeed_config

            deepspeed_config(cfg)  # the user's DeepSpeed JSON merges with kcpt's keys (ConfigError otherwise)
        init_checkpoint, reference_checkpoint = (
            None if c is None else str(c) if storage.is_uri(str(c)) else str(storage.local_path(str(c)))
            for c in (init_checkpoint, reference_checkpoint))
        started = False
        if not in_process:
            started = _start_ray(cfg, address)
        on_term = _raise_on_sigterm()
        try:
            if not in_process:
                check_cluster_paths(cfg, run_dir, [init_checkpoint, reference_checkpoint])
            return _run_plan(cfg, stages, rd, init_checkpoint=init_checkpoint,
                             reference_checkpoint=reference_checkpoint, baseline_raw_best=baseline_raw_best,
                             resume=resume, force=force, callbacks=callbacks, in_process=in_process, in_task=in_task,
                             address=address, console=console, data_table=data_table, on_report=on_report)
        except KeyboardInterrupt as e:
            kind = Terminated if isinstance(e, Terminated) or _SIGTERMS else KeyboardInterrupt
            raise kind(f"{rd.location} keeps its last complete checkpoint; run the same command with --resume to "
                       "continue") from None
        finally:
            if on_term is not None:
                signal.signal(signal.SIGTERM, on_term)
            if started:
                import ray

                ray.shutdown()


_SIGTERMS: list[float] = []
"""When this process received a SIGTERM while a plan ran (:func:`_raise_on_sigterm`)."""


def absolute_model_paths(cfg: KcptConfig) -> KcptConfig:
    """``cfg`` with a relative local ``model.name_or_path`` / ``tokenizer.path`` (one that exists here) made
    absolute: workers run in other working directories (a relative path would be taken for a hub name there)."""
    changes = {}
    for section, key in (("model", "name_or_path"), ("tokenizer", "path")):
        v = getattr(getattr(cfg, section), key)
        if v not in ("tiny", "demo") and not storage.is_uri(v) and not Path(v).expanduser().is_absolute() \
                and Path(v).expanduser().exists():
            changes[section] = getattr(cfg, section).model_copy(update={key: str(Path(v).expanduser().resolve())})
    return cfg.model_copy(update=changes) if changes else cfg


def local_model_config(cfg: KcptConfig) -> dict[str, Any]:
    """The ``config.json`` of a local ``model.name_or_path`` directory, or {} (the built-in tiny model, a hub name,
    or a file the loader will report as damaged)."""
    path = Path(cfg.model.name_or_path).expanduser() / "config.json"
    if cfg.model.name_or_path == "tiny" or not path.is_file():
        return {}
    try:
        mc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return mc if isinstance(mc, dict) else {}


LEARNED_POSITIONS = ("gpt2", "gpt_neo", "gpt_bigcode", "opt", "biogpt", "xglm", "codegen", "bert")
"""``model_type`` s whose position embeddings are a table: a row longer than it fails with an index error."""


def check_positions(cfg: KcptConfig) -> None:
    """ConfigError, before anything starts, when a local model's learned position table is shorter than
    ``data.seq_len`` (each packed row is that long): it would fail inside every worker with an IndexError."""
    mc = local_model_config(cfg)
    n = mc.get("n_positions") or mc.get("max_position_embeddings")
    if mc.get("model_type") in LEARNED_POSITIONS and isinstance(n, int) and n < cfg.data.seq_len:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len} is longer than the {n} positions of "
                          f"{cfg.model.name_or_path} "
                          f"(a {mc.get('model_type')} model learns a table of positions): set data.seq_len={n} or "
                          "less, or use a model with more positions")


def vocab_warnings(cfg: KcptConfig, manifests: dict[str, dict[str, Any]]) -> list[str]:
    """A console warning when a local model has fewer embedding rows than the tokenizer has tokens: the loader
    grows it (``resize_token_embeddings``) and the new rows start random, which only a worker's log used to say."""
    vocab = next((m.get("vocab_size") for m in manifests.values() if m.get("vocab_size")), None)
    rows = local_model_config(cfg).get("vocab_size")
    if not isinstance(rows, int) or not isinstance(vocab, int) or rows >= vocab:
        return []
    return [f"warning: {cfg.model.name_or_path} has {rows} embedding rows and the tokenizer {vocab} tokens: rows "
            f"{rows}..{vocab - 1} are added with random values. For new tokens with a folded init (the mean of "
            "their pieces), expand the model with `kcpt audit-tokenizer --expand N --model DIR --out DIR`"]


def _raise_on_sigterm() -> Any:
    """In the main thread: make a SIGTERM raise :class:`~kcpt.errors.Terminated` (Ray's driver would otherwise
    dump a stack trace and abort). Returns the handler it replaced (None when not in the main thread)."""
    _SIGTERMS.clear()  # one run's record: a later Ctrl-C in this process is not a SIGTERM
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminated(signum: int, frame: Any) -> None:
        _SIGTERMS.append(time.time())  # Ray's code between here and run_plan may turn the exception into another
        raise Terminated()

    return signal.signal(signal.SIGTERM, terminated)


def _run_plan(cfg: KcptConfig, stages: list[str], rd: RunDir, *, init_checkpoint: str | None,
              reference_checkpoint: str | None, baseline_raw_best: float | None, resume: str, force: bool,
              callbacks: list | None, in_process: bool, address: str | None, console: bool,
              data_table: bool, on_report: Callable[[dict[str, Any], str | None], None] | None = None,
              in_task: bool = False) -> PlanResult:
    from kcpt.data.prepare import prepare_all

    # Validate everything (inputs exist and read, tokenizer loads, checkpoints fit) before deleting anything.
    needed = datasets_needed(cfg, stages)
    statuses: dict[str, str] = {}
    prepared = {k: v if storage.is_uri(str(v)) else Path(v).resolve()
                for k, v in prepare_all(cfg, needed, progress=cfg.logging.progress and is_tty(),
                                        address=address, statuses=statuses).items()}
    if data_table:
        announce_data(prepared, statuses, limit=cfg.data.max_reject_fraction,
                      filters=cfg.data.filters.model_dump(mode="json"))
    local_prepared = {k: fetch_prepared(v, shards=False) for k, v in prepared.items()}
    overlap = held_out_warnings(cfg, stages, local_prepared)  # an InputError with data.held_out_overlap=error
    if data_table and overlap:
        print("\n".join(overlap), flush=True)
    manifests = {k: read_manifest(v) for k, v in local_prepared.items()}
    if console:
        for line in [*vocab_warnings(cfg, manifests), *stage_warnings(cfg, stages)]:
            print(line, flush=True)
    expected = expected_manifest(cfg, local_prepared)
    world = 1 if in_process or in_task else cfg.train.num_workers
    check_rows(cfg, stages, manifests, world)
    for name, ref in prepared.items():  # every shard's footer, here: a damaged cache is named before workers start
        ShardReader(str(ref), seq_len=cfg.data.seq_len, name=name)
    for p, what in ((init_checkpoint, "init_checkpoint"), (reference_checkpoint, "reference_checkpoint")):
        if p is not None:
            if not storage.is_uri(str(p)) and not Path(p).is_dir():
                raise CheckpointError(f"{what} {p}: not a directory")
            try:
                manifest, _ = ckpt_lib.inspect(p)  # the workers download the weights, on their own nodes
            except CheckpointError as e:  # which of the two it was
                raise CheckpointError(f"{what}: {e}") from None
            ckpt_lib.check_compatible(manifest, expected, mode="weights_only", force=force, where=f"{what} {p}")
            if what == "init_checkpoint" and cfg.stage(stages[0]).restore == "full":
                weights_only = f"set plan stage '{stages[0]}' restore: weights_only (its optimizer starts fresh)"
                check_engine_state(p, manifest, cfg, fix=f"{weights_only}, or train it with the engine that wrote it")
                _announce_repartition(p, manifest, world, console=console)

    resume_from: str | None = None
    if resume in ("never", "overwrite"):
        protect = [Path(i) for n in needed for i in cfg.data.datasets[n].inputs
                   if not i.startswith("demo:") and not storage.is_uri(i)]
        protect += [Path(p) for p in (init_checkpoint, reference_checkpoint) if p is not None and not storage.is_uri(p)]
        rd.start_over(protect)
    if resume == "auto":  # checked before config.yaml is written: a refused resume leaves the run as it was
        rd.check_owned()
        resume_from = latest_checkpoint(rd, stages)
        if resume_from is not None:
            try:
                manifest, local = ckpt_lib.inspect(resume_from)  # not the weights and the optimizer state
            except CheckpointError as e:
                raise CheckpointError(f"{e}. {_damaged_latest_advice(rd, stages, resume_from)}") from None
            check_engine_state(resume_from, manifest, cfg, fix="resume with the run's own train.deepspeed setting "
                               f"(see {rd.config_path.name}), or start a new run from its weights "
                               f"(--init-checkpoint {resume_from}; restore weights_only: the optimizer starts fresh)")
            where = f"the checkpoint to resume from, {resume_from},"
            try:
                ckpt_lib.check_compatible(manifest, expected, mode="full", force=force, where=where)
            except CheckpointError as e:
                before = _recorded(rd)
                relaid = _relaid_out(before, cfg, manifest)
                if relaid is None:
                    raise CheckpointError(_with_config_changes(str(e), before, cfg)) from None
                ckpt_lib.check_compatible(manifest, {k: v for k, v in expected.items() if k != "config_sha256"},
                                          mode="full", where=where)  # the tokenizer and the data still must match
                log.info(relaid)
                if console:
                    print(relaid, flush=True)
            _announce_repartition(resume_from, manifest, world, console=console)
            try:
                state = ckpt_lib.load_trainer_state(local, check_files=False)  # inspect checked them
            except CheckpointError as e:
                raise CheckpointError(f"{e}. {_damaged_latest_advice(rd, stages, resume_from)}") from None
            order = (state.get("plan") or {}).get("stage_order") if isinstance(state.get("plan"), dict) else None
            if order != stages:
                raise CheckpointError(f"{resume_from}: the run directory holds a run of stages "
                                      f"{order}, not {stages}; use another run name or "
                                      "--overwrite")
            log.info("resuming from %s", resume_from)
            if console:
                print(f"resuming from {resume_from} (stage '{manifest.get('stage')}', step {manifest.get('step')})",
                      flush=True)
    recorded = rd.recorded_config() if resume_from is not None else None
    rd.create(cfg)
    rd.clear_aborted()
    ckpt_lib.remove_stale_temps(rd.checkpoints)  # leftovers of saves killed in an earlier attempt
    try:
        return _train(cfg, stages, rd, prepared, init_checkpoint=init_checkpoint,
                      reference_checkpoint=reference_checkpoint, baseline_raw_best=baseline_raw_best,
                      resume_from=resume_from, callbacks=callbacks, in_process=in_process, in_task=in_task,
                      console=console, on_report=on_report)
    except KcptError as e:
        # refused inside a worker before this attempt saved anything (e.g. a checkpoint the loop cannot load):
        # config.yaml goes back to the config the run's checkpoints were made with
        if recorded is not None and not isinstance(e, TrainingAborted) \
                and latest_checkpoint(rd, stages) == resume_from:
            rd.restore_config(recorded)
        if isinstance(e, CheckpointError) and resume_from is not None and str(resume_from) in str(e) \
                and "--resume" not in str(e):  # the checkpoint resumed from is damaged (e.g. a checksum differs)
            raise CheckpointError(f"{e}. {_damaged_latest_advice(rd, stages, str(resume_from))}") from None
        raise


def _train(cfg: KcptConfig, stages: list[str], rd: RunDir, prepared: dict[str, Any], *,
           init_checkpoint: str | None, reference_checkpoint: str | None, baseline_raw_best: float | None,
           resume_from: str | None, callbacks: list | None, in_process: bool, in_task: bool, console: bool,
           on_report: Callable[[dict[str, Any], str | None], None] | None) -> PlanResult:
    """Run the stages on the created run directory: in-process, in one Ray task, or on Ray Train."""
    loop_config = {
        "cfg": cfg.model_dump(mode="json"), "stages": stages, "run_dir": rd.location,
        "prepared": {k: str(v) for k, v in prepared.items()},
        "init_checkpoint": init_checkpoint, "reference_checkpoint": reference_checkpoint,
        "baseline_raw_best": baseline_raw_best,
        "resume_from": str(resume_from) if resume_from else None,
    }
    t0 = time.perf_counter()
    shown = Console(progress=cfg.logging.progress) if console else None
    with console_feed(shown, in_process=in_process) as feed:
        loop_config["console"] = feed
        if in_process:
            from kcpt.train.loop import LocalSession

            stage_loop_per_worker(loop_config, LocalSession(on_report))
            return _result(rd, stages, t0)
        if in_task:
            _run_task(cfg, loop_config)
        else:
            _fit(cfg, loop_config, rd, callbacks)
    return _result(rd, stages, t0)


def _damaged_latest_advice(rd: RunDir, stages: list[str], latest: str) -> str:
    """What to do when the newest checkpoint of a run cannot be resumed from: move it away, and the next resume
    takes the one before it (kcpt never picks another checkpoint by itself: the damage may be worth a look)."""
    names = rd.checkpoint_names(stages)
    name = latest.rstrip("/").rsplit("/", 1)[-1]
    before = names[names.index(name) - 1] if name in names and names.index(name) > 0 else None
    then = (f"continues from the checkpoint before it, {rd.checkpoint_ref(before)}" if before is not None
            else "starts the run over (it has no other checkpoint)")
    return (f"It is the newest checkpoint of {rd.location}: move it out of the run's checkpoints directory (or delete "
            f"it) and run the same command with --resume, which then {then}")


def _announce_repartition(ref: str | Path, manifest: dict[str, Any], world: int, *, console: bool) -> None:
    """Say so when checkpoint ``ref``'s DeepSpeed ZeRO state was partitioned over another number of ranks than this
    run's workers: each node then converts it to DeepSpeed's universal checkpoint (:mod:`kcpt.train.universal`),
    which needs the whole state on the node, twice."""
    n = ckpt_lib.zero_world(manifest)
    if n is None or n == world:
        return
    size = sum(s for name, s in (manifest.get("files") or {}).items() if name.startswith(f"{ckpt_lib.ENGINE_DIR}/"))
    line = (f"{ref}: its DeepSpeed ZeRO state is partitioned over {n} ranks and this run has {world} worker(s): "
            f"each node converts it once to DeepSpeed's universal checkpoint and re-partitions it "
            f"(about {2 * size / 1e9:.2f} GB of node scratch: all {n} partitions and the converted copy)")
    log.info(line)
    if console:
        print(line, flush=True)


def _recorded(rd: RunDir) -> KcptConfig | None:
    """The config the run last started with (its ``config.yaml``, from the bucket at a URI); None if absent or
    written by another kcpt version."""
    if rd.remote is not None and rd.remote.is_file("config.yaml"):
        rd.remote.download_file("config.yaml", rd.config_path)
    if not rd.config_path.is_file():
        return None
    try:
        return load_config(rd.config_path)
    except KcptError:
        return None


def _relaid_out(before: KcptConfig | None, cfg: KcptConfig, manifest: dict[str, Any]) -> str | None:
    """A resume whose config differs from the checkpoint's only in how each step's rows are laid out over workers,
    accumulation and micro-batches, with the same rows per step (:func:`kcpt.config.only_relaid_out`; e.g. a node
    lost, its share moved into ``grad_accum``): the line that says so; None otherwise (the resume is refused as
    before); a :class:`CheckpointError` for another micro-batch size under ``data.loader: ray_data``. ``before``,
    the run's ``config.yaml`` (:func:`_recorded`), stands for the checkpoint's config when its hash is the
    checkpoint's."""
    if before is None or before.training_sha256() != manifest.get("config_sha256") or not only_relaid_out(before,
                                                                                                           cfg):
        return None
    t0, t1 = before.train, cfg.train
    if cfg.data.loader == "ray_data" and _micro(before) != _micro(cfg):
        raise CheckpointError(
            f"cannot resume {manifest.get('stage')!r} at another micro-batch size ({_micro(before)} → {_micro(cfg)} "
            "rows) with data.loader ray_data: its data position is a count of rows of a shuffle cut into batches of "
            "the old size. Keep each stage's micro-batch size and make up the rows per step with train.grad_accum, "
            "or start a new run from the checkpoint's weights (--init-checkpoint)")
    line = (f"resuming with each step's rows laid out anew — train.num_workers {t0.num_workers} → {t1.num_workers}, "
            f"grad_accum {t0.grad_accum} → {t1.grad_accum}, micro-batch {_micro(before)} → {_micro(cfg)} rows — "
            f"the same rows per step ({_micro(rows_per_step(cfg))}): the run goes on as configured")
    if cfg.data.loader != "ray_data":
        return f"{line}, each source with the rows of its epoch no worker has read yet"
    if t0.num_workers != t1.num_workers and t1.min_workers is None:  # (elastic: the workers say over how many)
        workers = f"{t1.num_workers} worker{'s' if t1.num_workers != 1 else ''}"
        return (f"{line}; data.loader ray_data splits each source's current epoch anew over {workers}: rows of it "
                "already read may come again, others wait for the next epoch (the stream and memory loaders go on "
                "with exactly the rows not read yet)")
    return line


def _micro(x: KcptConfig | dict[str, int]) -> str:
    """One number if every stage has the same, else ``stage=n`` pairs."""
    per = x if isinstance(x, dict) else {st.name: x.micro_batch(st) for st in x.plan}
    values = set(per.values())
    return str(values.pop()) if len(values) == 1 else ", ".join(f"{k}={v}" for k, v in per.items())


def _with_config_changes(message: str, before: KcptConfig | None, cfg: KcptConfig) -> str:
    """A resume refused for its config: name the keys that changed since the run's ``config.yaml`` (the config
    the run last started with) and what to do."""
    if "config_sha256" not in message:
        return message
    if before is None:  # absent, or written by another kcpt version: the hash alone has to do
        return message
    changes = training_changes(before, cfg)
    if not changes:
        return message
    head = message.removesuffix(" Pass --force to override.").rstrip(".")
    layout = ""
    if rows_per_step(before) != rows_per_step(cfg) and any(
            k in c for c in changes for k in ("num_workers", "grad_accum", "micro_batch_size")):
        layout = (f" On another number of workers, keep each stage's rows per step (micro-batch · grad_accum · "
                  f"num_workers: {_micro(rows_per_step(before))}, now {_micro(rows_per_step(cfg))}): a change of the "
                  "layout alone then needs no --force.")
    return (f"{head}. Changed since the run's config.yaml: {'; '.join(changes)}. Set them back to continue the run, "
            f"start another (--run-name, or --overwrite), or pass --force to continue with the new values.{layout}")


def _fit(cfg: KcptConfig, loop_config: dict[str, Any], rd: RunDir, callbacks: list | None) -> None:
    """One ``TorchTrainer.fit()``; a KcptError raised in a worker is raised here as itself, without the retries
    ``train.max_failures`` gives a worker death (:mod:`kcpt.train.worker_errors`); anything else as Ray's error
    (which carries the worker's traceback)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    box = ErrorBox()
    loop_config = {**loop_config, "errors": box}
    data: dict[str, Any] = {}
    if cfg.data.loader == "ray_data":  # each training source a Ray Dataset, split equally across the readers
        from kcpt.train.ray_stream import data_config, source_datasets

        names = list(dict.fromkeys(s for st in loop_config["stages"] for s in stage_sources(cfg.stage(st))))
        data = {"datasets": source_datasets(cfg, loop_config["prepared"], names),
                "dataset_config": data_config(names, step_micro_batches(cfg))}
    workers: int | tuple[int, int] = t.num_workers
    elastic: dict[str, float] = {}
    if t.min_workers is not None and t.min_workers < t.num_workers:  # elastic: Ray Train sizes the worker group
        workers = (t.min_workers, t.num_workers)
        if t.elastic_resize_interval_s is not None:
            elastic["elastic_resize_monitor_interval_s"] = t.elastic_resize_interval_s
        log.info("elastic training on %d to %d workers (train.min_workers, train.num_workers)", *workers)
    try:
        trainer = TorchTrainer(
            stage_loop_per_worker,
            train_loop_config=loop_config,
            **data,
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=t.use_gpu, **elastic,
                                         resources_per_worker={"CPU": t.cpus_per_worker,
                                                               **({"GPU": 1} if t.use_gpu else {})}),
            run_config=RunConfig(storage_path=rd.ray_storage_location, name=f"fit-{time.strftime('%Y%m%d-%H%M%S')}",
                                 failure_config=FailureConfig(max_failures=t.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 callbacks=callbacks),
        )
        try:
            result = trainer.fit()
        except SystemExit as e:  # Ray Train's own SIGINT handler (installed by fit) ends a Ctrl-C'd run this way
            raise KeyboardInterrupt from e
        if result.error is not None:
            raise result.error
    except Exception as e:
        _raise_recorded(box, e)
        raise_worker_failure(e, rd.location)
        raise
    else:
        _raise_recorded(box, None)
    finally:
        box.close()


def raise_worker_failure(e: BaseException, location: str) -> None:
    """For a Ray Train run that failed with ``e`` (after its retries): raise the KcptError inside it as itself, or
    an OSError inside it (storage gone: an object store unreachable, a disk full) as one OSError that says the run
    keeps its last complete checkpoint and to resume (a command prints either as one line); return otherwise (a
    bug: the caller re-raises ``e`` with the worker's traceback)."""
    raise_worker_kcpt_error(e)
    io = worker_error(e, OSError)
    if io is not None and io is not e:
        raise OSError(f"{io}. {location} keeps its last complete checkpoint: once the storage works again, run the "
                      "same command with --resume") from e


def _raise_recorded(box: ErrorBox, cause: BaseException | None) -> None:
    """Raise the KcptError a worker recorded in ``box`` (its one-line message), if one did."""
    try:
        error, rank = box.recorded()
    except Exception:  # noqa: BLE001 - the actor is gone (Ray shut down): ``cause`` is what there is to report
        return
    if error is not None:
        log.info("rank %s raised %s; not retried (a KcptError is deterministic)", rank, type(error).__name__)
        raise type(error)(str(error)) from cause


def one_worker(cfg: KcptConfig) -> bool:
    """Whether ``cfg`` trains at world size 1 without DeepSpeed: a plan ``run_plan(in_task=True)`` can run."""
    return cfg.train.num_workers == 1 and cfg.train.deepspeed is None


def worker_resources(cfg: KcptConfig) -> dict[str, float]:
    """Ray resources of one worker: ``train.cpus_per_worker`` CPUs and, with ``train.use_gpu``, 1 GPU."""
    return {"CPU": cfg.train.cpus_per_worker, "GPU": 1.0 if cfg.train.use_gpu else 0.0}


def _task_loop(loop_config: dict[str, Any]) -> KcptError | None:
    """The one worker of an ``in_task`` run, in its Ray task. A KcptError (deterministic: a bad input, a refused
    checkpoint) is returned, not raised, so that Ray does not retry it; anything else is raised and retried."""
    from kcpt.train.loop import LocalSession

    try:
        stage_loop_per_worker(loop_config, LocalSession())
    except KcptError as e:
        return e
    return None


def _run_task(cfg: KcptConfig, loop_config: dict[str, Any]) -> None:
    """``run_plan(in_task=True)``: the loop in one Ray task with one worker's resources, retried up to
    ``train.max_failures`` times (each retry resumes from the run directory's latest checkpoint)."""
    import ray

    res = worker_resources(cfg)
    task = ray.remote(num_cpus=res["CPU"], num_gpus=res["GPU"], max_retries=cfg.train.max_failures,
                      retry_exceptions=True)(_task_loop)
    err = ray.get(task.remote(loop_config))
    if err is not None:
        raise err


def worker_kcpt_error(e: BaseException) -> KcptError | None:
    """The KcptError inside Ray's error ``e`` (its causes, a RayTaskError's ``cause``, a Train V2
    ``WorkerGroupError``'s ``worker_failures``), or None. Ray's ``RayTaskError(<KcptError class>)`` — the
    wrapper ``ray.get`` raises, a subclass of both, whose message is the remote traceback — is looked through
    to the error it wraps."""
    found = worker_error(e, KcptError)
    return found if isinstance(found, KcptError) else None


def worker_error(e: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]
                 ) -> BaseException | None:
    """The first error of ``kind`` inside Ray's error ``e`` (see :func:`worker_kcpt_error`), or None."""
    from ray.exceptions import RayTaskError

    todo: list[BaseException] = [e]
    seen: set[int] = set()
    while todo:
        err = todo.pop(0)
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, kind) and not isinstance(err, RayTaskError):
            return err
        todo += [c for c in (getattr(err, "cause", None), err.__cause__, getattr(err, "controller_failure", None))
                 if isinstance(c, BaseException)]
        todo += [c for c in (getattr(err, "worker_failures", None) or {}).values() if isinstance(c, BaseException)]
    return None


def raise_worker_kcpt_error(e: BaseException) -> None:
    """Raise the KcptError inside Ray's error ``e`` as itself (its one-line message, not Ray's traceback), chained
    to ``e``; return when there is none or ``e`` is that error (the caller re-raises ``e``)."""
    cause = worker_kcpt_error(e)
    if cause is not None and cause is not e:
        raise type(cause)(str(cause)) from e


def _result(rd: RunDir, stages: list[str], t0: float) -> PlanResult:
    rd.drop_local_checkpoints()  # the driver's copy of a checkpoint it resumed from (workers freed their own)
    aborted = rd.read_aborted()
    if aborted is not None:
        raise TrainingAborted(aborted)
    summary = rd.pull().read_summary()
    summaries = {s: summary["stages"][s] for s in stages if s in summary.get("stages", {})}
    return PlanResult(run_dir=rd.location if rd.remote is not None else rd.root, summaries=summaries,
                      best_checkpoints={s: v.get("best_checkpoint") for s, v in summaries.items()},
                      baseline_raw_best=summary.get("baseline_raw_best"), stages=stages,
                      wall_s=time.perf_counter() - t0)
