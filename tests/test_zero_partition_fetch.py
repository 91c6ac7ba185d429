"""A DeepSpeed ZeRO resume from a checkpoint in a bucket, on two "nodes" (two gloo processes, each with its own
node scratch): each rank downloads only its own ZeRO partition of the engine state, loads it into a fresh engine,
and its next optimizer step equals the step of the run that was never interrupted."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from kcpt.config import ModelConfig, TinyModelConfig
from kcpt.model.loading import build_tiny_model

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "kcpt" / "torch_extensions"))

VOCAB, T = 64, 16
MODEL = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))


def _batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(0, VOCAB, (2, T), generator=g)
    return {"input_ids": ids, "position_ids": torch.arange(T).repeat(2, 1), "labels": ids.clone()}


def _worker(rank: int, world: int, port: int, stage: int, uri: str, root: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), KCPT_SCRATCH=f"{root}/node-{rank}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    from kcpt.storage import publish_tree
    from kcpt.train import checkpoint as ckpt_lib
    from kcpt.train.engine import DeepSpeedEngine
    from kcpt.train.loop import accumulate_step

    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}

    def engine(seed: int) -> DeepSpeedEngine:
        model = build_tiny_model(MODEL.model_copy(update={"seed": seed}), VOCAB)
        return DeepSpeedEngine(model, lambda groups: torch.optim.AdamW(groups, lr=1e-2), ds_config=cfg,
                               weight_decay=0.0, scratch_key=f"test-{port}-{seed}")

    def step(e: DeepSpeedEngine, k: int) -> dict[str, torch.Tensor]:
        accumulate_step(e, [(_batch(k, rank), False)], ref=None, kl_beta=0.0)
        e.step()
        with deepspeed.zero.GatheredParameters(list(e.module.parameters()), enabled=stage == 3):
            return {n: p.detach().clone() for n, p in e.module.named_parameters()}

    first = engine(seed=1)
    for k in range(3):  # Adam moments that differ from rank to rank's partition
        step(first, k)
    ckpt = Path(root) / "ckpt"
    first.save_state(ckpt / ckpt_lib.ENGINE_DIR)  # every rank writes its partition (one filesystem here)
    if rank == 0:
        files = {p.relative_to(ckpt).as_posix(): p.stat().st_size for p in ckpt.rglob("*") if p.is_file()}
        (ckpt / ckpt_lib.MANIFEST).write_text(json.dumps({"complete": True, "files": files}))
        publish_tree(ckpt, uri, marker=ckpt_lib.MANIFEST)
    dist.barrier()
    want = step(first, 3)

    resumed = engine(seed=5)  # other weights, fresh optimizer: everything must come from the bucket
    local = ckpt_lib.fetch(uri, rank=rank)
    resumed.load_state(local / ckpt_lib.ENGINE_DIR)
    got = step(resumed, 3)
    worst = max(float((got[n] - want[n]).abs().max()) for n in want)
    held = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and p.name[0] != ".")
    Path(root, f"rank{rank}.json").write_text(json.dumps({"worst": worst, "held": held}))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # see test_token_weighting: leave without exit-time destructors once the result is on disk


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stage", [2, 3])
def test_each_node_downloads_only_its_ranks_zero_partition_and_resumes_exactly(stage, s3_prefix, tmp_path):
    uri = f"{s3_prefix}/runs/r/checkpoints/00-cpt-step000003"
    mp.start_processes(_worker, args=(2, _free_port(), stage, uri, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    every = {p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    partitions = {r: {n for n in every if f"zero_pp_rank_{r}_" in n} for r in (0, 1)}
    assert all(partitions.values()), every  # DeepSpeed wrote one partition per rank
    for r in (0, 1):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["worst"] < 1e-6, (r, res["worst"])  # the resumed step equals the uninterrupted one
        # this node's copy: everything but the other rank's partition
        assert set(res["held"]) == every - partitions[1 - r], (r, res["held"])
