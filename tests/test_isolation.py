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
