"""Korean tokenizer audit and expansion (folded init) on a real BPE and a real tiny Llama."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kcpt.model.audit import (
    WordCounts,
    audit_tokenizer,
    expand_tokenizer_and_model,
    expand_vocabulary,
    propose_korean_tokens,
)

TEXTS = [
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "모든 국민은 인간으로서의 존엄과 가치를 가지며, 행복을 추구할 권리를 가진다.",
    "국가는 개인이 가지는 불가침의 기본적 인권을 확인하고 이를 보장할 의무를 진다.",
] * 4


def _byte_bpe(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=["</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["국가 존엄 권리"], trainer)  # a tokenizer that barely knows the corpus
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def test_special_tokens_past_the_vocabulary_keep_their_ids_through_expansion():
    """Llama-3 / Qwen2 keep their special tokens as added tokens just past the BPE vocabulary (128000…). The new
    words took the ids after them, and on reload tokenizers numbered the specials after the grown vocabulary: on top
    of the last new words (EOS = a Korean word, '임명한다' decoded with a BOS in it)."""
    from tokenizers import AddedToken

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["국가 존엄 권리"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    size = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken("<|begin_of_text|>", special=True), AddedToken("<|end_of_text|>", special=True)])
    base = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    assert (base.bos_token_id, base.eos_token_id) == (size, size + 1)
    words = propose_korean_tokens(base, TEXTS, max_new=20)
    new, pieces = expand_vocabulary(base, words)
    assert (new.bos_token_id, new.eos_token_id) == (size, size + 1)  # where the model's config says they are
    ids = new.convert_tokens_to_ids(list(pieces))
    assert len(pieces) > 5 and min(ids) == size + 2 and max(ids) == len(new) - 1 and len(set(ids)) == len(ids)
    for text in TEXTS[:3]:
        enc = new(text, add_special_tokens=False)["input_ids"]
        assert new.decode(enc) == text and new.eos_token_id not in enc and new.bos_token_id not in enc


def test_a_byte_fallback_bpe_gains_whole_characters_not_glued_byte_pieces():
    """Llama-2 / Mistral style (BPE with byte_fallback, Metaspace): a syllable missing from the vocabulary is byte
    pieces ``<0xEC><0x95><0x9E>``. Chaining them made entries like ``▁<0xEC><0x95><0x9E>`` that the ByteFallback
    decoder printed as that text (and folded from the characters of the string '<0xEC>'); now the syllable becomes an
    entry of its own, initialised from its byte pieces, and the words are chained from syllables."""
    from tokenizers import normalizers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.normalizer = normalizers.NFC()
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(["국가 존엄 권리"] * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces], show_progress=False))
    base = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert "<0xEB>" in base.convert_ids_to_tokens(base("대한민국", add_special_tokens=False)["input_ids"])
    new, pieces = expand_vocabulary(base, ["대한민국", "국민"])
    assert pieces and not [t for t in pieces if "<0x" in t]  # no entry glued from byte pieces
    assert pieces["대"] == base.convert_tokens_to_ids(["<0xEB>", "<0x8C>", "<0x80>"])  # its bytes' rows
    for text in [*TEXTS[:3], "대한민국 대한 국민 앞서"]:
        enc = new(text, add_special_tokens=False)["input_ids"]
        assert new.decode(enc) == text, text
    assert new.convert_ids_to_tokens(new("대한민국", add_special_tokens=False)["input_ids"]) == ["▁대한민국"]


def test_the_audit_counts_words_where_they_stand_in_the_text():
    """A Metaspace tokenizer (SentencePiece style) encodes a word alone as ``['▁', '헌법']``: counted alone, every word
    cost a token more (tokens / syllable 5/6 here, not 3/6) and no syllable was 'one token'; a byte-level BPE's word
    alone is its bare form, where text mostly has its leading-space form (one token, yet proposed). Text the
    tokenizer cannot encode (no byte fallback) is the unknown-token share."""
    vocab = [("<unk>", 0.0), ("</s>", 0.0), ("▁", -2.0), ("헌법", -1.0), ("대한", -1.0), ("민국", -1.0),
             *((c, -5.0) for c in "대한민국헌법")]
    uni = Tokenizer(models.Unigram(vocab, unk_id=0))
    uni.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    uni.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    sp = PreTrainedTokenizerFast(tokenizer_object=uni, unk_token="<unk>", eos_token="</s>")
    assert sp.convert_ids_to_tokens(sp("대한민국 헌법", add_special_tokens=False)["input_ids"]) == \
        ["▁", "대한", "민국", "▁", "헌법"]
    rep = audit_tokenizer(sp, ["대한민국 헌법"])
    assert rep.tokens_per_hangul_syllable == pytest.approx(3 / 6) and rep.single_token_syllable_share == 1.0
    assert rep.unknown_token_share == 0.0
    assert audit_tokenizer(sp, ["뷁똠 헌법"]).unknown_token_share > 0
    # byte-level BPE that learnt ' 국민' (one token 'Ġ국민') but not a bare '국민' (two): where '국민' follows a space
    # it is one token, so it is neither fragmented nor proposed (counted alone, it was both)
    text = ["우리 국민 국민 국민 국민"] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=280, special_tokens=["</s>"], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    assert [len(bpe(w, add_special_tokens=False)["input_ids"]) for w in (" 국민", "국민")] == [1, 2]
    assert "국민" not in propose_korean_tokens(bpe, text, min_tokens=2)
    assert "국민" not in [w for w, _, _ in audit_tokenizer(bpe, text).most_fragmented]


def test_audit_measures_fragmentation_of_korean():
    tok = _byte_bpe(300)
    rep = audit_tokenizer(tok, TEXTS)
    assert rep.texts == len(TEXTS) and rep.tokens > 0
    # Byte-level pieces of unmerged syllables: ~3 tokens per syllable, many partial-byte tokens.
    assert rep.tokens_per_hangul_syllable > 2.0
    assert rep.partial_byte_token_share > 0.5
    assert rep.most_fragmented and rep.most_fragmented[0][2] >= 3
    assert "tokens / Hangul syllable" in rep.summary()


def test_expansion_uses_folded_init_and_shortens_korean():
    tok = _byte_bpe(300)
    counts = WordCounts()
    before = audit_tokenizer(tok, TEXTS, word_counts=counts)
    new = propose_korean_tokens(tok, TEXTS, max_new=8, min_count=3)
    # the audit's pass over the corpus proposes the same words (audit-tokenizer --expand tokenizes it once)
    assert propose_korean_tokens(tok, counts=counts, max_new=8, min_count=3) == new
    assert new and all(len(w) >= 2 for w in new)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         tie_word_embeddings=False))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    grown, pieces = expand_tokenizer_and_model(tok, model, new)
    assert len(grown) == len(tok) + len(pieces) and model.get_input_embeddings().weight.shape[0] == len(grown)
    for token, old_ids in pieces.items():  # every new entry (words and the merge chain's prefixes): folded init
        nid = grown.convert_tokens_to_ids(token)
        assert nid >= len(tok)
        torch.testing.assert_close(model.get_input_embeddings().weight[nid], old_in[old_ids].mean(0))
        torch.testing.assert_close(model.get_output_embeddings().weight[nid], old_out[old_ids].mean(0))
    for word in new:  # each word is ONE token, after a space and at the start
        assert len(grown.tokenize(" " + word)) == 1 and len(grown.tokenize(word)) == 1
        assert grown.decode(grown(word, add_special_tokens=False)["input_ids"]) == word
    # old rows untouched, Korean now takes fewer tokens, text still round-trips
    torch.testing.assert_close(model.get_input_embeddings().weight[: old_in.shape[0]], old_in)
    after = audit_tokenizer(grown, TEXTS)
    assert after.tokens < before.tokens
    for text in TEXTS[:3]:
        assert grown.decode(grown(text, add_special_tokens=False)["input_ids"]) == text
    # a second call with the same words adds nothing
    assert expand_tokenizer_and_model(grown, model, new) == (grown, {})


def test_new_words_keep_their_leading_space_form_in_korean_text_with_spaces():
    """`텍스트를 클릭합니다` with both words added: two tokens, no lone space token between them (added tokens
    gave ['텍스트를', 'Ġ', '클릭합니다'] and sequences the model never saw)."""
    tok = _byte_bpe(300)
    words = ["텍스트를", "클릭합니다", "확인합니다"]
    grown, _ = expand_vocabulary(tok, words)
    text = "텍스트를 클릭합니다. 다음 텍스트를 확인합니다"
    one = {w: grown.tokenize(w) for w in ("텍스트를", " 클릭합니다", " 텍스트를", " 확인합니다")}
    assert all(len(v) == 1 for v in one.values())
    assert grown.tokenize(text) == [*one["텍스트를"], *one[" 클릭합니다"], ".", *tok.tokenize(" 다음"),
                                    *one[" 텍스트를"], *one[" 확인합니다"]]
    assert grown.decode(grown(text, add_special_tokens=False)["input_ids"]) == text
    assert len(grown(text)["input_ids"]) < len(tok(text)["input_ids"])


@pytest.mark.parametrize("min_tokens", [3, 100])
def test_proposals_respect_thresholds(min_tokens: int):
    tok = _byte_bpe(300)
    props = propose_korean_tokens(tok, TEXTS, max_new=50, min_count=3, min_tokens=min_tokens)
    if min_tokens == 100:
        assert props == []
    else:
        assert all(len(tok(w, add_special_tokens=False)["input_ids"]) >= 3 for w in props)


def test_cli_audits_and_writes_expanded_tokenizer(tmp_path):
    import json
    import subprocess
    import sys

    from transformers import AutoTokenizer

    src = tmp_path / "ko.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    base = _byte_bpe(300)
    base.save_pretrained(tmp_path / "tok")
    out = tmp_path / "expanded"
    res = subprocess.run([sys.executable, "-m", "kcpt.cli", "audit-tokenizer", "--tokenizer", str(tmp_path / "tok"),
                          "--input", str(src), "--expand", "5", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "tokens / Hangul syllable" in res.stdout and "expanded tokenizer" in res.stdout
    grown = AutoTokenizer.from_pretrained(out)
    assert len(grown) > len(base)
    proposed = res.stdout.split("proposed 5 new tokens: ")[1].splitlines()[0].split()
    assert len(proposed) == 5 and all(len(grown.tokenize(" " + w)) == 1 for w in proposed)


def test_new_tokens_the_data_never_shows_are_flagged_undertrained():
    """Expand with six words, train a tiny Llama on text that contains only three of them: the other three new
    rows stay at their folded init and are flagged; the three in the data are not."""
    import copy

    from kcpt.model.undertrained import find_undertrained

    tok = _byte_bpe(300)
    seen, unseen = ["대한민국은", "국민에게", "권리를"], ["인간으로서의", "행복을", "보장할"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         tie_word_embeddings=False))
    grown, _ = expand_tokenizer_and_model(tok, model, seen + unseen)
    init = copy.deepcopy(model)
    text = "대한민국은 국민에게 권리를 준다. 그리고 대한민국은 국민에게 권리를 지킨다. " * 4
    ids = torch.tensor([grown(text, add_special_tokens=False)["input_ids"]])
    assert all(grown.convert_tokens_to_ids(grown.tokenize(" " + w)[0]) in ids for w in seen[1:])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    report = find_undertrained(model, grown, first_new_id=len(tok), init=init)
    flagged = {f.token_id for f in report.undertrained if "barely moved from its init" in f.reasons}

    def spaced(w: str) -> int:  # the id of the word's leading-space form (the form the text uses)
        return grown.convert_tokens_to_ids(grown.tokenize(" " + w)[0])

    for w in unseen:
        assert spaced(w) in flagged, (w, report.summary())
    for w in seen[1:]:  # (the first word starts the text: its bare form is the one used)
        assert spaced(w) not in flagged, (w, report.summary())
    assert grown.convert_tokens_to_ids(grown.tokenize(seen[0])[0]) not in flagged
    assert report.checked == len(grown) - len(tok) and "look undertrained" in report.summary()


def test_cli_reports_undertrained_tokens_of_a_checkpoint(tmp_path):
    import json
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    src = tmp_path / "ko.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    base = _byte_bpe(300)
    base.save_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(base), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "base")
    init = tmp_path / "expanded"
    cli = [sys.executable, "-m", "kcpt.cli", "audit-tokenizer", "--tokenizer", str(tmp_path / "tok"), "--input",
           str(src)]
    r = subprocess.run([*cli, "--expand", "3", "--model", str(tmp_path / "base"), "--out", str(init)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    first_new = json.loads((init / "kcpt-expansion.json").read_text())["first_new_id"]
    assert first_new == len(base)
    # a "trained" checkpoint: every old row and ONE new row moved; the other new rows kept their init
    model = AutoModelForCausalLM.from_pretrained(init)
    with torch.no_grad():
        for w in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            w[:first_new] += 0.5 * torch.randn_like(w[:first_new])
            w[first_new] += 0.5 * torch.randn_like(w[first_new])
    model.save_pretrained(tmp_path / "ckpt")
    r = subprocess.run([*cli, "--checkpoint", str(tmp_path / "ckpt"), "--init", str(init), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    flagged = {f["token_id"] for f in rep["undertrained"] if "barely moved from its init" in f["reasons"]}
    assert first_new not in flagged
    assert flagged == set(range(first_new + 1, first_new + rep["checked"]))
    r = subprocess.run([*cli, "--checkpoint", str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--init" in r.stderr
    # a checkpoint path that does not exist (a step the run pruned): said so, not taken for a hub repo id
    r = subprocess.run([*cli, "--checkpoint", str(tmp_path / "ckpt-gone"), "--init", str(init)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and f"{tmp_path / 'ckpt-gone'}: no such checkpoint directory" in r.stderr, r.stderr


def test_oversample_new_tokens_writes_documents_with_new_tokens_factor_times(tmp_path):
    """CPT on an expanded tokenizer: with ``oversample_new_tokens: 3`` each raw document holding a new token is
    written 3 times (counted as a notice), the others once; without kcpt-expansion.json it is a ConfigError."""
    from kcpt.config import load_config
    from kcpt.data.prepare import prepare_dataset
    from kcpt.data.shards import read_manifest
    from kcpt.errors import ConfigError
    from kcpt.model.commands import EXPANSION_FILE

    base = _byte_bpe(300)
    grown, _ = expand_vocabulary(base, ["텍스트를", "클릭합니다"])
    tok_dir = tmp_path / "tok"
    grown.save_pretrained(tok_dir)
    docs = ["화면의 텍스트를 클릭합니다 그리고 기다립니다", "국가는 국민의 권리를 보장한다 언제나 그렇다",
            "다시 텍스트를 읽어 봅니다 천천히 읽습니다", "대한민국의 영토는 한반도와 그 부속도서로 한다"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs),
                                      encoding="utf-8")
    sets = [f"tokenizer.path={tok_dir}", "data.seq_len=512", "data.filters.min_chars=5",
            "data.datasets.c={kind: raw, inputs: [" + str(tmp_path / "c.jsonl") + "]}"]

    def prepare(factor: int, out: str):
        cfg = load_config(None, [*sets, f"data.datasets.c.oversample_new_tokens={factor}"])
        out_dir = prepare_dataset("c", cfg.data.datasets["c"], cfg, tmp_path / out, grown, progress=False)
        manifest = read_manifest(out_dir)
        return manifest, manifest["tokens"]

    with pytest.raises(ConfigError, match=EXPANSION_FILE):
        prepare(3, "missing")
    (tok_dir / EXPANSION_FILE).write_text(json.dumps({"first_new_id": len(base), "words": []}), encoding="utf-8")
    once, tokens_once = prepare(1, "once")
    three, tokens_three = prepare(3, "three")
    ids = [grown(d, add_special_tokens=True)["input_ids"] for d in docs]
    per_doc = [len(i) + 1 for i in ids]  # + EOS
    new = [k for k, i in enumerate(ids) if max(i) >= len(base)]  # the added words and their merge-chain pieces
    assert {0, 2} <= set(new) and len(new) < len(docs)
    assert tokens_once == sum(per_doc)
    assert tokens_three == sum(per_doc) + 2 * sum(per_doc[k] for k in new)
    assert three["notices"]["oversampled_new_tokens"] == len(new)
    assert "oversampled_new_tokens" not in once.get("notices", {})


def test_audit_tokenizer_misuse_is_one_line_before_any_work(tmp_path, capsys):
    """--model without --expand wrote nothing and exited 0; a missing --model dir took 27 s of hub retries and did
    not name --model; a checkpoint checked against another model's init ended in a ValueError traceback."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kcpt.cli import main
    from kcpt.errors import InputError
    from kcpt.model.undertrained import find_undertrained

    assert main(["audit-tokenizer", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "give --expand N" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["audit-tokenizer", "--expand", "4", "--model", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "o")]) == 2
    assert f"--model {tmp_path / 'nope'}: not a Hugging Face model directory" in capsys.readouterr().err
    assert main(["audit-tokenizer", "--expand", "4", "--model", str(tmp_path)]) == 2
    assert "--model needs --out" in capsys.readouterr().err
    # a tokenizer expansion cannot grow (Unigram): one line before the audit (was a traceback after it, exit 1)
    uni = Tokenizer(models.Unigram([("<unk>", 0.0), ("</s>", 0.0), ("국", -1.0), ("가", -1.0)], unk_id=0))
    PreTrainedTokenizerFast(tokenizer_object=uni, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path / "uni")
    (tmp_path / "t.txt").write_text(TEXTS[0], encoding="utf-8")
    assert main(["audit-tokenizer", "--tokenizer", str(tmp_path / "uni"), "--input", str(tmp_path / "t.txt"),
                 "--expand", "4", "--out", str(tmp_path / "o")]) == 2
    out = capsys.readouterr()
    assert "--expand: vocabulary expansion needs a BPE tokenizer (this one is Unigram)" in out.err and not out.out

    def tiny(vocab):
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2))

    with pytest.raises(InputError, match=r"--init has embedding shapes \[\(40, 16\)"):
        find_undertrained(tiny(48), None, first_new_id=40, init=tiny(40))


def test_expansion_of_a_padded_model_uses_its_spare_rows_and_a_smaller_one_is_refused():
    """A model padded past its tokenizer (rows > tokens) crashed the expansion ("got id … inside the old
    vocabulary"); one with fewer rows than tokens was expanded silently from random rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kcpt.errors import InputError
    from kcpt.model.audit import expand_tokenizer_and_model
    from kcpt.model.undertrained import find_undertrained

    tok = _byte_bpe(300)
    n = len(tok)

    def tiny(rows):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2))

    padded = tiny(n + 64)
    grown, pieces = expand_tokenizer_and_model(tok, padded, ["대한민국", "헌법"])
    assert pieces and len(grown) == n + len(pieces) < n + 64
    assert padded.get_input_embeddings().weight.shape[0] == n + 64  # the padding stays
    emb = padded.get_input_embeddings().weight
    for word, old_ids in pieces.items():
        assert torch.allclose(emb[grown.convert_tokens_to_ids(word)], emb[torch.tensor(old_ids)].mean(dim=0))
    report = find_undertrained(padded, grown, first_new_id=n)
    assert report.checked == len(pieces)  # the new tokens, not the padding rows
    with pytest.raises(InputError, match=rf"the model has {n - 5} embedding rows and the tokenizer {n} tokens"):
        expand_tokenizer_and_model(tok, tiny(n - 5), ["대한민국"])
    # padded (to a multiple of 8 here) with fewer spare rows than new tokens: it grows to the next multiple, not to
    # the exact token count (which dropped the padding kernels expect)
    rows = -(-(n + 1) // 8) * 8
    grown, pieces = expand_tokenizer_and_model(tok, (model := tiny(rows)), propose_korean_tokens(tok, TEXTS))
    got = model.get_input_embeddings().weight.shape[0]
    assert rows % 16 and len(grown) > rows and got % 8 == 0 and got - 8 < len(grown) <= got, (rows, len(grown), got)


def test_a_tokenizer_dir_without_vocabulary_and_an_output_bias_in_expansion(tmp_path):
    """A tokenizer directory with only tokenizer_config.json was refused with transformers' text about
    sentencepiece/tiktoken; a model with an output bias (Phi) got bias 0 for its new tokens, not their pieces'."""
    from transformers import PhiConfig, PhiForCausalLM

    from kcpt.config import TokenizerConfig
    from kcpt.errors import ConfigError
    from kcpt.model.audit import expand_tokenizer_and_model
    from kcpt.model.tokenizer import load_tokenizer

    tok = _byte_bpe(300)
    tok.save_pretrained(tmp_path / "tok")
    for f in (tmp_path / "tok").iterdir():
        if f.name != "tokenizer_config.json":
            f.unlink()
    with pytest.raises(ConfigError, match=r"holds no tokenizer vocabulary \(no tokenizer.json"):
        load_tokenizer(TokenizerConfig(path=str(tmp_path / "tok")))
    torch.manual_seed(0)
    phi = PhiForCausalLM(PhiConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2))
    with torch.no_grad():
        phi.lm_head.bias.normal_()
    grown, pieces = expand_tokenizer_and_model(tok, phi, ["대한민국"])
    for word, old_ids in pieces.items():
        assert torch.allclose(phi.lm_head.bias[grown.convert_tokens_to_ids(word)],
                              phi.lm_head.bias[torch.tensor(old_ids)].mean())
