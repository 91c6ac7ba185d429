"""Fused chunked linear + CE / KL (``kcpt.train.fused_loss``) equals the logits path: values within 1e-5 and the
same gradients w.r.t. hidden states and head weight, for any chunk size, masked positions, CE alone and CE + KL;
through the model's fused forward mode too (no full-vocabulary logits)."""

from __future__ import annotations

import pytest
import torch

from kcpt.config import ModelConfig, TinyModelConfig
from kcpt.model.loading import build_tiny_model, freeze
from kcpt.train.fused_loss import fused_ce_kl
from kcpt.train.losses import kl_to_reference_sum, token_ce_sum


def _data(seed: int = 0, B: int = 3, T: int = 17, H: int = 8, V: int = 50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.7).requires_grad_()
    rh, rw = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.7
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 3:9] = -100
    labels[2, :] = -100     # a row with no target at all
    return h, w, rh, rw, labels


def _reference(h, w, rh, rw, labels, a, b):
    logits = h @ w.t()
    ce, n = token_ce_sum(logits, labels)
    kl = kl_to_reference_sum(logits, rh @ rw.t(), labels)[0] if b is not None else torch.zeros(())
    obj = a * ce + (b * kl if b is not None else 0)
    gh, gw = torch.autograd.grad(obj, [h, w])
    return ce.detach(), n, kl.detach(), gh, gw


@pytest.mark.parametrize("chunk", [1, 4, 7, None])
@pytest.mark.parametrize("with_kl", [False, True])
def test_values_and_gradients_equal_the_logits_path(chunk, with_kl):
    h, w, rh, rw, labels = _data()
    a, b = 0.37, (1.7 if with_kl else None)
    ce, n, kl, gh, gw = _reference(h, w, rh, rw, labels, a, b)
    kw = {"ref_hidden": rh, "ref_weight": rw, "kl_scale": b} if with_kl else {}
    obj, ce2, n2, kl2 = fused_ce_kl(h, w, labels, ce_scale=a, chunk_tokens=chunk, **kw)
    assert int(n2) == int(n)
    assert float(ce2) == pytest.approx(float(ce), rel=1e-6, abs=1e-5)
    assert float(kl2) == pytest.approx(float(kl), rel=1e-6, abs=1e-5)
    assert float(obj) == pytest.approx(a * float(ce) + (b * float(kl) if b else 0.0), rel=1e-6)
    gh2, gw2 = torch.autograd.grad(obj * 3.0, [h, w])  # the incoming gradient scales the stored one
    assert (gh2 - 3 * gh).abs().max() < 1e-5
    assert (gw2 - 3 * gw).abs().max() < 1e-5


def test_without_grad_no_gradient_is_computed():
    h, w, rh, rw, labels = _data()
    with torch.no_grad():
        obj, ce, n, _ = fused_ce_kl(h, w, labels)
    assert not obj.requires_grad
    assert float(ce) == pytest.approx(float(token_ce_sum(h @ w.t(), labels)[0]), rel=1e-6)


def test_model_fused_forward_equals_logits_path():
    """The tiny Llama's ``kcpt_loss`` forward mode (base model → chunked head) gives the loss and parameter
    gradients of the logits path, with a KL reference given as final hidden states; the wrapper leaves the LM
    itself as it was (its own forward, state dict keys)."""
    from kcpt.train.fused_loss import LossHeadLM

    mc = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    lm = build_tiny_model(mc.model_copy(update={"seed": 1}), 40)
    keys = list(lm.state_dict())
    model = LossHeadLM(lm)
    assert "forward" not in vars(lm) and list(lm.state_dict()) == keys and model.config is lm.config
    ref = LossHeadLM(freeze(build_tiny_model(mc.model_copy(update={"seed": 2}), 40)))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 40, (2, 12), generator=g)
    pos = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])  # packed row: 2 documents
    labels = ids.clone()
    labels[1, :6] = -100
    logits = model(input_ids=ids, position_ids=pos).logits
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, position_ids=pos).logits
        ref_h = ref(input_ids=ids, position_ids=pos, kcpt_hidden=True)
    ce, n = token_ce_sum(logits, labels)
    kl, _ = kl_to_reference_sum(logits, ref_logits, labels)
    (ce / n + 0.3 * kl / n).backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    obj, ce2, n2, kl2 = model(input_ids=ids, position_ids=pos, kcpt_loss={
        "labels": labels, "ce_scale": 1 / n.float(), "ref_hidden": ref_h,
        "ref_weight": ref.get_output_embeddings().weight, "kl_scale": 0.3 / n.float(), "chunk_tokens": 5})
    obj.backward()
    assert float(ce2) == pytest.approx(float(ce), rel=1e-6) and float(kl2) == pytest.approx(float(kl), rel=1e-5)
    worst = max(float((p.grad - want[k]).abs().max()) for k, p in model.named_parameters())
    assert worst < 1e-6


def test_bf16_head_without_autocast_runs_and_is_close():
    """DeepSpeed's bf16 mode: bf16 hidden states and head, no autocast (float32 logit gradients meet bf16)."""
    h, w, rh, rw, labels = _data()
    ce, n, kl, gh, gw = _reference(h, w, rh, rw, labels, 0.37, 1.7)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    obj, ce2, _, kl2 = fused_ce_kl(hb, wb, labels, ce_scale=0.37, ref_hidden=rh.bfloat16(), ref_weight=rw.bfloat16(),
                                   kl_scale=1.7, chunk_tokens=5)
    obj.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    assert float(ce2) == pytest.approx(float(ce), rel=2e-2)
    assert (wb.grad.float() - gw).abs().max() < 0.05 * gw.abs().max()


def test_fused_step_refuses_a_bare_reference():
    """A bare HF LM takes ``kcpt_hidden=True`` into its ``**kwargs`` and returns logits: the step refuses it
    rather than mistaking an output object for hidden states."""
    from kcpt.train.engine import TorchEngine, make_adamw
    from kcpt.train.fused_loss import has_loss_head
    from kcpt.train.loop import accumulate_step

    mc = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    engine = TorchEngine(build_tiny_model(mc, 40), lambda g: make_adamw(g, lr=1e-3, betas=(0.9, 0.95), fused=False),
                         clip=1.0, weight_decay=0.0, device=torch.device("cpu"))
    bare = freeze(build_tiny_model(mc.model_copy(update={"seed": 2}), 40))
    assert not has_loss_head(bare) and has_loss_head(engine.wrapped)
    ids = torch.randint(0, 40, (1, 8))
    batch = {"input_ids": ids, "position_ids": torch.arange(8)[None], "labels": ids.clone()}
    with pytest.raises(TypeError, match="LossHeadLM"):
        accumulate_step(engine, [(batch, True)], ref=bare, kl_beta=0.1, fused=True)
