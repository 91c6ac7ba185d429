"""Checkpoint directories: round trips, weights_only trainer state, compatibility messages, pruning, and
SIGKILL during a save (a real child process killed mid-save, deterministically and at a random moment)."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_child import tiny_llama, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kcpt.errors import CheckpointError
from kcpt.train.checkpoint import (
    build_manifest,
    check_compatible,
    list_checkpoints,
    load_model_weights,
    load_trainer_state,
    model_dir,
    prune_checkpoints,
    read_manifest,
    restore_rng_state,
    save_checkpoint,
)


def manifest(step: int, stage: str = "cpt", stage_index: int = 0, **kw) -> dict:
    base = dict(tokenizer_sha256="a" * 64, data_sha256={"raw_train": "b" * 64, "raw_val": "c" * 64},
                config_sha256="d" * 64, base_model="tiny", restore_mode="weights_only", step=step, stage=stage,
                stage_index=stage_index, metrics={"raw_val_loss": 3.5})
    base.update(kw)
    return build_manifest(**base)


def trained_state(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    return opt, sched


def test_round_trip_weights_trainer_state_and_tokenizer(tmp_path):
    model = tiny_llama(seed=1)
    ddp_like = torch.nn.Module()
    ddp_like.module = model                                   # saved through a DDP-style wrapper
    opt, sched = trained_state(model)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 7,
             "sources": {"raw_train": {"cursor": np.int64(12), "perm": np.arange(5)}},
             "plan": {"best": {"cpt": tmp_path / "x"}}, "mixture": {"seed": 0, "draws": 3}}
    path = save_checkpoint(tmp_path / "ckpt" / "00-cpt-step000007", model=ddp_like, tokenizer=tiny_tokenizer(),
                           trainer_state=state, manifest=manifest(7))
    expected_next = (random.random(), float(np.random.rand()), float(torch.rand(())))

    m = read_manifest(path)
    assert m["complete"] is True and m["step"] == 7 and m["kcpt_version"] and "created" in m
    assert "trainer_state.pt" in m["files"] and "model.safetensors" in m["files"]

    fresh = tiny_llama(seed=2)
    assert not torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)
    load_model_weights(fresh, path)
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    hf = LlamaForCausalLM.from_pretrained(model_dir(path))
    assert torch.equal(hf.lm_head.weight, model.lm_head.weight)
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir(path))
    assert tok("w3 w4")["input_ids"] == [6, 7]

    st = load_trainer_state(path)          # weights_only=True inside
    assert st["step"] == 7 and st["plan"]["best"]["cpt"] == str(tmp_path / "x")
    assert st["sources"]["raw_train"]["cursor"] == 12 and torch.equal(st["sources"]["raw_train"]["perm"],
                                                                        torch.arange(5))
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(st["optimizer"])
    a, b = opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(a, b)
    restore_rng_state(st["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected_next


def test_tied_embeddings_load_and_shape_mismatch_is_refused(tmp_path):
    model = tiny_llama(seed=3, tie=True)
    path = save_checkpoint(tmp_path / "t", model=model, tokenizer=None, trainer_state={}, manifest=manifest(1))
    other = tiny_llama(seed=4, tie=True)
    load_model_weights(other, path)
    assert torch.equal(other.lm_head.weight, model.model.embed_tokens.weight)
    bigger = LlamaForCausalLM(LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True))
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight: checkpoint \(64, 32\) vs model \(80, 32\)"):
        load_model_weights(bigger, path)


def test_unstorable_state_is_refused_at_save_naming_the_key(tmp_path):
    with pytest.raises(CheckpointError, match=r"trainer_state\['stop'\]\['x'\]: a set cannot be stored"):
        save_checkpoint(tmp_path / "c", model=tiny_llama(), tokenizer=None, trainer_state={"stop": {"x": {1}}},
                        manifest=manifest(1))
    assert not (tmp_path / "c").exists() and not any(tmp_path.iterdir())


def test_incomplete_checkpoint_messages(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint .*half \(no manifest.json; kcpt's saves are "
                                              r"atomic, so it was written or changed by something else\)"):
        read_manifest(tmp_path / "half")
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_trainer_state(tmp_path / "half")
    (tmp_path / "half" / "manifest.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(CheckpointError, match='lacks "complete": true'):
        read_manifest(tmp_path / "half")
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        read_manifest(tmp_path / "nope")
    path = save_checkpoint(tmp_path / "ok", model=tiny_llama(), tokenizer=None, trainer_state={}, manifest=manifest(1))
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="model.safetensors has 100 bytes"):
        read_manifest(path)


@pytest.mark.parametrize(("mode", "change", "message"), [
    ("full", {"tokenizer_sha256": "e" * 64}, r"tokenizer_sha256: checkpoint aaaaaaaaaaaa… vs now eeeeeeeeeeee…"),
    ("full", {"data_sha256": {"raw_train": "f" * 64, "raw_val": "c" * 64}},
     r"data_sha256\['raw_train'\]: checkpoint bbbbbbbbbbbb… vs now ffffffffffff… \(the dataset's inputs or "
     r"preparation changed\)"),
    ("full", {"data_sha256": {"raw_train": "b" * 64, "raw_val": "c" * 64, "qa": "1" * 64}},
     r"data_sha256\['qa'\]: this run uses dataset 'qa' and the checkpoint's run did not"),
    ("full", {"data_sha256": {"raw_train": "b" * 64}},
     r"data_sha256\['raw_val'\]: the checkpoint's run used dataset 'raw_val' and this run does not \(other "
     r"--stages or another plan\?\)"),
    ("full", {"config_sha256": "0" * 64}, r"config_sha256: checkpoint dddddddddddd… vs now 000000000000…"),
    ("weights_only", {"tokenizer_sha256": "e" * 64}, r"tokenizer_sha256"),
])
def test_check_compatible_names_what_differs(mode, change, message, caplog):
    m = manifest(1)
    expected = {"tokenizer_sha256": m["tokenizer_sha256"], "data_sha256": m["data_sha256"],
                "config_sha256": m["config_sha256"]}
    check_compatible(m, expected, mode=mode)                        # identical: fine
    bad = {**expected, **change}
    with pytest.raises(CheckpointError, match=message) as err:
        check_compatible(m, bad, mode=mode)
    assert "--force" in str(err.value) and mode in str(err.value)
    with caplog.at_level(logging.WARNING, logger="kcpt.train.checkpoint"):
        check_compatible(m, bad, mode=mode, force=True)
    assert any("--force" in r.getMessage() for r in caplog.records)


def test_weights_only_ignores_data_and_config_changes():
    m = manifest(1)
    check_compatible(m, {"tokenizer_sha256": m["tokenizer_sha256"], "data_sha256": {"other": "9" * 64},
                         "config_sha256": "0" * 64}, mode="weights_only")


def test_list_and_prune_keep_best_and_last(tmp_path):
    root = tmp_path / "checkpoints"
    model = tiny_llama()
    paths = []
    for idx, (stage, step) in enumerate([("cpt", 20), ("cpt", 40), ("cpt", 60), ("stage1", 20), ("stage1", 40)]):
        si = 0 if stage == "cpt" else 1
        paths.append(save_checkpoint(root / f"{si:02d}-{stage}-step{step:06d}", model=model, tokenizer=None,
                                     trainer_state={"i": idx}, manifest=manifest(step, stage, si)))
    (root / "not-a-checkpoint").mkdir()
    (root / ".01-stage1-step000060.tmp-999999-deadbeef").mkdir()       # leftover of a killed save
    assert list_checkpoints(root) == paths
    removed = prune_checkpoints(root, keep_last=2, keep={str(paths[1])})
    assert removed == [paths[0], paths[2]]
    assert list_checkpoints(root) == [paths[1], paths[3], paths[4]]
    assert (root / "not-a-checkpoint").is_dir()                          # unknown dirs are left alone
    assert not any(p.name.startswith(".") for p in root.iterdir())


def test_resave_onto_existing_path_replaces_it(tmp_path):
    model = tiny_llama()
    p = save_checkpoint(tmp_path / "latest", model=model, tokenizer=None, trainer_state={"v": 1}, manifest=manifest(1))
    save_checkpoint(p, model=model, tokenizer=None, trainer_state={"v": 2}, manifest=manifest(2))
    assert load_trainer_state(p)["v"] == 2 and read_manifest(p)["step"] == 2
    assert [q.name for q in tmp_path.iterdir()] == ["latest"]




def _start_child(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    root = tmp_path / "checkpoints"
    root.mkdir()
    script = Path(__file__).with_name("checkpoint_child.py")
    proc = subprocess.Popen([sys.executable, str(script), str(root), mode], env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, root


def _wait_for(proc: subprocess.Popen, marker: Path) -> None:
    while not marker.exists():
        assert proc.poll() is None, f"child exited early with {proc.returncode}"
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _assert_all_listed_load(root: Path) -> list[Path]:
    listed = list_checkpoints(root)
    for p in listed:
        m = read_manifest(p)                                    # every listed file present with its size
        st = load_trainer_state(p)
        assert st["step"] == m["step"]
        model = tiny_llama(seed=0)
        load_model_weights(model, p)
        # the child adds 1.0 to the embeddings before each new step: weights and state belong together
        ref = tiny_llama(seed=7).model.embed_tokens.weight + (m["step"] - 1)
        assert torch.allclose(model.model.embed_tokens.weight, ref)
    return listed


def test_sigkill_mid_save_leaves_previous_checkpoint_intact(tmp_path):
    proc, root = _start_child(tmp_path, "pause")
    try:
        _wait_for(proc, tmp_path / "in-save")
        _kill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = [p for p in root.iterdir() if p.name.startswith(".")]
    assert leftovers and (leftovers[0] / "model.safetensors").exists()   # the kill really hit mid-save
    assert not (root / "step-000002").exists()
    assert [p.name for p in _assert_all_listed_load(root)] == ["latest", "step-000001"]
    with pytest.raises(CheckpointError):
        read_manifest(leftovers[0])
    prune_checkpoints(root, keep_last=5)
    assert not any(p.name.startswith(".") for p in root.iterdir())


def test_sigkill_at_a_random_moment_of_repeated_saves(tmp_path):
    proc, root = _start_child(tmp_path, "loop")
    try:
        _wait_for(proc, tmp_path / "first-done")
        time.sleep(random.uniform(0.05, 0.6))
        _kill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    listed = _assert_all_listed_load(root)
    assert "step-000001" in [p.name for p in listed]
    visible = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert sorted(visible) == sorted(listed)          # no visible half checkpoint, whatever the moment
