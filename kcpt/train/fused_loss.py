"""Fused linear + CE and linear + KL(p_ref ‖ p_θ) from final hidden states, in chunks over tokens.

The plain path (:mod:`kcpt.train.losses`) materialises the logits ``[B, T, V]`` (and the reference's), casts
them to float32 and takes log-softmaxes of them — several full-vocabulary float32 copies per micro-batch (for a
128k vocabulary at 4×2048 tokens, 4.3 GB each). Here the head ``hidden @ W.T`` is applied to ``chunk`` tokens at
a time: each chunk's float32 logits, the loss and the gradient w.r.t. the chunk's hidden states and ``W`` are
computed and the logits dropped before the next chunk (the Liger-kernel scheme, in plain torch). Memory: one
chunk of logits (a few buffers of ``chunk × V`` float32) + the gradient of ``W`` (float32 ``[V, H]``, which the
backward produces anyway) + the gradient of the hidden states.

The gradient is computed in the forward for the *weighted objective* ``ce_scale·CE_sum + kl_scale·KL_sum``
(the loop's ``CE_sum/N_ce + β·KL_sum/N_kl``) and scaled by the incoming gradient in the backward: 3 matmuls per
chunk (logits, ∂hidden, ∂W), no recomputation. The causal shift and the ``-100`` mask are those of
:func:`kcpt.train.losses.token_ce_sum`: position ``t`` is scored against ``labels[:, t + 1]``; KL is taken on the
same positions. Masked positions are computed and weighted by 0 (no boolean indexing: that would be a
device→host sync per micro-batch on GPU).

The model side: :class:`LossHeadLM` wraps an HF causal LM (``.module``, as DDP names what it wraps). Its
``forward`` called with ``kcpt_loss={...}`` runs the base model (``lm.base_model``: embeddings, decoder layers,
final norm) and returns ``(objective, ce_sum, ce_count, kl_sum)`` instead of logits; the engines put DDP /
DeepSpeed around the wrapper, so gradient sync and ZeRO-3 gathering happen as for any forward (under ZeRO-3 the
head weight is registered as an external parameter of the wrapper, see :class:`kcpt.train.engine.DeepSpeedEngine`).
With ``kcpt_hidden=True`` it returns the final hidden states (the KL reference). Without either flag it is the
LM's own forward. The LM itself is not modified: its state dict and ``save_pretrained`` are those of the LM.

Kernels (``train.fused_loss_kernel``, :func:`resolve_kernel`): ``torch`` — the chunked implementation here;
``liger`` — Liger-Kernel's Triton fused linear cross-entropy (``liger_kernel``, CUDA only) for the CE of
micro-batches without KL; ``auto`` — ``liger`` when ``liger_kernel`` imports and the device is CUDA, else
``torch``. Micro-batches with the KL term always use the torch chunks: Liger's fused linear JSD at
``jsd_beta=0`` is exactly KL(p_ref ‖ p_θ) per token (teacher = reference), but it allocates a ``[B·T, V]``
float32 loss buffer (the full-vocabulary copy this module exists to avoid), returns a token mean (one
``.item()`` host sync per call), and cannot share the model's logits with the CE term (the head matmuls would
run twice). Liger's CE also reads its target count with ``.item()``: one device→host sync per micro-batch,
which ``torch`` does not have (choose ``torch`` where the host is the bottleneck).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from kcpt.data.types import IGNORE_INDEX

CHUNK_BYTES = 64 * 2 ** 20
"""Default chunk: about this many bytes of float32 logits (``chunk · V · 4``; 128 tokens for a 128k vocab —
the size Liger picks for a 2048-wide head)."""


def auto_chunk(vocab: int, n_tokens: int, chunk_tokens: int | None = None) -> int:
    if chunk_tokens is not None:
        return max(1, min(chunk_tokens, n_tokens))
    c = max(1, CHUNK_BYTES // (4 * vocab))
    c = 2 ** int(math.log2(c)) if c > 1 else 1
    return max(1, min(c, n_tokens))


def _mm(a: Tensor, b_t: Tensor) -> Tensor:
    """``a @ b_t.T`` in ``b_t``'s dtype (autocast, when active, gives the compute dtype): a float32 logit gradient
    meets a bf16 head under DeepSpeed's bf16 mode, where no autocast runs."""
    if a.dtype != b_t.dtype:
        a = a.to(b_t.dtype)
    return a @ b_t.t()


class _FusedCEKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, w: Tensor, targets: Tensor, ce_scale: Tensor, ref_h: Tensor | None,
                ref_w: Tensor | None, kl_scale: Tensor | None, chunk: int, need_grad: bool,
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n, _ = h.shape
        valid = targets != IGNORE_INDEX
        safe_t = targets.clamp(min=0)
        ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        kl_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        with_kl = ref_h is not None
        grad_h = torch.empty_like(h) if need_grad and ctx.needs_input_grad[0] else None
        grad_w = (torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                  if need_grad and ctx.needs_input_grad[1] else None)
        a = ce_scale.float()
        b = kl_scale.float() if with_kl and kl_scale is not None else None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            hc = h[s:e]
            z = _mm(hc, w).float()                                   # [C, V] float32 logits of this chunk
            lse = torch.logsumexp(z, dim=-1)
            v = valid[s:e].float()
            zt = z.gather(1, safe_t[s:e, None])[:, 0]
            ce_sum += ((lse - zt) * v).sum()
            z -= lse[:, None]                                        # z ← log p_θ
            if with_kl:
                assert ref_h is not None and ref_w is not None
                lr = _mm(ref_h[s:e], ref_w).float()
                lr -= torch.logsumexp(lr, dim=-1)[:, None]                   # lr ← log p_ref
                pr = lr.exp()
                kl_row = lr.sub_(z).mul_(pr).sum(-1)                         # Σ p_ref (log p_ref − log p_θ)
                kl_sum += (kl_row * v).sum()
                del lr
            if grad_h is None and grad_w is None:
                continue
            # ∂/∂z [a·CE + b·KL] = (a + b)·p_θ − a·onehot(t) − b·p_ref   (on valid rows)
            wa = a * v
            p = z.exp_()                                             # z ← p_θ (in place)
            if with_kl:
                wb = b * v
                p.mul_((wa + wb)[:, None])
                p.sub_(pr.mul_(wb[:, None]))
                del pr
            else:
                p.mul_(wa[:, None])
            p.scatter_add_(1, safe_t[s:e, None], -wa[:, None])
            d = p
            if grad_h is not None:
                grad_h[s:e] = _mm(d, w.t()).to(h.dtype)               # [C, H]
            if grad_w is not None:
                grad_w += _mm(d.t(), hc.t()).float()                  # [V, H]
            del d, p, z
        objective = a * ce_sum + (b * kl_sum if b is not None else 0.0)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        count = valid.sum()
        ctx.mark_non_differentiable(count)
        return objective, ce_sum, count, kl_sum

    @staticmethod
    def backward(ctx: Any, g: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is None and grad_w is None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            raise RuntimeError("fused loss: backward through a forward that ran without gradients")
        gh = grad_h * g.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * g.float()).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None


KERNELS = ("auto", "torch", "liger")


def liger_available() -> bool:
    """Whether Liger-Kernel's fused linear cross-entropy can be imported (the ``kcpt[gpu]`` extra)."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or triton failing to load on a machine without a GPU
        return False
    return True


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """``torch`` or ``liger`` for ``train.fused_loss_kernel`` on ``device`` (see the module docstring); ``liger``
    without the package or without CUDA is a :class:`~kcpt.errors.ConfigError` naming the fix."""
    from kcpt.errors import ConfigError

    if kernel not in KERNELS:
        raise ConfigError(f"train.fused_loss_kernel: {kernel!r} is not one of {', '.join(KERNELS)}")
    if kernel == "torch":
        return "torch"
    if kernel == "auto":
        return "liger" if device.type == "cuda" and liger_available() else "torch"
    if device.type != "cuda":
        raise ConfigError(f"train.fused_loss_kernel: liger runs on CUDA only, and this worker trains on {device}: "
                          "set train.use_gpu: true on a GPU machine, or train.fused_loss_kernel: torch (or auto)")
    if not liger_available():
        raise ConfigError("train.fused_loss_kernel: liger, but the liger_kernel package is not installed on this "
                          "worker: pip install 'kcpt[gpu]' (or liger-kernel), or set train.fused_loss_kernel: "
                          "torch (or auto)")
    return "liger"


def _liger_ce(h: Tensor, weight: Tensor, targets: Tensor, ce_scale: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The CE-only case through Liger's fused linear cross-entropy (sum over the targets ≠ -100)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    ce = liger_fused_linear_cross_entropy(h.contiguous(), weight, targets.contiguous(), ignore_index=IGNORE_INDEX,
                                          reduction="sum")
    ce_sum = ce.detach().float()
    count = (targets != IGNORE_INDEX).sum()
    return ce * ce_scale.to(ce.dtype), ce_sum, count, torch.zeros((), dtype=torch.float32, device=h.device)


def fused_ce_kl(hidden: Tensor, weight: Tensor, labels: Tensor, *, ce_scale: Tensor | float = 1.0,
                ref_hidden: Tensor | None = None, ref_weight: Tensor | None = None,
                kl_scale: Tensor | float | None = None, chunk_tokens: int | None = None,
                kernel: str = "torch") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(objective, ce_sum, ce_count, kl_sum)`` of the head ``weight`` [V, H] on ``hidden`` [B, T, H].

    ``objective = ce_scale·CE_sum + kl_scale·KL_sum`` is differentiable w.r.t. ``hidden`` and ``weight``;
    ``ce_sum`` (float32), ``ce_count`` (int64) and ``kl_sum`` (float32; 0 without a reference) are detached
    values equal to :func:`kcpt.train.losses.token_ce_sum` / :func:`~kcpt.train.losses.kl_to_reference_sum` of
    the logits ``hidden @ weight.T``. ``ref_hidden`` [B, T, H_ref] and ``ref_weight`` [V, H_ref]: the frozen
    reference's final hidden states and head (no gradient). ``kernel``: ``torch`` or ``liger`` (resolved,
    :func:`resolve_kernel`; ``liger`` applies to the CE-only case)."""
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden [B, T, H] and labels [B, T], got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    hdim = hidden.shape[-1]
    h = hidden[:, :-1].reshape(-1, hdim)
    targets = labels[:, 1:].reshape(-1).long()
    rh = None
    if ref_hidden is not None:
        if ref_weight is None or ref_hidden.shape[:2] != hidden.shape[:2]:
            raise ValueError("ref_hidden needs ref_weight and the same [B, T] as hidden")
        rh = ref_hidden.detach()[:, :-1].reshape(-1, ref_hidden.shape[-1])
        if kl_scale is None:
            kl_scale = 0.0
    dev = hidden.device
    a = ce_scale if isinstance(ce_scale, Tensor) else torch.tensor(float(ce_scale), device=dev)
    b = None
    if rh is not None:
        b = kl_scale if isinstance(kl_scale, Tensor) else torch.tensor(float(kl_scale), device=dev)  # type: ignore[arg-type]
    if kernel == "liger" and rh is None:
        return _liger_ce(h, weight, targets, a.detach())
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    chunk = auto_chunk(weight.shape[0], h.shape[0], chunk_tokens)
    out = _FusedCEKL.apply(h, weight, targets, a.detach(), rh, ref_weight.detach() if ref_weight is not None else None,
                           b.detach() if b is not None else None, chunk, need_grad)
    return out


# --------------------------------------------------------------------------- the model side


class LossHeadLM(torch.nn.Module):
    """An HF causal LM (``module``) with two more forward modes (see the module docstring). ``config`` and
    ``get_output_embeddings`` are the LM's, so code that reads them works on the wrapper too."""

    def __init__(self, lm: torch.nn.Module, kernel: str = "torch") -> None:
        super().__init__()
        self.module = lm
        self.kernel = kernel
        """``torch`` or ``liger``: the kernel of the ``kcpt_loss`` mode (:func:`resolve_kernel`)."""

    @property
    def config(self) -> Any:
        return self.module.config

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.module.get_output_embeddings()

    def forward(self, *args: Any, kcpt_loss: dict[str, Any] | None = None, kcpt_hidden: bool = False,
                **kwargs: Any) -> Any:
        if kcpt_loss is None and not kcpt_hidden:
            return self.module(*args, **kwargs)
        kwargs.setdefault("use_cache", False)
        hidden = self.module.base_model(*args, **kwargs).last_hidden_state
        if kcpt_hidden:
            return hidden
        assert kcpt_loss is not None
        return fused_ce_kl(hidden, self.module.get_output_embeddings().weight, **{"kernel": self.kernel, **kcpt_loss})


def with_loss_head(model: torch.nn.Module) -> LossHeadLM:
    """``model`` if it is a :class:`LossHeadLM`, else a new one around it (no copy: it shares the parameters)."""
    return model if isinstance(model, LossHeadLM) else LossHeadLM(model)


def has_loss_head(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a :class:`LossHeadLM` or a DDP / DeepSpeed wrapper of one."""
    return isinstance(model, LossHeadLM) or isinstance(getattr(model, "module", None), LossHeadLM)


def unfused_reason(model: torch.nn.Module) -> str | None:
    """Why the fused loss cannot stand for ``model``'s own logits (it computes ``hidden @ weight.T`` and nothing
    else), or None: an output-head bias, a logit scale or a final logit soft-cap. The loop then uses the model's
    logits (``train.fused_loss`` off for that run), so training, eval and every report score the same function."""
    m = getattr(model, "module", model)
    if getattr(m.get_output_embeddings(), "bias", None) is not None:
        return "its output head has a bias"
    cfg = getattr(m, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        return "it soft-caps its logits (final_logit_softcapping)"
    scale = getattr(cfg, "logit_scale", None)
    if scale is not None and scale != 1:
        return f"it scales its logits (logit_scale {scale})"
    return None


def head_weight(model: torch.nn.Module) -> torch.nn.Parameter:
    """The output-head weight [V, H] of an HF causal LM (or of the module a DeepSpeed engine wraps)."""
    m = getattr(model, "module", model)
    return m.get_output_embeddings().weight
