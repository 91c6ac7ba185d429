"""Packed documents do not see each other: logits of B packed after A equal logits of B alone.

Real tiny LlamaForCausalLM (transformers 5), sdpa and eager attention, ``use_cache=False`` and ``position_ids``
from the packer. The control (position ids NOT restarted) shows the comparison is not vacuous.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kcpt.data.packing import Segment, pack_window


def _model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      attn_implementation=attn)
    model = LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_document_logits_equal_alone(attn):
    model = _model(attn)
    rng = np.random.default_rng(0)
    a = rng.integers(2, 64, 13).tolist()
    b = rng.integers(2, 64, 9).tolist()
    (row,) = pack_window([Segment(a, a), Segment(b, b)], 32, pad_id=1)  # longest first: A at 0, B at 13
    assert row.input_ids[13:22].tolist() == b and row.position_ids[13] == 0

    ids = torch.tensor(row.input_ids, dtype=torch.long)[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=torch.tensor(row.position_ids, dtype=torch.long)[None],
                       use_cache=False).logits[0, 13:22]
        alone = model(input_ids=torch.tensor([b]), position_ids=torch.arange(9)[None], use_cache=False).logits[0]
        leaky = model(input_ids=ids, position_ids=torch.arange(32)[None], use_cache=False).logits[0, 13:22]
    assert (packed - alone).abs().max().item() < 1e-5
    assert (leaky - alone).abs().max().item() > 1e-3  # without restarting position ids, A leaks into B

    # a training batch of several packed rows (no attention_mask): B is isolated in its row of the batch
    c = rng.integers(2, 64, 20).tolist()
    rows = pack_window([Segment(a, a), Segment(b, b), Segment(c, c)], 32, pad_id=1)  # [C, B] and [A]
    (k, at), = [(k, i) for k, r in enumerate(rows) for i in np.nonzero(r.position_ids == 0)[0]
                if r.input_ids[i:i + 9].tolist() == b]
    assert len(rows) == 2 and at > 0  # B follows another document
    with torch.no_grad():
        batched = model(input_ids=torch.tensor(np.stack([r.input_ids for r in rows]), dtype=torch.long),
                        position_ids=torch.tensor(np.stack([r.position_ids for r in rows]), dtype=torch.long),
                        use_cache=False).logits[k, at:at + 9]
    assert (batched - alone).abs().max().item() < 1e-5


# --------------------------------------------------------------------------- through kcpt's packed attention inputs

from kcpt.config import ModelConfig, TinyModelConfig  # noqa: E402
from kcpt.errors import ConfigError  # noqa: E402
from kcpt.model.attention import IMPLEMENTATIONS, available, host_cu_seqlens, model_inputs  # noqa: E402
from kcpt.model.loading import build_tiny_model  # noqa: E402


def _kcpt_model(attn: str):
    mc = ModelConfig(attn_implementation=attn, tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4,
                                                                     intermediate_size=64))
    model = build_tiny_model(mc, 64).eval()
    return model.cuda() if attn.startswith("flash") else model


def _batch(rows, device):
    pos = np.stack([r.position_ids for r in rows])
    cu, max_len = host_cu_seqlens(pos)
    return {"input_ids": torch.tensor(np.stack([r.input_ids for r in rows]), dtype=torch.long, device=device),
            "position_ids": torch.tensor(pos, dtype=torch.long, device=device),
            "cu_seqlens": torch.tensor(cu, device=device), "max_seqlen": torch.tensor(max_len)}


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
def test_packed_isolation_for_every_available_implementation(attn):
    """The loop's inputs (:func:`kcpt.model.attention.model_inputs`: block-causal mask, block mask, or varlen
    cu_seqlens — never transformers' own detection) isolate document B in a batch of packed rows; the control
    (attention inputs built as if the row were one document) leaks."""
    why = available(attn)
    if why is not None:
        pytest.skip(why)
    model = _kcpt_model(attn)
    dev = next(model.parameters()).device
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(2, 64, n).tolist() for n in (13, 9, 20))
    rows = pack_window([Segment(a, a), Segment(b, b), Segment(c, c)], 32, pad_id=1)
    (k, at), = [(k, i) for k, r in enumerate(rows) for i in np.nonzero(r.position_ids == 0)[0]
                if r.input_ids[i:i + 9].tolist() == b]
    assert at > 0
    batch = _batch(rows, dev)
    alone_batch = {"input_ids": torch.tensor([b], device=dev), "position_ids": torch.arange(9, device=dev)[None],
                   "cu_seqlens": torch.tensor([0, 9], dtype=torch.int32, device=dev), "max_seqlen": torch.tensor(9)}
    one_doc = dict(batch, position_ids=torch.arange(32, device=dev).repeat(len(rows), 1))
    one_doc["cu_seqlens"] = torch.arange(0, 32 * len(rows) + 1, 32, dtype=torch.int32, device=dev)
    one_doc["max_seqlen"] = torch.tensor(32)
    with torch.no_grad():
        packed = model(**model_inputs(model, batch)).logits[k, at:at + 9].float()
        alone = model(**model_inputs(model, alone_batch)).logits[0].float()
        leak_inputs = model_inputs(model, one_doc)
        leak_inputs["position_ids"] = batch["position_ids"]       # real positions, one-document attention
        leaky = model(**leak_inputs).logits[k, at:at + 9].float()
    tol = 1e-5 if not attn.startswith("flash") else 2e-2
    assert (packed - alone).abs().max().item() < tol
    assert (leaky - alone).abs().max().item() > 10 * tol


@pytest.mark.parametrize("attn", ["flash_attention_2", "flash_attention_3"])
def test_unavailable_implementation_is_refused_naming_the_package(attn):
    if available(attn) is None:
        pytest.skip(f"{attn} is available here")
    with pytest.raises(ConfigError, match="flash_attn|GPU"):
        _kcpt_model(attn)
