"""Tiny model/tokenizer helpers for the checkpoint tests, and the child process they SIGKILL mid-save.

``python checkpoint_child.py ROOT pause``: save two complete checkpoints, then start a third whose model save
pauses after the model files (failure injection: the parent kills it there).
``python checkpoint_child.py ROOT loop``: save new checkpoints and re-save ``latest`` in a loop until killed.
Before each new step the embeddings get +1.0, so a checkpoint's weights must equal the seed-7 init + (step-1).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def tiny_llama(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(20)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def main(root: Path, mode: str) -> None:
    from kcpt.train.checkpoint import build_manifest, default_save_model, save_checkpoint

    model, tok = tiny_llama(seed=7), tiny_tokenizer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def save(name: str, step: int, **kw) -> None:
        man = build_manifest(tokenizer_sha256="a", data_sha256={}, config_sha256="c", base_model="tiny",
                             restore_mode="full", step=step, stage="cpt", stage_index=0)
        save_checkpoint(root / name, model=model, tokenizer=tok, trainer_state={"optimizer": opt.state_dict(),
                        "step": step}, manifest=man, **kw)

    def bump() -> None:
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(1.0)

    save("step-000001", 1)
    save("latest", 1)
    (root.parent / "first-done").write_text("1")
    if mode == "pause":
        def slow_save(m: torch.nn.Module, d: Path) -> None:
            default_save_model(m, d)
            (root.parent / "in-save").write_text("1")   # model files written, nothing else yet
            time.sleep(120)

        bump()
        save("step-000002", 2, save_model_fn=slow_save)
    else:
        step = 1
        while True:
            step += 1
            bump()
            save(f"step-{step:06d}", step)
            save("latest", step)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
