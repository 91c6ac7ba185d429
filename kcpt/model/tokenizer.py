"""Tokenizers: any HF tokenizer by local path (or hub name), or the embedded ``"demo"`` byte-level BPE.

The demo tokenizer is a byte-level BPE trained deterministically on the demo corpus' ``raw_train`` split with the
``tokenizers`` library, wrapped as a :class:`~transformers.PreTrainedTokenizerFast` with ``eos_token``
``<|endoftext|>`` and a distinct ``pad_token`` ``<|pad|>``. It is trained once and cached on disk.

:func:`tokenizer_sha256` identifies a tokenizer by the content of its saved files (stable across save/load); the
prepared data and every checkpoint record it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from kcpt.config import TokenizerConfig
from kcpt.errors import ConfigError
from kcpt.fsutil import remove_stale_siblings, temp_sibling
from kcpt.hashing import sha256_bytes, sha256_json

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DEMO_RECIPE_VERSION = 1
"""Bump when the demo training recipe changes (it is part of the cache key)."""

# Files whose content defines a saved tokenizer. Keys that only record where it was loaded from are dropped.
_VOLATILE_CONFIG_KEYS = {"name_or_path", "_name_or_path", "tokenizer_file", "transformers_version", "is_local",
                         "local_files_only", "_commit_hash", "cache_dir", "token", "revision"}


def default_cache_dir() -> Path:
    """``$KCPT_CACHE_DIR`` or ``~/.cache/kcpt`` (shared with the demo corpus): where the demo tokenizer is cached."""
    from kcpt.data.demo import cache_root

    return cache_root()


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (deterministic for the same texts in the same order).

    The vocabulary holds the 256 byte symbols, ``<|endoftext|>`` (id 0, eos) and ``<|pad|>`` (id 1, pad) and
    merges up to ``vocab_size`` (min frequency 1; it stops earlier when no pair is left to merge).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """Save with ``save_pretrained`` into ``directory`` (created); returns it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(d))
    return d


def _canonical_file_hash(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            obj = json.loads(data)
        except ValueError:
            return sha256_bytes(data)
        if isinstance(obj, dict) and path.name != "tokenizer.json":
            obj = {k: v for k, v in obj.items() if k not in _VOLATILE_CONFIG_KEYS}
        return sha256_json(obj)
    return sha256_bytes(data)


def tokenizer_sha256(tokenizer_or_dir: PreTrainedTokenizerBase | str | Path) -> str:
    """SHA-256 of a tokenizer's saved files (JSON in canonical form, load-location keys dropped).

    Accepts a tokenizer (saved to a temporary directory first) or a directory written by ``save_pretrained``.
    The same tokenizer gives the same hash after any number of save/load round trips.
    """
    if isinstance(tokenizer_or_dir, str | Path):
        root = Path(tokenizer_or_dir)
        files = {p.relative_to(root).as_posix(): _canonical_file_hash(p)
                 for p in sorted(root.rglob("*")) if p.is_file()}
        return sha256_json(files)
    with tempfile.TemporaryDirectory(prefix="kcpt-tok-") as tmp:
        save_tokenizer(tokenizer_or_dir, tmp)
        return tokenizer_sha256(Path(tmp))


def _demo_texts() -> list[str]:
    from kcpt.data.demo import build_demo_corpus
    from kcpt.data.rejects import RejectReport
    from kcpt.data.sources import read_documents

    path = build_demo_corpus()["raw_train"]
    return [d.text for d in read_documents([path], report=RejectReport())]


def load_demo_tokenizer(vocab_size: int, *, cache_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The demo BPE, trained on the demo ``raw_train`` text once and cached under ``cache_dir``.

    The cache key covers the training text, ``vocab_size`` and the recipe version.
    """
    texts = _demo_texts()
    key = sha256_json({"texts": sha256_json(texts), "vocab_size": vocab_size, "recipe": DEMO_RECIPE_VERSION})[:16]
    target = Path(cache_dir or default_cache_dir()) / "tokenizers" / f"demo-{key}"
    if not (target / "tokenizer.json").is_file():
        tok = train_bpe_tokenizer(texts, vocab_size)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(target)  # caches killed earlier
        tmp = temp_sibling(target)
        save_tokenizer(tok, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process cached it first: both are identical
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(target))


def load_tokenizer(cfg: TokenizerConfig, *, cache_dir: str | Path | None = None,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer ``cfg.path`` names: ``"demo"`` (trained/cached), a local directory, or a hub name.

    Remote code runs only when ``trust_remote_code`` is set. The tokenizer must be a fast tokenizer (offsets)
    with an EOS token (documents and answers end with it); a missing pad token is allowed (see
    :func:`pad_token_id`). Raises :class:`~kcpt.errors.ConfigError` otherwise.
    """
    if cfg.path == "demo":
        return load_demo_tokenizer(cfg.vocab_size, cache_dir=cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        local = Path(cfg.path).expanduser()
        if local.is_dir() and not any(local.glob("tokenizer.*")) and not any(local.glob("*vocab*")) \
                and not any(local.glob("*.model")):
            raise ConfigError(f"tokenizer.path: {local} holds no tokenizer vocabulary (no tokenizer.json, "
                              "tokenizer.model, vocab.json, …): copy the tokenizer files there "
                              "(tokenizer.save_pretrained(DIR) writes them)") from None
        raise ConfigError(f"tokenizer.path: cannot load tokenizer '{cfg.path}': {e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer.json raises KeyError, TypeError, ... from deep inside
        raise ConfigError(f"tokenizer.path: cannot load tokenizer '{cfg.path}' ({type(e).__name__}: {e}); its files "
                          "are damaged or not a Hugging Face tokenizer") from None
    if not tok.is_fast:
        raise ConfigError(f"tokenizer.path: tokenizer '{cfg.path}' has no fast (Rust) version; kcpt needs one "
                          "for character offsets (answer-only exam labels)")
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer.path: tokenizer '{cfg.path}' has no eos_token; kcpt needs one to end "
                          "documents and answers")
    return tok


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding packed rows: the pad token, else EOS.

    Padding is identified by position (labels -100), never by id, so pad == eos is safe.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id)
