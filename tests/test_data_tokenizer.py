"""Tokenisers: word vocabulary from captions, the offline MiniLM tokenizer, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from thinkfast.data.tokenizer import (BOS, EOS, PAD, UNK, HFTokenizer, WordTokenizer, load_tokenizer, minilm_path,
                                      split_words)
from thinkfast.errors import CheckpointError, ThinkfastError

CAPTIONS = ["A small red circle to the left of a large blue square.",
            "a large blue square, right of a small red circle",
            "a green triangle"]


def test_split_words_lowercases_and_splits_punctuation():
    assert split_words("Left-of the RED circle.") == ["left", "-", "of", "the", "red", "circle", "."]


def test_word_vocabulary_is_deterministic_and_frequency_ordered():
    tok = WordTokenizer.build(CAPTIONS)
    assert [tok.vocab[t] for t in (PAD, UNK, BOS, EOS)] == [0, 1, 2, 3]
    assert tok.vocab["a"] == 4  # most frequent word first
    assert WordTokenizer.build(list(reversed(CAPTIONS))).vocab == tok.vocab
    assert "green" not in WordTokenizer.build(CAPTIONS, min_count=2).vocab


def test_word_tokenizer_call_pads_right_and_maps_unknowns():
    tok = WordTokenizer.build(CAPTIONS, max_length=6)
    out = tok(["a red circle", "zebra", "a small red circle to the left of", ""])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == (4, 6)  # truncated to 6
    assert mask.tolist()[0] == [1, 1, 1, 0, 0, 0] and ids[0, 3:].tolist() == [tok.pad_token_id] * 3
    assert ids[1, 0].item() == tok.unk_token_id
    assert mask[3].tolist() == [1, 0, 0, 0, 0, 0] and ids[3, 0].item() == tok.unk_token_id  # never all-masked
    assert tok.decode(ids[0].tolist()) == "a red circle"
    assert tok(["a b c d e f g h"], max_length=2)["input_ids"].shape == (1, 2)


def test_special_tokens_are_opt_in():
    tok = WordTokenizer.build(CAPTIONS, add_special_tokens=True)
    ids = tok(["a red circle"])["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 5


def test_word_tokenizer_save_load_round_trip(tmp_path):
    tok = WordTokenizer.build(CAPTIONS, max_length=9)
    tok.save(str(tmp_path))
    back = load_tokenizer(str(tmp_path))
    assert isinstance(back, WordTokenizer) and back.vocab == tok.vocab and back.max_length == 9
    texts = ["a blue triangle left of a red square"]
    assert torch.equal(back(texts)["input_ids"], tok(texts)["input_ids"])


def test_bad_vocabularies_and_dirs(tmp_path):
    with pytest.raises(ThinkfastError):
        WordTokenizer.build([])
    with pytest.raises(ThinkfastError):
        WordTokenizer({"a": 0, UNK: 1, BOS: 2, EOS: 3})
    with pytest.raises(CheckpointError):
        load_tokenizer(str(tmp_path))
    (tmp_path / "thinkfast_tokenizer.json").write_text(json.dumps({"kind": "sentencepiece"}))
    with pytest.raises(CheckpointError, match="sentencepiece"):
        load_tokenizer(str(tmp_path))


def test_minilm_tokenizer_offline_and_round_trip(tmp_path):
    tok = HFTokenizer(minilm_path(), max_length=16)
    out = tok(["a red circle left of a blue square", "hi"])
    assert out["input_ids"].shape[0] == 2 and out["input_ids"][1, -1].item() == tok.pad_token_id
    assert out["attention_mask"][0].all() and tok.vocab_size == 30522
    assert out["input_ids"][0, 0].item() == tok.tokenizer.cls_token_id  # BERT keeps [CLS] for pooling
    tok.save(str(tmp_path))
    back = load_tokenizer(str(tmp_path))
    assert isinstance(back, HFTokenizer) and back.max_length == 16
    assert torch.equal(back(["a red circle"])["input_ids"], tok(["a red circle"])["input_ids"])


def test_hf_tokenizer_missing_dir_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError):
        HFTokenizer(str(tmp_path / "missing"))
