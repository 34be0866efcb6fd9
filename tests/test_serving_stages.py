"""The service's stages without Ray (``thinkfast.serving``): each one equals the library's
own two-stage search, reports unservable items as typed errors without failing the rest
of its batch, and its errors survive pickling (how they travel between replicas)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from thinkfast.data.tokenizer import WordTokenizer
from thinkfast.errors import DecodeError, IndexMismatchError, ThinkfastError
from thinkfast.models.fast import FastModel
from thinkfast.models.slow import SlowModel
from thinkfast.rerank import ExactIndex, fast_hits, rerank
from thinkfast.serving.errors import (
    MediaUnavailable,
    ServingError,
    UnknownMediaKey,
    UnscorableQuery,
    raise_if_error,
)
from thinkfast.serving.merge import Candidates, merge_query
from thinkfast.serving.stages import CandidateReranker, QueryEncoder, RerankItem, ShardSearcher

CAPTIONS = ["a red circle left of a blue square", "two yellow squares", "a green triangle above a red circle",
            "a big blue circle", "a small red square below a yellow triangle", "three circles"]
N = 10
EMPTY = "<no tokens>"  # the models' tokenize is patched to leave this query empty


class _Store:
    """An in-memory token store: ``get`` and ``shape`` are all the re-ranker uses."""

    def __init__(self, keys: list[str], tokens: np.ndarray) -> None:
        self._rows = dict(zip(keys, tokens))
        self.shape = tokens.shape

    def get(self, keys):
        return np.stack([self._rows[k] for k in keys])


def _empty_for(model, query: str):
    """``model.tokenize`` that masks every token of ``query`` (as an HF tokenizer does for
    text it reduces to nothing)."""
    original = model.tokenize

    def tokenize(texts):
        out = original(texts)
        for i, text in enumerate(texts):
            if text == query:
                out["attention_mask"][i] = 0
        return out

    return tokenize


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = WordTokenizer.build(CAPTIONS)
    fast = FastModel.from_preset("tiny", tokenizer=tok).eval()
    slow = SlowModel.from_preset("tiny", tokenizer=tok).eval()
    fast.tokenize = _empty_for(fast, EMPTY)
    slow.tokenize = _empty_for(slow, EMPTY)
    pixels = torch.randn(N, 3, 32, 32)
    keys = [f"img{i:02d}" for i in range(N)]
    with torch.no_grad():
        embeddings = fast.encode_image(pixels).numpy()
        tokens = slow.encode_visual(pixels).half().numpy()
    return fast, slow, keys, embeddings, _Store(keys, tokens)


def test_query_encoder_is_text_vectors_and_flags_empty_queries(setup) -> None:
    from thinkfast.encode import text_vectors

    fast, *_ = setup
    encoder = QueryEncoder(fast)
    out = encoder.encode([CAPTIONS[0], EMPTY, CAPTIONS[3]])
    assert isinstance(out[1], UnscorableQuery) and out[1].model == "fast"
    assert str(out[1]) == "the query has no tokens the fast model can encode"
    expected = text_vectors(fast, [CAPTIONS[0], CAPTIONS[3]])
    np.testing.assert_allclose(np.stack([out[0], out[2]]), expected, atol=1e-6)
    assert encoder.encode([]) == []


def test_shards_merged_equal_one_exact_index(setup, tmp_path) -> None:
    from thinkfast.index.sharded import ShardedIndex

    fast, _, keys, embeddings, _ = setup
    ShardedIndex.build(keys, embeddings, str(tmp_path / "index"), shards=2, factory="Flat")
    shards = [ShardSearcher.load(str(tmp_path / "index"), i) for i in range(2)]
    queries = QueryEncoder(fast).encode(CAPTIONS[:3])
    exact = ExactIndex(keys, embeddings)
    for vector in queries:
        for k in (3, N, N + 5):  # k above one shard's size: its padding is dropped by the merge
            replies = [shard.search([(vector, k)])[0] for shard in shards]
            cands = merge_query(replies, k)
            want_keys, want_scores = exact.search(vector[None], k)
            assert cands.keys == list(want_keys[0])
            np.testing.assert_allclose(cands.fast_scores, want_scores[0], atol=1e-5)
    assert merge_query([], 5).keys == [] and shards[0].search([]) == []


def test_reranker_equals_rerank_and_one_bad_query_fails_alone(setup) -> None:
    fast, slow, keys, embeddings, store = setup
    exact = ExactIndex(keys, embeddings)
    reranker = CandidateReranker(slow, store, beta=0.5, max_pairs=7)
    items, expected = [], []
    for text, k in [(CAPTIONS[0], 3), (EMPTY, 2), (CAPTIONS[2], 6)]:
        (vector,) = QueryEncoder(fast).encode([text]) if text != EMPTY else [np.ones(embeddings.shape[1], np.float32)]
        cand_keys, cand_scores = exact.search(np.asarray(vector)[None], 8)
        items.append(RerankItem(text, Candidates(list(cand_keys[0]), cand_scores[0]), k))
        if text != EMPTY:
            expected.append(rerank(slow, store.get, slow.tokenize([text]), list(cand_keys[0]), cand_scores[0], k, beta=0.5))
    out = reranker.rerank(items)
    assert isinstance(out[1], UnscorableQuery) and str(out[1]) == "the query has no tokens the slow model can score"
    for got, want in zip([out[0], out[2]], expected):
        assert [h.key for h in got] == [h.key for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-4)
        assert all(h.slow_score is not None and h.slow_score <= 0 for h in got)
    assert len(out[0]) == 3 and len(out[2]) == 6
    assert reranker.rerank([items[1]])[0].model == "slow"  # a batch of only bad items
    # the fast-only branch of the service is the library's fast_hits
    fast_only = fast_hits(items[0].candidates.keys, items[0].candidates.fast_scores, 2)
    assert [h.slow_score for h in fast_only] == [None, None] and fast_only[0].score == fast_only[0].fast_score


def test_stages_refuse_artifacts_of_other_models(setup, tmp_path) -> None:
    from thinkfast.index.sharded import ShardedIndex
    from thinkfast.store import TokenStoreWriter, finalize_token_store

    _, slow, keys, embeddings, store = setup
    tok = WordTokenizer.build(CAPTIONS)
    FastModel.from_preset("tiny", tokenizer=tok).save_pretrained(str(tmp_path / "fast"))
    ShardedIndex.build(keys, embeddings, str(tmp_path / "index"), factory="Flat", model_identity="someone-else")
    with pytest.raises(IndexMismatchError, match="another space"):
        QueryEncoder.load(str(tmp_path / "fast"), str(tmp_path / "index"))
    SlowModel.from_preset("tiny", tokenizer=tok).save_pretrained(str(tmp_path / "slow"))
    tokens_uri = str(tmp_path / "emb" / "tokens")
    writer = TokenStoreWriter(tokens_uri)
    writer.write(keys, np.zeros((len(keys), store.shape[1] + 1, store.shape[2]), np.float16))  # not whole frames
    finalize_token_store(tokens_uri)
    with pytest.raises(IndexMismatchError, match="another slow model"):
        CandidateReranker.load(str(tmp_path / "slow"), str(tmp_path / "emb"))


def test_serving_errors_pickle_as_themselves_and_map_to_http() -> None:
    from thinkfast_pipelines.serve.http_api import request_error_of

    cases = [(UnscorableQuery("fast"), 422), (UnscorableQuery("slow"), 422), (UnknownMediaKey(), 404),
             (MediaUnavailable("empty", "0 bytes"), 404)]
    for error, status in cases:
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error) and vars(back) == vars(error)
        assert isinstance(back, ServingError) and isinstance(back, ThinkfastError)
        http = request_error_of(back)
        assert (http.status, http.detail) == (status, str(error))
    unavailable = MediaUnavailable("corrupt")
    assert isinstance(unavailable, DecodeError) and unavailable.reason == "corrupt"
    assert str(unavailable) == "media of this key is unavailable (corrupt)"
    assert str(UnknownMediaKey()) == "unknown media key" and isinstance(UnknownMediaKey(), KeyError)
    assert raise_if_error([1, 2]) == [1, 2]
    with pytest.raises(UnscorableQuery):
        raise_if_error(UnscorableQuery("slow"))


def test_ingress_and_its_wire_types_do_not_import_torch() -> None:
    """The ingress holds no model: importing it (and the fast-only path) must not load torch."""
    code = ("import sys, thinkfast_pipelines.serve.ingress, thinkfast.rerank, thinkfast.serving.stages; "
            "from thinkfast.rerank import fast_hits; fast_hits(['a'], [0.5], 1); "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
