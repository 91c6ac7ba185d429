"""AdamW parameter groups: no weight decay on norms, biases and embeddings; fused AdamW only on CUDA."""

from __future__ import annotations

import pytest
import torch

from kcpt.config import ModelConfig, TinyModelConfig
from kcpt.model.loading import build_tiny_model
from kcpt.train.engine import make_adamw, param_groups

MC = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))


def _names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_no_decay_on_norms_biases_and_embeddings():
    model = build_tiny_model(MC, 50)
    model.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(32))  # a bias, for the rule
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    nd = _names(model, no_decay["params"])
    d = _names(model, decay["params"])
    assert "model.embed_tokens.weight" in nd and "model.norm.weight" in nd
    assert "model.layers.0.self_attn.q_proj.bias" in nd
    assert all(n in nd for n in _names(model, model.parameters()) if "layernorm" in n)
    assert "lm_head.weight" in d and "model.layers.1.mlp.up_proj.weight" in d
    assert not (d & nd) and len(d) + len(nd) == len(list(model.parameters()))


def test_frozen_parameters_are_left_out_and_decay_really_skips_norms():
    model = build_tiny_model(MC, 50)
    model.model.layers[1].mlp.requires_grad_(False)
    groups = param_groups(model, 0.5)
    assert "model.layers.1.mlp.up_proj.weight" not in _names(model, [p for g in groups for p in g["params"]])
    opt = make_adamw(groups, lr=0.1, betas=(0.9, 0.95), fused=True)
    norm_before = model.model.norm.weight.detach().clone()
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: only weight decay moves parameters
    assert torch.equal(model.model.norm.weight, norm_before)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_before)


def test_fused_adamw_only_on_cuda():
    model = build_tiny_model(MC, 50)
    assert not make_adamw(param_groups(model, 0.0), lr=1e-3, betas=(0.9, 0.95), fused=True).defaults["fused"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_on_cuda():
    model = build_tiny_model(MC, 50).cuda()
    assert make_adamw(param_groups(model, 0.0), lr=1e-3, betas=(0.9, 0.95), fused=True).defaults["fused"]
