"""Storage by URI (kcpt.storage) against a real S3 API (moto's server on 127.0.0.1): publication order, half
uploads never taken as complete, per-node fetch caching, and a whole plan run in-process with every root on S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kcpt import storage
from kcpt.errors import CheckpointError, ConfigError
from kcpt.storage import Store, fetch_tree, publish_tree, retract_tree


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _manifest(files: dict[str, bytes]) -> bytes:
    return json.dumps({"complete": True, "files": {n: len(d) for n, d in files.items()}}).encode()


def test_uri_rules():
    assert storage.is_uri("s3://b/x") and storage.is_uri("gs://b/x")
    assert not storage.is_uri("/a/b") and not storage.is_uri("file:///a/b") and not storage.is_uri("runs")
    assert storage.join("s3://b/x/", "runs", "r") == "s3://b/x/runs/r"
    with pytest.raises(ConfigError, match="unsupported URI scheme 'ftp'"):
        storage.check_uri("ftp://host/x", "train.output_dir")
    with pytest.raises(ConfigError, match="no bucket"):
        storage.check_uri("s3:///x", "train.output_dir")


def test_publish_uploads_the_marker_last_and_fetch_refuses_half_uploads(s3_prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch"))
    files = {"a.bin": b"1" * 100, "sub/b.bin": b"2" * 50}
    src = _tree(tmp_path / "src", {**files, "manifest.json": _manifest(files)})
    uri = f"{s3_prefix}/ck"
    order: list[str] = []
    real = Store.upload_file

    def spy(self, local, rel):
        order.append(rel.rsplit("ck/", 1)[-1])
        real(self, local, rel)

    monkeypatch.setattr(Store, "upload_file", spy)
    publish_tree(src, uri, marker="manifest.json")
    assert order[-1] == "manifest.json" and set(order) == {"a.bin", "sub/b.bin", "manifest.json"}
    monkeypatch.setattr(Store, "upload_file", real)

    got = fetch_tree(uri, marker="manifest.json", files_of=lambda m: m["files"])
    assert got.is_relative_to(tmp_path / "scratch") and (got / "sub/b.bin").read_bytes() == files["sub/b.bin"]
    # a second fetch on this node reuses the copy (no download)
    monkeypatch.setattr(Store, "download_file", lambda *a: pytest.fail("downloaded again"))
    assert fetch_tree(uri, marker="manifest.json", files_of=lambda m: m["files"]) == got
    monkeypatch.undo()
    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch2"))  # another node

    store = Store(uri)
    store.delete("sub/b.bin")  # a half-uploaded directory: the manifest lists a file that is not there
    with pytest.raises(FileNotFoundError, match="missing"):
        fetch_tree(uri, marker="manifest.json", files_of=lambda m: m["files"])
    retract_tree(uri, marker="manifest.json")
    assert store.walk() == {}
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        fetch_tree(uri, marker="manifest.json")


def test_republish_retracts_first_and_removes_stale_files(s3_prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch"))
    uri = f"{s3_prefix}/ds"
    one = {"old.bin": b"x"}
    publish_tree(_tree(tmp_path / "one", {**one, "manifest.json": _manifest(one)}), uri, marker="manifest.json")
    two = {"new.bin": b"yy"}
    seen_marker_during_upload = []
    real = Store.upload_file

    def spy(self, local, rel):
        seen_marker_during_upload.append(self.is_file(rel.rsplit("/", 1)[0] + "/manifest.json"))
        real(self, local, rel)

    monkeypatch.setattr(Store, "upload_file", spy)
    publish_tree(_tree(tmp_path / "two", {**two, "manifest.json": _manifest(two)}), uri, marker="manifest.json")
    assert seen_marker_during_upload == [False, False]  # the old marker was gone before the first byte
    assert set(Store(uri).walk()) == {"new.bin", "manifest.json"}


def test_run_dir_at_a_uri_skips_checkpoints_without_manifest(s3_prefix, tmp_path, monkeypatch):
    from kcpt.train.rundir import RunDir

    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch"))
    rd = RunDir(f"{s3_prefix}/run")
    for name in ("00-cpt-step000010", "00-cpt-step000020", "01-stage1-step000010"):
        d = rd.checkpoints / name
        _tree(d, {"model.safetensors": b"w", "manifest.json": _manifest({"model.safetensors": b"w"})})
        rd.publish_checkpoint(name)
    assert rd.latest_checkpoint(["cpt", "stage1"]) == f"{s3_prefix}/run/checkpoints/01-stage1-step000010"
    rd.remote.delete("checkpoints/01-stage1-step000010/manifest.json")  # an upload cut before its manifest
    assert rd.latest_checkpoint(["cpt", "stage1"]) == f"{s3_prefix}/run/checkpoints/00-cpt-step000020"
    with pytest.raises(CheckpointError, match="incomplete or missing"):
        from kcpt.train.checkpoint import fetch

        fetch(f"{s3_prefix}/run/checkpoints/01-stage1-step000010")
    rd.prune_checkpoints(1, keep=[f"{s3_prefix}/run/checkpoints/00-cpt-step000010"])
    assert rd.remote_checkpoints() == ["00-cpt-step000010", "00-cpt-step000020"]
    rd.prune_checkpoints(1, keep=[])
    assert rd.remote_checkpoints() == ["00-cpt-step000020"]


def test_run_dir_not_made_by_kcpt_is_refused_at_a_uri(s3_prefix, tmp_path, monkeypatch):
    from kcpt.errors import InputError
    from kcpt.train.rundir import RunDir

    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch"))
    Store(f"{s3_prefix}/theirs").write_text("data.csv", "a,b\n")
    with pytest.raises(InputError, match="kcpt did not create it"):
        RunDir(f"{s3_prefix}/theirs").check_owned()


def test_a_checkpoint_is_fetched_in_the_parts_a_rank_needs_and_a_node_mirror_is_topped_up(
        s3_prefix, tmp_path, monkeypatch):
    """Weights alone leave the engine state in the bucket; a DeepSpeed rank takes its own ZeRO partition (fp32 or
    bf16 names) and the files every rank reads; two ranks of one node fill one mirror, each file downloaded once;
    the node's copy passes the manifest check with the parts it holds, and a damaged file is still refused."""
    from kcpt.train import checkpoint as ckpt_lib

    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch"))
    tag = f"{ckpt_lib.ENGINE_DIR}/ds"
    files = {"model.safetensors": b"w" * 300, "trainer_state.pt": b"t" * 20, "config.json": b"{}",
             f"{tag}/mp_rank_00_model_states.pt": b"m" * 40,
             f"{tag}/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"0" * 500,
             f"{tag}/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt": b"1" * 500,
             f"{tag}/zero_pp_rank_1_mp_rank_00_model_states.pt": b"z" * 30,
             f"{tag}/zero_pp_rank_11_mp_rank_00_optim_states.pt": b"x" * 500}
    src = _tree(tmp_path / "src", files)
    (src / ckpt_lib.MANIFEST).write_bytes(json.dumps(
        {"complete": True, "files": {n: len(d) for n, d in files.items()}}).encode())
    uri = f"{s3_prefix}/runs/r/checkpoints/00-cpt-step000002"
    publish_tree(src, uri, marker=ckpt_lib.MANIFEST)
    got: list[str] = []
    real = Store.download_file
    monkeypatch.setattr(Store, "download_file", lambda self, rel, local: (got.append(rel.split("-step000002/")[1]),
                                                                          real(self, rel, local)))
    before = (storage.FETCHED.whole, storage.FETCHED.downloaded)

    def held(local: Path) -> set[str]:
        return {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")}

    local = ckpt_lib.fetch(uri, engine=False)  # a hand-off's weights, a KL reference, the trainer state
    assert held(local) == {"model.safetensors", "trainer_state.pt", "config.json", ckpt_lib.MANIFEST}
    assert ckpt_lib.model_dir(local) == local and ckpt_lib.read_manifest(local)["complete"]
    assert ckpt_lib.fetch(uri, rank=0) == local  # rank 0 of the node: its partition added to the same mirror
    assert held(local) - held(src) == set() and held(src) - held(local) == {
        f"{tag}/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", f"{tag}/zero_pp_rank_1_mp_rank_00_model_states.pt",
        f"{tag}/zero_pp_rank_11_mp_rank_00_optim_states.pt"}
    ckpt_lib.fetch(uri, rank=1)
    assert held(src) - held(local) == {f"{tag}/zero_pp_rank_11_mp_rank_00_optim_states.pt"}
    assert sorted(got) == sorted(set(got)) and len(got) == 7  # nothing downloaded twice; rank 11's never
    assert storage.FETCHED.whole - before[0] == sum(map(len, files.values()))
    assert storage.FETCHED.downloaded - before[1] == sum(map(len, files.values())) - 500
    assert ckpt_lib.zero_world(ckpt_lib.read_manifest(src)) == 3 and ckpt_lib.zero_world({"files": {}}) is None
    ckpt_lib.fetch(uri)  # everything: only the missing partition comes
    assert held(local) == held(src) and len(got) == 8

    (local / "model.safetensors").write_bytes(b"w" * 299)  # a copy of another size is still refused
    with pytest.raises(CheckpointError, match="model.safetensors has 299 bytes"):
        ckpt_lib.read_manifest(local)


def test_whole_plan_in_process_with_every_root_on_s3(s3_prefix, tmp_path, monkeypatch, capsys):
    """Prepared data, run files and checkpoints go to the bucket; a second run reuses the published data
    without preparing; a resume downloads the latest checkpoint from S3 into a fresh node scratch."""
    from conftest import checkpoint_copies

    from kcpt.config import load_config
    from kcpt.train.launch import run_plan
    from kcpt.train.rundir import read_metrics

    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.chdir(tmp_path)
    tiny = ["data.seq_len=64", "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
            "model.tiny.intermediate_size=64", "logging.progress=false", "plan.0.max_steps=6", "plan.0.eval_every=3",
            "plan.1.max_steps=4", "plan.1.eval_every=2"]
    cfg = load_config(None, [*tiny, f"train.output_dir={s3_prefix}/runs", f"data.prepared_root={s3_prefix}/prep"])
    res = run_plan(cfg, stages=["cpt", "stage1"], resume="never", in_process=True)
    assert res.run_dir == f"{s3_prefix}/runs/demo"
    first = read_metrics(res.run_dir)
    assert [(r["stage"], r["step"]) for r in first] == [("cpt", 0), ("cpt", 3), ("cpt", 6), ("stage1", 0),
                                                        ("stage1", 2), ("stage1", 4)]
    assert set(Path(tmp_path).iterdir()) == {tmp_path / "scratch"}  # nothing in the working directory
    # the checkpoints are in the bucket, and no longer in the node's scratch (it would fill up run after run)
    assert res.best_checkpoints and all(Store(ref).is_file("manifest.json") for ref in res.best_checkpoints.values())
    assert checkpoint_copies(tmp_path / "scratch") == []
    # `--run-dir s3://…` names that run on the command line: a new run there is refused, naming the URI (Path()
    # folded the URI's // into a local directory "s3:/…", which had no results, and the run went ahead there)
    from kcpt.cli import main as kcpt_main

    sets = [a for o in [*tiny, f"data.prepared_root={s3_prefix}/prep"] for a in ("--set", o)]
    assert kcpt_main(["train", "--run-dir", res.run_dir, *sets]) == 2
    assert f"{res.run_dir}: this run name already has results" in capsys.readouterr().err
    assert set(Path(tmp_path).iterdir()) == {tmp_path / "scratch"}

    # a fresh node: empty scratch; the data is downloaded (not prepared again) and the run resumes from S3
    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch-b"))
    import kcpt.data.prepare as prep

    monkeypatch.setattr(prep, "prepare_dataset", lambda *a, **k: pytest.fail("prepared again"))
    again = run_plan(cfg, stages=["cpt", "stage1"], resume="auto", in_process=True)
    assert read_metrics(again.run_dir) == first  # resumed at the end: nothing re-run, nothing lost
    assert checkpoint_copies(tmp_path / "scratch-b") == []  # the checkpoint the resume downloaded, freed again


def test_a_fresh_node_resuming_downloads_the_engine_state_of_the_resumed_checkpoint_only(s3_prefix, tmp_path,
                                                                                         monkeypatch):
    """Stage 1 stopped by an error after its step-2 checkpoint; a fresh node resumes it from the bucket. Its KL
    reference and its hand-off are the CPT best (weights only): that checkpoint's optimizer state stays in the
    bucket. The resumed checkpoint comes whole, each file once."""
    from kcpt.config import load_config
    from kcpt.train.launch import run_plan
    from kcpt.train.rundir import read_metrics

    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.chdir(tmp_path)
    tiny = ["data.seq_len=64", "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
            "model.tiny.intermediate_size=64", "logging.progress=false", "plan.0.max_steps=4", "plan.0.eval_every=2",
            "plan.1.max_steps=4", "plan.1.eval_every=2", f"train.output_dir={s3_prefix}/runs",
            f"data.prepared_root={s3_prefix}/prep"]
    stop = ["train.faults.stage=stage1", "train.faults.raise_at_step=3", "train.max_failures=0"]
    with pytest.raises(RuntimeError, match="injected fault: stage stage1 step 3"):
        run_plan(load_config(None, [*tiny, *stop]), stages=["cpt", "stage1"], resume="never", in_process=True)
    cfg = load_config(None, tiny)
    assert cfg.stage("stage1").kl_beta > 0 and cfg.stage("stage1").restore == "weights_only"

    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch-b"))
    got: list[str] = []
    real = Store.download_file
    monkeypatch.setattr(Store, "download_file", lambda self, rel, local: (got.append(rel), real(self, rel, local)))
    res = run_plan(cfg, stages=["cpt", "stage1"], resume="auto", in_process=True, force=True)
    assert [(r["stage"], r["step"]) for r in read_metrics(res.run_dir)][-3:] == [("stage1", 0), ("stage1", 2),
                                                                                ("stage1", 4)]
    ckpts = [f for f in got if "/checkpoints/" in f]
    cpt_best = res.best_checkpoints["cpt"].rsplit("/", 1)[1]
    assert any(f"/{cpt_best}/model" in f for f in ckpts)  # its weights came (the reference, the hand-off) ...
    assert not any(f"/{cpt_best}/engine/" in f for f in ckpts), ckpts  # ... and not its optimizer state
    resumed = [f for f in ckpts if "/01-stage1-step000002/" in f]
    assert sum("/engine/" in f for f in resumed) == 1 and len(resumed) == len(set(resumed))  # whole, once each


def _published_checkpoint(s3_prefix: str, tmp_path: Path, monkeypatch, trainer_state: dict) -> tuple[Path, str]:
    """A full-state checkpoint of a tiny model (an optimizer state under ``engine/``) saved under ``tmp_path`` and
    published at ``<s3_prefix>/runs/r/checkpoints/``; node scratch under ``tmp_path``. Returns (path, URI)."""
    from checkpoint_child import tiny_llama

    from kcpt.train import checkpoint as ckpt_lib

    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch"))
    path = tmp_path / "00-cpt-step000003"
    staging = ckpt_lib.staging_path(path)
    (staging / ckpt_lib.ENGINE_DIR).mkdir(parents=True)
    torch.save({"exp_avg": torch.randn(64, 64)}, staging / ckpt_lib.ENGINE_DIR / "optimizer.pt")
    ckpt_lib.save_checkpoint(path, model=tiny_llama(), tokenizer=None, trainer_state=trainer_state,
                             manifest=ckpt_lib.build_manifest(
                                 tokenizer_sha256="a" * 64, data_sha256={}, config_sha256="d" * 64, base_model="t",
                                 restore_mode="full", step=3, stage="cpt", stage_index=0, metrics={}),
                             staging=staging)
    uri = f"{s3_prefix}/runs/r/checkpoints/{path.name}"
    publish_tree(path, uri, marker=ckpt_lib.MANIFEST)
    return path, uri


def test_a_driver_checks_a_checkpoint_at_a_uri_without_downloading_its_weights_or_optimizer_state(
        s3_prefix, tmp_path, monkeypatch):
    """Before a run starts from (or resumes) a checkpoint at a URI, the driver checks its manifest, trainer state
    and weight headers from the small files alone: the weights and the optimizer state (several times the weights)
    are downloaded by the workers on their own nodes, not a second time to the driver's. A damaged weight file at
    the URI is still refused, naming it."""
    from kcpt.train import checkpoint as ckpt_lib

    path, uri = _published_checkpoint(s3_prefix, tmp_path, monkeypatch, {"plan": {"x": 1}})
    downloaded: list[str] = []
    real = Store.download_file
    monkeypatch.setattr(Store, "download_file", lambda self, rel, local: (downloaded.append(rel.rsplit("/", 1)[-1]),
                                                                          real(self, rel, local)))
    manifest, local = ckpt_lib.inspect(uri)
    assert manifest == ckpt_lib.read_manifest(path)
    assert {"model.safetensors", f"{ckpt_lib.ENGINE_DIR}/optimizer.pt"} <= set(manifest["files"])
    assert "trainer_state.pt" in downloaded and "config.json" in downloaded
    assert not any(n.endswith(".safetensors") or n == "optimizer.pt" for n in downloaded), downloaded
    assert ckpt_lib.load_trainer_state(local, check_files=False)["plan"] == {"x": 1}
    assert ckpt_lib.inspect(path) == (manifest, path)  # a local checkpoint is checked in place

    size = (path / "model.safetensors").stat().st_size
    Store(uri).write_bytes("model.safetensors", b"\xff" * size)  # same size: only its header tells
    with pytest.raises(CheckpointError, match=r"/model\.safetensors: cannot open the weights"):
        ckpt_lib.inspect(uri)


def test_dataset_inputs_at_a_uri_are_downloaded_once_and_cached_by_size_and_mtime(s3_prefix, tmp_path, monkeypatch):
    """Raw text under an s3:// prefix prepares like a local directory; an unchanged prefix is neither downloaded
    nor prepared again; a changed object is downloaded again and gives a new dataset."""
    from kcpt.config import load_config
    from kcpt.data.prepare import prepare_all
    from kcpt.data.shards import read_manifest

    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch"))
    docs = {"a/one.txt": "서울의 겨울은 건조하고 바람이 차다. 시민들은 두꺼운 외투를 입고 출근길에 나선다. "
                         "한강 공원에는 산책하는 사람이 줄었지만 자전거를 타는 사람은 여전히 많다.",
            "b/two.txt": "제주도는 화산섬으로 한라산과 오름이 유명하다. 감귤 농사가 활발하고 해녀 문화가 남아 있다. "
                         "봄이면 유채꽃이 들판을 노랗게 물들인다."}
    for name, text in docs.items():
        Store(f"{s3_prefix}/corpus").write_text(name, text)
    base = load_config(None, ["logging.progress=false", f"data.prepared_root={tmp_path / 'prep'}",
                              "data.txt_split=file", "data.filters.min_chars=10"])

    def with_input(uri: str):
        cfg = base.model_copy(deep=True)
        cfg.data.datasets["raw_train"].inputs = [uri]
        return cfg

    cfg = with_input(f"{s3_prefix}/corpus")
    first = prepare_all(cfg, ["raw_train"])["raw_train"]
    m = read_manifest(first)
    assert sum(i["documents"] for i in m["inputs"]) == 2 and m["rows"] > 0, (m["inputs"], m["rejects"])

    monkeypatch.setattr(Store, "download_file", lambda *a: pytest.fail("downloaded an unchanged input again"))
    assert prepare_all(cfg, ["raw_train"])["raw_train"] == first
    monkeypatch.undo()
    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch"))
    Store(f"{s3_prefix}/corpus").write_text("b/two.txt", "부산은 항구 도시로 해운대 해수욕장과 자갈치 시장이 "
                                                          "널리 알려져 있다. 가을에는 국제 영화제가 열린다.")
    changed = prepare_all(cfg, ["raw_train"])["raw_train"]
    assert changed != first and read_manifest(changed)["inputs"] != m["inputs"]

    from kcpt.errors import InputError

    bad = with_input(f"{s3_prefix}/nothing-here")
    with pytest.raises(InputError, match="input URI does not exist"):
        prepare_all(bad, ["raw_train"], progress=False)


def test_kcpt_prepare_writes_to_a_uri_and_refuses_to_overwrite_without_the_flag(s3_prefix, tmp_path):
    import json as _json
    import os
    import subprocess
    import sys

    items = tmp_path / "qa.jsonl"
    items.write_text("".join(_json.dumps({"id": f"q{i}", "question": f"{i}번 문제: 대한민국의 수도는 어디인가?",
                                          "answer": "서울", "kind": "qa"}, ensure_ascii=False) + "\n"
                             for i in range(6)), encoding="utf-8")
    out = f"{s3_prefix}/prepared/qa"
    env = {**os.environ, "KCPT_SCRATCH": str(tmp_path / "scratch")}
    cmd = [sys.executable, "-m", "kcpt.cli", "prepare", "exam", "--input", str(items), "--out", out,
           "--seq-len", "64", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out in r.stdout
    manifest = _json.loads(Store(out).read_text("manifest.json"))
    assert manifest["kind"] == "exam" and manifest["rows"] > 0
    assert any(n.endswith(".parquet") for n in Store(out).walk())
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_checkpoint_upload_runs_in_the_background_and_errors_surface(s3_prefix, tmp_path, monkeypatch):
    """publish_checkpoint(background=True) returns while the upload is still going (training goes on); the
    checkpoint is not visible until its manifest lands; wait_published joins it; an upload error is raised by
    the next wait, not lost."""
    import threading

    from kcpt.train.rundir import RunDir

    monkeypatch.setenv("KCPT_SCRATCH", str(tmp_path / "scratch"))
    rd = RunDir(f"{s3_prefix}/run")
    files = {"model.safetensors": b"w" * 1000}
    _tree(rd.checkpoints / "00-cpt-step000010", {**files, "manifest.json": _manifest(files)})
    gate = threading.Event()
    real = Store.upload_file

    def held(self, local, rel):  # an upload held back until the test lets it go
        gate.wait(timeout=30)
        real(self, local, rel)

    monkeypatch.setattr(Store, "upload_file", held)
    rd.publish_checkpoint("00-cpt-step000010", background=True)
    assert rd.latest_checkpoint(["cpt"]) is None  # returned at once; nothing visible yet
    gate.set()
    rd.wait_published()
    assert rd.latest_checkpoint(["cpt"]) == f"{s3_prefix}/run/checkpoints/00-cpt-step000010"

    def broken(self, local, rel):  # an injected failure (e.g. credentials expired mid-run)
        raise OSError("injected upload failure")

    monkeypatch.setattr(Store, "upload_file", broken)
    _tree(rd.checkpoints / "00-cpt-step000020", {**files, "manifest.json": _manifest(files)})
    rd.publish_checkpoint("00-cpt-step000020", background=True)
    with pytest.raises(OSError, match="injected upload failure"):
        rd.wait_published()


def test_a_checkpoint_changed_in_the_bucket_is_refused_by_its_uri_and_downloaded_again_once_repaired(
        s3_prefix, tmp_path, monkeypatch):
    """A same-size change to an object of a checkpoint at a URI (here the optimizer state) is refused when a run
    fetches it, naming the checkpoint by its URI (it named the node's scratch copy), and the node's damaged copy
    is dropped: once the object is repaired in the bucket, the next fetch downloads it again (the damaged copy was
    reused while the manifest was unchanged)."""
    from kcpt.train import checkpoint as ckpt_lib

    path, uri = _published_checkpoint(s3_prefix, tmp_path, monkeypatch, {})
    name = f"{ckpt_lib.ENGINE_DIR}/optimizer.pt"
    good = (path / name).read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    Store(uri).write_bytes(name, bytes(bad))
    ckpt_lib.fetch(uri, engine=False)  # what a hand-off reads: the optimizer state is not checked (not loaded)
    with pytest.raises(CheckpointError) as err:
        ckpt_lib.fetch(uri)
    assert str(err.value).startswith(f"{uri}: file {name} does not match its checksum")
    Store(uri).write_bytes(name, good)
    assert (ckpt_lib.fetch(uri) / name).read_bytes() == good
