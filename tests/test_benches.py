"""The speed benches run (reduced sizes): loss memory with equal results, the option table on the CPU, and the
GPU table skipping cleanly without CUDA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_loss_memory_bench_fused_is_smaller_at_equal_results(capsys):
    rows = _load("loss_memory").main(["--seqs", "128", "--batch", "4", "--vocab", "16384", "--hidden", "32",
                                      "--chunk", "64"])
    (r,) = rows
    assert r["ratio"] > 2.0, r                      # logits path: several [N, V] float32 copies; fused: chunks
    assert r["ce_rel_diff"] < 1e-5 and r["kl_rel_diff"] < 1e-5
    assert r["grad_max_abs_diff"] < 1e-6
    assert "| 4x128 |" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_table_skips_without_cuda(capsys):
    assert _load("train_loop").main(["--gpu"]) == 0
    assert "skipped, no CUDA" in capsys.readouterr().out


def test_option_table_on_cpu(capsys):
    bench = _load("train_loop")
    assert bench.main(["--options", "--steps", "1", "--warmup", "0", "--batch", "1", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    for v in ("today", "+fused_loss", "+compile", "all"):
        assert f"| {v} |" in out


@pytest.mark.slow
def test_data_memory_bench_prints_both_loaders(capsys, tmp_path):
    rows = _load("data_memory").main(["--scales", "1,2", "--steps", "1", "--work", str(tmp_path)])
    assert [(r["loader"], r["scale"]) for r in rows] == [("stream", 1), ("stream", 2), ("memory", 1), ("memory", 2)]
    by = {(r["loader"], r["scale"]): r for r in rows}
    assert by["stream", 2]["rows"] > by["stream", 1]["rows"]  # the repeated corpus is really larger (dedup off)
    assert all(r["peak_rss_mb"] > 0 for r in rows) and by["memory", 1]["ratio"] == 1.0
    out = capsys.readouterr().out
    assert "| stream | ×2 |" in out and "| memory | ×1 |" in out


@pytest.mark.slow
def test_train_loop_bench_has_a_loader_column(capsys):
    assert _load("train_loop").main(["--workers", "2", "--steps", "4", "--batch", "2", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "workers | loader | " in out and "\n2 | stream | " in out and "\n2 | memory | " in out
