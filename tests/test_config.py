from pathlib import Path

import pytest

from kcpt.config import KcptConfig, dump_config, load_config
from kcpt.errors import ConfigError


def test_defaults_describe_the_demo_plan():
    cfg = load_config()
    assert [s.name for s in cfg.plan] == ["cpt", "stage1", "stage2", "stage3"]
    assert cfg.plan[0].sets_baseline
    assert cfg.stage("stage3").stop.rule == "gate"
    assert cfg.train.num_workers == 2


def test_unknown_key_and_wrong_type_name_file_and_key_path(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  num_workrs: 2\n  seed: abc\n", encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert f"{p}: train.num_workrs: unknown key" in msg
    assert f"{p}: train.seed:" in msg and "integer" in msg


def test_unknown_dataset_reference_is_an_error(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("plan:\n  - name: cpt\n    sources: {nope: 1.0}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        load_config(p)


@pytest.mark.parametrize(("override", "message"), [
    ("plan.1.replay_sources=[raw_tran]", r"replay_sources names 'raw_tran', which the stage does not draw"),
    ("plan.1.replay_sources=[raw_val]", r"replay_sources names 'raw_val', which the stage does not draw"),
    ("plan.1.losses={example_train: full}", r"losses names 'example_train', which the stage does not draw"),
    ("plan.0.losses={raw_train: answer_only}", r"losses.raw_train is answer_only, but 'raw_train' is raw text"),
    ("plan.1.sources={qa_train: 1.0}", r"kl_beta 0.1, but no source gets the KL term"),
])
def test_a_per_source_setting_that_would_change_nothing_is_refused(override: str, message: str):
    """Each of these loaded and trained as if it were not there: a KL on no micro-batch (the reference loaded for
    nothing), a loss rule on a source never drawn, answer-only raw text (every token trained)."""
    with pytest.raises(ConfigError, match=r"plan\.[01] \((cpt|stage1)\): " + message):
        load_config(None, [override])
    load_config(None, ["plan.1.replay_sources=[qa_train]", "plan.1.losses={qa_train: full}"])  # both drawn: fine


@pytest.mark.parametrize(("override", "message"), [
    ("train.max_eval_rows=0", r"train.max_eval_rows: Input should be greater than or equal to 1"),
    ("plan.0.eval_raw=exam_val", r"plan.0.eval_raw: 'exam_val' is an exam dataset"),
    ("plan.1.eval_exam=raw_val", r"plan.1.eval_exam: 'raw_val' is a raw dataset"),
    ("train.anomaly.window=10", r"min_history \(20\) must be ≤ window \(10\)"),
    ("plan.0.mixture_schedule=[{start_frac: 0.5, weights: {raw_train: 1}}, {start_frac: 0.5, weights: {raw_train: 2}}]",
     r"plan.0.mixture_schedule.1.start_frac: 0.5 is also phase 0's"),
    ("model.dtype=float16", r"model.dtype: float16 needs loss scaling, which only train.deepspeed gives"),
    (("train.compile=true", "train.deepspeed={zero_stage: 3}"), r"train.compile: not with ZeRO-3"),
])
def test_a_setting_that_would_fail_late_or_do_nothing_is_refused_when_the_config_loads(override, message):
    """Each loaded before: max_eval_rows 0 crashed every worker at the first eval (numpy on no rows), an exam set as
    eval_raw made 'raw val loss' an answer-only loss, a window shorter than min_history never judged a spike, of
    two phases with one start the first never applied, and float16 without DeepSpeed / compile under ZeRO-3 were
    refused only when each worker started the stage."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override] if isinstance(override, str) else list(override))
    load_config(None, ["train.compile=true", "train.deepspeed={zero_stage: 2}", "model.dtype=float16"])


def test_a_gate_that_cannot_pass_is_a_warning_for_a_run_and_a_refusal_for_the_tune_job():
    """A gate needing more consecutive evals than its stage makes never passed: a run (a short smoke run may mean
    it) says so on the console; a tune job refuses it (every trial would end 'not passed')."""
    from kcpt.train.plan import stage_warnings

    cfg = load_config(None, ["plan.3.max_steps=20"])
    assert stage_warnings(cfg, ["stage3"]) == [
        "warning: plan stage 'stage3': the gate needs 3 evals in a row (stop.consecutive), but the stage evaluates 2 "
        "times (max_steps 20, eval_every 10), so it cannot pass; it runs to max_steps"]
    assert stage_warnings(load_config(None, ["plan.3.max_steps=25"]), ["stage3"]) == []  # evals at 10, 20, 25
    with pytest.raises(ConfigError, match=r"tune.stage: in stage 'stage3' \(tune.stage_overrides applied\) the gate "
                                          r"needs 3 evals in a row .* evaluates 2 times .*: no trial could pass"):
        cfg.check_tuned_stage()
    with pytest.raises(ConfigError, match=r"evaluates 2 times \(max_steps 8, eval_every 4\)"):
        load_config(None, ["tune.stage_overrides.max_steps=8", "tune.stage_overrides.eval_every=4"]).check_tuned_stage()
    load_config(None, ["tune.stage_overrides.max_steps=8", "tune.stage_overrides.eval_every=4",
                       "tune.stage_overrides.stop.consecutive=2"]).check_tuned_stage()


@pytest.mark.parametrize(("override", "message"), [
    ("tune.stage=cpt", r"stage 'cpt' has no eval_exam"),
    ("tune.stage=stage1", r"tokens_to_gate .* its stop.rule is exam"),
    ("tune.space.raw_source=qa_train", r"tune.space.raw_source: 'qa_train' is an exam dataset"),
    ("tune.space.qa_source=raw_val", r"tune.space.qa_source: 'raw_val' is a raw dataset"),
    ("tune.space.example_source=qa_train", r"must be three different datasets"),
    ("tune.space.raw_source=nope", r"tune.space.raw_source: unknown dataset 'nope'"),
])
def test_the_tune_job_refuses_a_search_that_cannot_produce_a_result_before_anything_trains(override, message):
    """Each ran the prerequisite stages and then: every trial FAIL (no exam eval), no trial ever passing (no gate),
    every KL trial refused inside the trial (no raw source), or the example share silently dropped."""
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError, match=message):
        cfg.check_tuned_stage()
    load_config(None, ["tune.stage=stage1", "tune.objective=exam"]).check_tuned_stage()  # the exam objective: fine


def test_overrides_and_roundtrip(tmp_path: Path):
    cfg = load_config(None, ["train.seed=7", "plan.3.kl_beta=0.5", "data.seq_len=128"])
    assert cfg.train.seed == 7 and cfg.plan[3].kl_beta == 0.5 and cfg.data.seq_len == 128
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg and again.sha256() == cfg.sha256()
    assert KcptConfig().sha256() != cfg.sha256()


def test_not_a_mapping(tmp_path: Path):
    p = tmp_path / "l.yaml"
    p.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)


def test_shipped_configs_load_and_demo_yaml_equals_the_defaults():
    root = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    for p in sorted(root.glob("*.yaml")):
        load_config(p)  # every shipped config validates
    assert load_config(root / "demo.yaml").plan == load_config().plan


def test_overriding_a_default_datasets_inputs_keeps_its_other_fields_and_the_other_datasets():
    """`--set data.datasets.raw_train.inputs=[s3://…]` on the embedded demo (the cluster README's command)."""
    cfg = load_config(None, ["data.datasets.raw_train.inputs=[s3://bucket/corpus/]"])
    assert cfg.data.datasets["raw_train"].kind == "raw"
    assert cfg.data.datasets["raw_train"].inputs == ["s3://bucket/corpus/"]
    assert {"raw_val", "qa_train", "exam_val"} <= set(cfg.data.datasets)


def test_the_demo_configs_hashes_do_not_move_when_a_key_is_added_at_its_default():
    """Checkpoints record ``training_sha256`` and tune experiments ``sha256``: a new config key at its default
    (here ``train.faults.input_error_at_step`` and ``train.checkpoint_checksums``, added 2026-11-25) must leave
    both as they were, or every earlier run needs --force to resume (and every tune experiment --overwrite).
    These are the demo config's hashes of 2026-11-24; a deliberate change updates them and docs/training.md's
    upgrade note."""
    cfg = load_config(None, [])
    assert (cfg.sha256()[:12], cfg.training_sha256()[:12]) == ("8d71146dae66", "e03aa6b2d0b3")
    assert cfg.training_sha256() == load_config(None, ["train.checkpoint_checksums=false"]).training_sha256()
    assert cfg.training_sha256() != load_config(None, ["train.faults.input_error_at_step=3"]).training_sha256()


def test_a_resume_may_lay_each_steps_rows_out_anew_only_keeping_their_number():
    """``only_relaid_out``: another number of workers with the same rows per step in every stage (micro-batch ·
    grad_accum · num_workers) trains the same; fewer rows per step, or any other change with it, does not."""
    from kcpt.config import only_relaid_out, rows_per_step

    base = load_config(None, [])  # 2 workers × 8 rows
    assert set(rows_per_step(base).values()) == {16}

    def same(*over: str) -> bool:
        return only_relaid_out(base, load_config(None, list(over)))

    assert same()
    assert same("train.num_workers=1", "train.micro_batch_size=16")
    assert same("train.num_workers=1", "train.grad_accum=2")
    assert same("train.num_workers=4", "train.micro_batch_size=4")
    assert same("train.num_workers=1", "train.micro_batch_size=8", "train.grad_accum=2")
    assert not same("train.num_workers=1")  # 8 rows per step
    assert not same("train.num_workers=1", "train.micro_batch_size=16", "train.seed=3")  # and something else
    # a stage with its own micro-batch keeps its own product
    assert same("train.num_workers=1", "train.micro_batch_size=16", "plan.3.micro_batch_size=8",
                "train.grad_accum=1") is False
    staged = load_config(None, ["plan.3.micro_batch_size=4"])
    assert only_relaid_out(staged, load_config(None, ["plan.3.micro_batch_size=8", "train.num_workers=1",
                                                       "train.micro_batch_size=16"]))
    assert not only_relaid_out(staged, load_config(None, ["plan.3.micro_batch_size=4", "train.num_workers=1",
                                                           "train.micro_batch_size=16"]))


def test_the_relayout_line_names_what_each_loader_reads_on_and_ray_data_keeps_its_micro_batch():
    """The driver's line for a resume laid out anew (``launch._relaid_out``): the stream and memory loaders go on
    with the rows not read yet; ray_data, whose position counts rows of a shuffle cut at the micro-batch size,
    refuses another micro-batch size before any worker starts, and says that another number of workers splits
    its current epoch anew."""
    from kcpt.errors import CheckpointError
    from kcpt.train.launch import _relaid_out

    def line(*over: str, loader: str = "stream") -> str | None:
        old = load_config(None, [f"data.loader={loader}"])
        manifest = {"config_sha256": old.training_sha256(), "stage": "cpt"}
        return _relaid_out(old, load_config(None, [f"data.loader={loader}", *over]), manifest)

    for loader in ("stream", "memory"):
        got = line("train.num_workers=1", "train.micro_batch_size=16", loader=loader)
        assert got is not None and got.endswith("each source with the rows of its epoch no worker has read yet")
    assert line("train.num_workers=1", loader="stream") is None  # fewer rows per step: refused as before
    with pytest.raises(CheckpointError, match=r"another micro-batch size \(8 → 16 rows\) with data.loader ray_data"):
        line("train.num_workers=1", "train.micro_batch_size=16", loader="ray_data")
    got = line("train.num_workers=1", "train.grad_accum=2", loader="ray_data")
    assert got is not None and "splits each source's current epoch anew over 1 worker:" in got
    # elastic: how many of the workers read is known in the workers only, and they say it (test_train_ray.py)
    got = line("train.num_workers=1", "train.grad_accum=2", "train.min_workers=1", loader="ray_data")
    assert got is not None and "current epoch" not in got
    with pytest.raises(CheckpointError, match=r"\(8 → 4 rows\)"):  # the same workers, the micro-batch halved
        line("train.grad_accum=2", "train.micro_batch_size=4", loader="ray_data")
    assert line("train.grad_accum=2", loader="ray_data") is None  # 32 rows per step: refused as before
