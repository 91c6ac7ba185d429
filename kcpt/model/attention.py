"""Packed-row attention inputs per attention implementation, built without a device→host sync.

A packed row holds several documents; a new document starts where ``position_ids[t] != position_ids[t-1] + 1``
(the rule transformers uses). Left to itself, transformers detects packed rows from ``position_ids`` with a host
``.all()`` per forward and then builds a dense 4D block-causal mask (sdpa/eager). The loop instead passes what the
implementation needs, built on the device (or on the host from the batch's own numpy rows):

- ``sdpa``: a 4D boolean block-causal mask ``[B, 1, T, T]`` (transformers passes a 4D mask through untouched);
- ``eager``: the same as an additive float mask (a boolean one would be *added* as 0/1 by eager attention);
- ``flex_attention``: a ``BlockMask`` built once per batch from the document ids (``create_block_mask``): masked
  blocks are skipped, no dense mask;
- ``flash_attention_2`` / ``flash_attention_3``: the varlen kernel's ``cu_seq_lens`` (document boundaries of the
  flattened batch, from the batch's host-side ``cu_seqlens``) and ``max_length`` — no mask at all. transformers
  still runs its own packed-row check in the mask preparation (one host read per forward; documented).

:func:`check_available` validates a configured implementation: an error naming the missing package.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from kcpt.errors import ConfigError

IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def available(impl: str) -> str | None:
    """``None`` when ``impl`` can run here, else the reason (what is missing)."""
    if impl not in IMPLEMENTATIONS:
        return f"unknown attention implementation '{impl}' (one of {', '.join(IMPLEMENTATIONS)})"
    pkg = _PACKAGES.get(impl)
    if pkg is not None:
        if importlib.util.find_spec(pkg) is None:
            hint = "pip install flash-attn" if pkg == "flash_attn" else "flash-attention's hopper/ build"
            return f"{impl} needs the '{pkg}' package ({hint}), not installed"
        if not torch.cuda.is_available():
            return f"{impl} needs a CUDA GPU"
    if impl == "flex_attention":
        try:
            from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
        except ImportError:
            return "flex_attention needs torch.nn.attention.flex_attention (torch ≥ 2.5)"
    return None


def check_available(impl: str) -> None:
    why = available(impl)
    if why is not None:
        raise ConfigError(f"model.attn_implementation: {why}")


def doc_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of every position ``[B, T]`` (0, 0, 1, 1, 1, 2, ...) — on the device, no sync."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def block_causal(position_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, 1, T, T]``: query ``q`` sees key ``k`` iff ``k ≤ q`` in the same document."""
    d = doc_ids(position_ids)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((d[:, :, None] == d[:, None, :]) & causal)[:, None]


def host_cu_seqlens(position_ids) -> tuple[Any, int]:
    """``(cu_seqlens int32 [n_docs + 1], max_len)`` of the flattened batch, from host (numpy) position ids."""
    import numpy as np

    pos = np.asarray(position_ids)
    b, t = pos.shape
    starts = np.ones((b, t), dtype=bool)
    starts[:, 1:] = np.diff(pos, axis=-1) != 1
    idx = np.flatnonzero(starts.reshape(-1))
    cu = np.concatenate([idx, [b * t]]).astype(np.int32)
    return cu, int(np.diff(cu).max()) if len(cu) > 1 else 0


def packed_kwargs(impl: str, batch: dict[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Keyword arguments (besides ``input_ids`` / ``position_ids``) for a packed batch under ``impl``."""
    pos = batch["position_ids"]
    if impl == "sdpa":
        return {"attention_mask": block_causal(pos)}
    if impl == "eager":
        m = block_causal(pos)
        return {"attention_mask": torch.zeros(m.shape, dtype=dtype, device=pos.device).masked_fill_(
            ~m, torch.finfo(dtype).min)}
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        d = doc_ids(pos)

        def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return (d[b, q] == d[b, kv]) & (q >= kv)

        b, t = pos.shape
        return {"attention_mask": create_block_mask(mask_mod, b, None, t, t, device=str(pos.device))}
    if impl in ("flash_attention_2", "flash_attention_3"):
        cu, max_len = batch["cu_seqlens"], int(batch["max_seqlen"])
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}
    raise ConfigError(f"unknown attention implementation '{impl}'")


def attn_impl(model: torch.nn.Module) -> str:
    """The attention implementation of an HF model (or of the module a DDP/DeepSpeed wrapper holds)."""
    m = getattr(model, "module", model)
    return str(getattr(m.config, "_attn_implementation", None) or "sdpa")


def model_inputs(model: torch.nn.Module, batch: dict[str, Any], cache: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """``input_ids``, ``position_ids`` and the packed attention inputs of ``batch`` for ``model``; ``cache``
    (a dict per micro-batch) shares them between the trained model and the reference."""
    impl = attn_impl(model)
    if cache is not None and impl in cache:
        extra = cache[impl]
    else:
        extra = packed_kwargs(impl, batch)
        if cache is not None:
            cache[impl] = extra
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], **extra}
