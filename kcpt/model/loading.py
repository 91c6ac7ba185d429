"""Build or load the causal LM a stage trains, and the frozen reference for the KL term.

- ``model.name_or_path == "tiny"``: a Llama-architecture model built from :class:`~kcpt.config.TinyModelConfig`
  with random init seeded by ``model.seed`` (the same seed gives the same weights on every worker), vocabulary
  sized to the tokenizer.
- anything else (or an explicit ``path``, e.g. a kcpt checkpoint's model directory): any HF causal LM via
  ``AutoModelForCausalLM.from_pretrained``; remote code runs only when ``model.trust_remote_code`` is set.

Every model comes back with ``config.use_cache = False`` (transformers then detects packed documents from
``position_ids``; see MACHINE-NOTES) and the configured attention implementation and dtype.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from kcpt.config import ModelConfig
from kcpt.errors import ConfigError
from kcpt.model.attention import check_available

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(cfg: ModelConfig) -> torch.dtype:
    return _DTYPES[cfg.dtype]


def tiny_llama_config(cfg: ModelConfig, vocab_size: int, *, pad_token_id: int | None = None,
                      eos_token_id: int | None = None) -> LlamaConfig:
    """The ``LlamaConfig`` of the built-in tiny model for a vocabulary of ``vocab_size`` tokens."""
    t = cfg.tiny
    if t.hidden_size % t.num_heads:
        raise ConfigError(f"model.tiny: hidden_size {t.hidden_size} is not divisible by num_heads {t.num_heads}")
    return LlamaConfig(vocab_size=vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                       num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
                       intermediate_size=t.intermediate_size, max_position_embeddings=t.max_position_embeddings,
                       attention_dropout=t.attention_dropout,
                       pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None,
                       tie_word_embeddings=False, use_cache=False)


def _finish(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def build_tiny_model(cfg: ModelConfig, vocab_size: int, *, pad_token_id: int | None = None,
                     eos_token_id: int | None = None, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Random-init tiny Llama; deterministic for ``cfg.seed`` and leaves the global RNG state untouched.

    ``dtype`` overrides ``cfg.dtype`` (the loop keeps trained weights in float32)."""
    check_available(cfg.attn_implementation)
    config = tiny_llama_config(cfg, vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    config._attn_implementation = cfg.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    return _finish(model.to(dtype or torch_dtype(cfg)), cfg)


def load_causal_lm(cfg: ModelConfig, *, vocab_size: int | None = None, path: str | Path | None = None,
                   pad_token_id: int | None = None, eos_token_id: int | None = None,
                   dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The model a stage starts from, in ``dtype`` (default ``cfg.dtype``).

    ``path`` (a directory written by ``save_pretrained``, e.g. a checkpoint) wins over ``cfg.name_or_path``.
    For the tiny model ``vocab_size`` (= ``len(tokenizer)``) is required. A loaded model whose embedding table
    is smaller than ``vocab_size`` is resized (new rows use transformers' default init) with a warning.
    """
    source = str(path) if path is not None else cfg.name_or_path
    if source == "tiny":
        if vocab_size is None:
            raise ValueError("the tiny model needs vocab_size (len(tokenizer))")
        return build_tiny_model(cfg, vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id, dtype=dtype)
    check_available(cfg.attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch_dtype(cfg),
                                                     attn_implementation=cfg.attn_implementation,
                                                     trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        where = "checkpoint" if path is not None else "model.name_or_path"
        raise ConfigError(f"{where}: cannot load a causal LM from '{source}': {e}") from None
    if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
        log.warning("resizing embeddings of %s from %d to %d tokens", source,
                    model.get_input_embeddings().num_embeddings, vocab_size)
        model.resize_token_embeddings(vocab_size)
    return _finish(model, cfg)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of an HF causal LM (``model.base_model.layers``)."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"{type(model).__name__}: no decoder layers at base_model.layers to compile")
    return layers


def compile_layers(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` every decoder layer in place (``nn.Module.compile``: parameter names, the state dict and
    ``save_pretrained`` are unchanged; embeddings, mask building and the loss stay eager). Layers share one
    code object, so the layers compile once per input shape."""
    for layer in decoder_layers(model):
        layer.compile()
    return model


def autocast(cfg: ModelConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to the compute dtype (a no-op for float32): forward passes of float32 master weights."""
    dtype = torch_dtype(cfg)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Put ``model`` in eval mode with no parameter requiring grad (a KL reference)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
