"""Demo BPE training, hashing stable across save/load, loading by path, pad fallback."""

from __future__ import annotations

import glob
import os

import konlpy
import pytest
from transformers import PreTrainedTokenizerFast

from kcpt.config import TokenizerConfig
from kcpt.errors import ConfigError
from kcpt.model.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    load_tokenizer,
    pad_token_id,
    save_tokenizer,
    tokenizer_sha256,
    train_bpe_tokenizer,
)

CORPUS = sorted(glob.glob(os.path.join(os.path.dirname(konlpy.__file__), "data/corpus/*/*.txt")))


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [open(p, encoding="utf-8").read() for p in CORPUS]


def test_train_is_deterministic_and_has_eos_and_distinct_pad(texts):
    a = train_bpe_tokenizer(texts, 2000)
    b = train_bpe_tokenizer(texts, 2000)
    assert tokenizer_sha256(a) == tokenizer_sha256(b)
    assert len(a) == 2000
    assert a.eos_token == EOS_TOKEN and a.pad_token == PAD_TOKEN
    assert a.pad_token_id != a.eos_token_id
    ids = a("대한민국 헌법")["input_ids"]
    assert a.decode(ids) == "대한민국 헌법"
    assert a.eos_token_id not in ids  # EOS is appended by the pipeline, not by the tokenizer


def test_small_corpus_stops_below_target(texts):
    tok = train_bpe_tokenizer(texts, 20000)
    assert 1000 < len(tok) < 20000


def test_sha_stable_across_save_load_and_differs_between_tokenizers(texts, tmp_path):
    tok = train_bpe_tokenizer(texts, 1000)
    h = tokenizer_sha256(tok)
    save_tokenizer(tok, tmp_path / "t1")
    assert tokenizer_sha256(tmp_path / "t1") == h
    again = load_tokenizer(TokenizerConfig(path=str(tmp_path / "t1")))
    save_tokenizer(again, tmp_path / "t2")
    assert tokenizer_sha256(again) == h == tokenizer_sha256(tmp_path / "t2")
    assert tokenizer_sha256(train_bpe_tokenizer(texts, 1100)) != h


def test_demo_tokenizer_is_cached(tmp_path):
    tok = load_tokenizer(TokenizerConfig(), cache_dir=tmp_path)
    cached = list((tmp_path / "tokenizers").iterdir())
    assert len(cached) == 1 and (cached[0] / "tokenizer.json").is_file()
    mtime = (cached[0] / "tokenizer.json").stat().st_mtime_ns
    again = load_tokenizer(TokenizerConfig(), cache_dir=tmp_path)
    assert (cached[0] / "tokenizer.json").stat().st_mtime_ns == mtime
    assert tokenizer_sha256(tok) == tokenizer_sha256(again)
    assert 3000 < len(tok) <= 8192 and tok.pad_token_id != tok.eos_token_id


def test_tokenizer_without_pad_pads_with_eos(texts, tmp_path):
    tok = train_bpe_tokenizer(texts, 600)
    no_pad = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token=EOS_TOKEN)
    assert no_pad.pad_token_id is None
    assert pad_token_id(no_pad) == no_pad.eos_token_id
    assert pad_token_id(tok) == tok.pad_token_id


def test_missing_tokenizer_path_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.path"):
        load_tokenizer(TokenizerConfig(path=str(tmp_path / "nope")))


def test_demo_tokenizer_and_demo_corpus_share_the_cache_root(tmp_path, monkeypatch):
    from kcpt.data.demo import default_demo_dir
    from kcpt.model.tokenizer import default_cache_dir

    monkeypatch.setenv("KCPT_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path == default_demo_dir().parent
