"""Plan-level helpers the driver needs without the training stack (no torch, no transformers imported here):
which sources a stage draws, their loss kinds, which datasets a run needs, the baseline check before any step,
and the hashes a checkpoint of the run must carry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kcpt.config import KcptConfig, StageConfig
from kcpt.data.report import DatasetReport
from kcpt.errors import ConfigError, InputError


def stage_sources(stage: StageConfig) -> list[str]:
    """Every source the stage can draw: its ``sources`` and the names in its ``mixture_schedule``."""
    return stage.drawn_sources()


def loss_kinds(cfg: KcptConfig, stage: StageConfig) -> dict[str, str]:
    """Loss per source: ``stage.losses`` or the default by dataset kind (raw → full, exam → answer_only)."""
    return {s: stage.losses.get(s, "full" if cfg.data.datasets[s].kind == "raw" else "answer_only")
            for s in stage_sources(stage)}


def replay_sources(cfg: KcptConfig, stage: StageConfig) -> list[str]:
    """Sources whose batches get the KL term: ``stage.replay_sources`` or the stage's raw sources."""
    return cfg.replay_sources(stage)


def datasets_needed(cfg: KcptConfig, stages: list[str]) -> list[str]:
    names: list[str] = []
    for name in stages:
        st = cfg.stage(name)
        for n in [*stage_sources(st), st.eval_raw, *([st.eval_exam] if st.eval_exam else [])]:
            if n not in names:
                names.append(n)
    return names


def held_out_warnings(cfg: KcptConfig, stages: list[str], local_prepared: dict[str, Path]) -> list[str]:
    """The ``warning:`` lines for held-out sets of ``stages`` that share exam questions or input files with their
    training sources (:mod:`kcpt.data.overlap`); with ``data.held_out_overlap=error`` an InputError instead, with
    ``ignore`` nothing. ``local_prepared``: dataset name → its local prepared directory."""
    from kcpt.data.overlap import held_out_overlap, overlap_message

    if cfg.data.held_out_overlap == "ignore":
        return []
    held = [n for name in stages for n in (cfg.stage(name).eval_raw, cfg.stage(name).eval_exam) if n]
    training = [n for name in stages for n in stage_sources(cfg.stage(name))]
    found = held_out_overlap(local_prepared, held, training)
    if not found:
        return []
    if cfg.data.held_out_overlap == "error":
        raise InputError(f"data.held_out_overlap=error: {overlap_message(found)}")
    return [f"warning: {overlap_message([line])}" for line in found]


def check_rows(cfg: KcptConfig, stages: list[str], manifests: dict[str, dict[str, Any]], world: int) -> None:
    """Refuse, on the driver before any worker starts, a dataset the plan needs that has no packed rows, or a
    training source with fewer rows than the ``world`` workers (each needs one). ``manifests``: dataset name →
    its prepared manifest. The InputError names the dataset, its inputs, what preparation dropped and the fix —
    in a worker the same fault would surface late and be retried as if it were transient."""
    training = {n for name in stages for n in stage_sources(cfg.stage(name))}
    for name in datasets_needed(cfg, stages):
        m = manifests[name]
        rows = int(m.get("rows", 0))
        need = world if name in training else 1
        if rows >= need:
            continue
        ds, r = cfg.data.datasets[name], DatasetReport(name, m)
        unit = "items" if ds.kind == "exam" else "documents"
        other, skipped = r.notices.get("other_kind", 0), r.notices.get("skipped_file", 0)
        said = [f"{r.kept} of {r.read} {unit} kept" + (f" (dropped: {r.reject_summary})" if r.rejects else "")]
        if other:
            said.append(f"{other} items of another kind skipped (data.datasets.{name}.exam_kind: {ds.exam_kind!r})")
        if skipped:
            said.append(f"{skipped} input files skipped (not .jsonl/.txt/.parquet, or hidden)")
        where = ", ".join(ds.inputs)
        if rows == 0:
            head = f"dataset '{name}' has no rows"
            fix = (f"correct the input (the data table and reject_examples in the dataset's manifest.json say why "
                   f"each record was dropped) or point data.datasets.{name}.inputs at other data")
        else:
            head = f"dataset '{name}' has {rows} rows, fewer than the {world} workers (each trains on its own rows)"
            fix = f"add data to data.datasets.{name}.inputs, or run with train.num_workers={rows}"
        raise InputError(f"{head}: {'; '.join(said)} from {where}. Fix: {fix}")


def check_baselines(cfg: KcptConfig, stages: list[str], baseline_raw_best: float | None, *,
                    reference_checkpoint: object | None = None, init_checkpoint: object | None = None) -> None:
    """Refuse, before any step, a stage that needs what a baseline (CPT) stage hands on and nobody provides — no
    earlier stage of this run ``sets_baseline``, and none was given:

    - a stop rule bounding raw val loss by ``baseline_raw_best`` (``--baseline-raw-best``);
    - a KL term to ``kl_reference: cpt_best`` (``--reference-checkpoint``; the init checkpoint serves as one, as the
      worker then falls back to it)."""
    raw_known = baseline_raw_best is not None
    ref_known = reference_checkpoint is not None or init_checkpoint is not None
    for name in stages:
        st = cfg.stage(name)
        if st.stop.needs_baseline and not raw_known:
            raise ConfigError(
                f"plan stage '{name}': stop rule '{st.stop.rule}' bounds raw val loss by baseline_raw_best · "
                f"(1 + raw_tolerance), but no stage before it in this run sets_baseline and no baseline was given. "
                "Run the CPT stage first, pass --baseline-raw-best (the CPT best raw val loss)"
                + (", or set stop.raw_bound: false to run this stage without the raw bound" if st.stop.rule == "exam"
                   else ""))
        if st.kl_beta > 0 and st.kl_reference == "cpt_best" and not ref_known:
            raise ConfigError(
                f"plan stage '{name}': kl_beta {st.kl_beta:g} with kl_reference cpt_best, but no stage before it in "
                "this run sets_baseline and no reference or init checkpoint was given: run the CPT stage first, give "
                "the KL reference (--reference-checkpoint CKPT; --init-checkpoint serves as one), or set "
                "kl_reference: base")
        raw_known = raw_known or st.sets_baseline
        ref_known = ref_known or st.sets_baseline


def stage_warnings(cfg: KcptConfig, stages: list[str]) -> list[str]:
    """Console warnings for stages that run but cannot do what they say: a gate that cannot pass
    (:meth:`~kcpt.config.StageConfig.unreachable_gate`; a short smoke run may mean it, the tune job refuses it), an LR
    warm-up as long as the stage (its LR never reaches ``lr.peak`` and the cosine decay never starts)."""
    from kcpt.train.schedule import lr_multiplier  # torch: imported where a run is starting anyway

    out = []
    for st in (cfg.stage(n) for n in stages):
        if (gate := st.unreachable_gate()) is not None:
            out.append(f"warning: plan stage '{st.name}': {gate}; it runs to max_steps")
        if st.lr.warmup_steps >= st.max_steps:
            last = lr_multiplier(st.max_steps - 1, st.max_steps, st.lr)  # the schedule's own value at the last step
            out.append(f"warning: plan stage '{st.name}': lr.warmup_steps {st.lr.warmup_steps} ≥ max_steps "
                       f"{st.max_steps}: the LR only ramps up, to {last:.0%} of lr.peak at the last step; lower "
                       "lr.warmup_steps to train at the peak and decay")
    return out


def expected_manifest(cfg: KcptConfig, prepared: dict[str, Path]) -> dict[str, Any]:
    """Hashes a checkpoint of this run records and a full resume must match: tokenizer (from the prepared
    data's manifest), each prepared dataset's identity, what the resolved config trains
    (:meth:`~kcpt.config.KcptConfig.training_sha256`)."""
    from kcpt.data.shards import prepared_sha256, read_manifest

    first = read_manifest(next(iter(prepared.values())))
    return {"tokenizer_sha256": first["tokenizer_sha256"],
            "data_sha256": {k: prepared_sha256(v) for k, v in prepared.items()},
            "config_sha256": cfg.training_sha256()}
