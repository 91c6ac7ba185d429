"""``train.fused_loss_kernel``: ``auto`` picks the torch chunks without CUDA (or without liger_kernel); ``liger``
on a CPU worker is a ConfigError naming the fix, raised before any step; an unknown kernel is refused by the
config. On CUDA with liger_kernel installed: Liger's fused linear CE equals the torch chunks (values 1e-5,
gradients of the hidden states and of the head) — skipped cleanly elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kcpt.config import load_config
from kcpt.errors import ConfigError
from kcpt.train.fused_loss import fused_ce_kl, liger_available, resolve_kernel
from kcpt.train.launch import run_plan

CUDA_LIGER = torch.cuda.is_available() and liger_available()


def test_auto_picks_torch_here_and_torch_is_always_torch():
    assert resolve_kernel("auto", torch.device("cpu")) == "torch"
    assert resolve_kernel("torch", torch.device("cpu")) == "torch"
    if torch.cuda.is_available():
        assert resolve_kernel("auto", torch.device("cuda")) == ("liger" if liger_available() else "torch")


def test_liger_without_cuda_is_a_config_error_naming_the_fix():
    with pytest.raises(ConfigError, match=r"fused_loss_kernel: liger runs on CUDA only.*train.use_gpu: true.*"
                                          r"train.fused_loss_kernel: torch"):
        resolve_kernel("liger", torch.device("cpu"))


def test_unknown_kernel_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="fused_loss_kernel"):
        load_config(None, ["train.fused_loss_kernel=triton"])


def test_liger_on_a_cpu_run_stops_before_any_step(tmp_path):
    cfg = load_config(None, [
        "data.seq_len=64", "logging.progress=false", "logging.tensorboard=false", "model.tiny.hidden_size=32",
        "model.tiny.num_layers=1", "model.tiny.num_heads=2", "model.tiny.intermediate_size=64",
        "train.num_workers=1", "train.max_eval_rows=16", f"data.prepared_root={tmp_path / 'prepared'}",
        f"train.output_dir={tmp_path}", "train.run_name=r", "train.fused_loss_kernel=liger", "tune.stage=s",
        "plan=[{name: s, sources: {raw_train: 1.0}, max_steps: 2, eval_every: 2, stop: {rule: max_steps}}]"])
    with pytest.raises(ConfigError, match="liger runs on CUDA only"):
        run_plan(cfg, resume="never", in_process=True)
    assert not any(Path(tmp_path / "r" / "checkpoints").iterdir())


@pytest.mark.skipif(not CUDA_LIGER, reason="needs CUDA and liger_kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_ce_equals_the_torch_chunks_values_and_gradients(dtype):
    torch.manual_seed(0)
    b, t, h, v = 2, 96, 64, 4099
    hidden0 = torch.randn(b, t, h, device="cuda")
    weight0 = torch.randn(v, h, device="cuda") * 0.05
    labels = torch.randint(0, v, (b, t), device="cuda")
    labels[0, :10] = -100
    out, grads = {}, {}
    for kernel in ("torch", "liger"):
        hidden = hidden0.clone().requires_grad_(True)
        weight = weight0.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            obj, ce_sum, count, kl = fused_ce_kl(hidden, weight, labels, ce_scale=0.01, kernel=kernel,
                                                 chunk_tokens=32)
        obj.backward()
        out[kernel] = (obj.detach(), ce_sum, count, kl)
        grads[kernel] = (hidden.grad, weight.grad)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b_ in zip(out["torch"], out["liger"], strict=True):
        torch.testing.assert_close(a.float(), b_.float(), rtol=tol, atol=tol)
    for a, b_ in zip(grads["torch"], grads["liger"], strict=True):
        torch.testing.assert_close(a.float(), b_.float(), rtol=tol, atol=tol)
