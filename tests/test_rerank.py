"""Re-ranking: combined score, exact stage 1, batched slow scoring equal to per-pair scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thinkfast.data.tokenizer import WordTokenizer
from thinkfast.errors import ThinkfastError
from thinkfast.models.fast import FastModel
from thinkfast.models.slow import SlowModel
from thinkfast.rerank import ExactIndex, combined_score, fast_hits, rerank, rerank_many, two_stage_search

CAPTIONS = ["a red circle left of a blue square", "two yellow squares", "a green triangle above a red circle",
            "a big blue circle", "a small red square below a yellow triangle", "three circles"]
N = 8


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = WordTokenizer.build(CAPTIONS)
    fast = FastModel.from_preset("tiny", tokenizer=tok).eval()
    slow = SlowModel.from_preset("tiny", tokenizer=tok).eval()
    pixels = torch.randn(N, 3, 32, 32)
    keys = [f"img{i:02d}" for i in range(N)]
    with torch.no_grad():
        embeddings = fast.encode_image(pixels).numpy()
        tokens = slow.encode_visual(pixels).half().numpy()  # cached as the store does: fp16
    table = dict(zip(keys, tokens))

    def getter(wanted):
        return np.stack([table[k] for k in wanted])

    return fast, slow, keys, embeddings, tokens, getter


def _slow(slow: SlowModel, tokens: np.ndarray, text: str) -> float:
    q = slow.tokenize([text])
    with torch.no_grad():
        return float(slow.score(torch.from_numpy(tokens[None]), **q)[0])


def test_combined_score() -> None:
    assert combined_score(-10.0, 0.5, 2.0) == pytest.approx(-9.0)
    np.testing.assert_allclose(combined_score(np.array([-3.0, -1.0]), np.array([0.1, 0.2]), 10.0), [-2.0, 1.0])


def test_exact_index_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((20, 6)).astype(np.float32)
    index = ExactIndex([f"k{i}" for i in range(20)], emb)
    queries = rng.standard_normal((3, 6)).astype(np.float32)
    keys, scores = index.search(queries, 5)
    assert keys.shape == scores.shape == (3, 5)
    for q in range(3):
        expected = np.argsort(-(emb @ queries[q]))[:5]
        assert list(keys[q]) == [f"k{i}" for i in expected]
        np.testing.assert_allclose(scores[q], (emb @ queries[q])[expected], rtol=1e-6)
    assert index.search(queries[:1], 50)[0].shape == (1, 20)
    tied = ExactIndex(["a", "b", "c"], np.ones((3, 2), np.float32))
    assert list(tied.search(np.ones((1, 2)), 3)[0][0]) == ["a", "b", "c"]  # ties keep corpus order
    with pytest.raises(ThinkfastError, match="dimension"):
        index.search(np.zeros((1, 5)), 3)


def test_rerank_orders_by_slow_plus_beta_fast(setup) -> None:
    fast, slow, keys, embeddings, tokens, getter = setup
    text = CAPTIONS[0]
    fast_scores = np.linspace(0.9, 0.2, N)
    for beta in (0.0, 50.0):
        hits = rerank(slow, getter, slow.tokenize([text]), keys, fast_scores, k=5, beta=beta)
        assert len(hits) == 5
        expected = sorted(((_slow(slow, tokens[i], text) + beta * fast_scores[i], i) for i in range(N)), key=lambda t: -t[0])[:5]
        assert [h.key for h in hits] == [keys[i] for _, i in expected]
        for hit, (score, i) in zip(hits, expected):
            assert hit.score == pytest.approx(score, abs=1e-3)
            assert hit.slow_score == pytest.approx(_slow(slow, tokens[i], text), abs=1e-3)
            assert hit.fast_score == pytest.approx(fast_scores[i])
            assert hit.score == pytest.approx(hit.slow_score + beta * hit.fast_score, abs=1e-6)


def test_rerank_many_equals_one_query_at_a_time(setup) -> None:
    fast, slow, keys, embeddings, tokens, getter = setup
    texts = [CAPTIONS[1], CAPTIONS[4], CAPTIONS[2]]  # different lengths: padded together
    cands = [keys[:5], keys[3:], [keys[6], "", keys[1], keys[6], keys[2]]]  # an empty key and a repeat
    scores = [np.linspace(0.5, 0.1, len(c)) for c in cands]
    many = rerank_many(slow, getter, [slow.tokenize([t]) for t in texts], cands, scores, k=3, beta=1.0)
    for text, c, s, got in zip(texts, cands, scores, many):
        single = rerank(slow, getter, slow.tokenize([text]), c, s, k=3, beta=1.0, max_pairs=1)
        assert [h.key for h in got] == [h.key for h in single]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in single], atol=1e-4)
    assert sorted(h.key for h in many[2]) == sorted([keys[6], keys[1], keys[2]])  # cleaned candidates


def test_two_stage_search_fast_only_and_exhaustive(setup) -> None:
    fast, slow, keys, embeddings, tokens, getter = setup
    index = ExactIndex(keys, embeddings)
    texts = [CAPTIONS[0], CAPTIONS[3]]
    fast_only = two_stage_search(texts, fast, slow, index, getter, k=4, rerank_k=0)
    with torch.no_grad():
        q = fast.encode_text(**fast.tokenize(texts)).numpy()
    for i, hits in enumerate(fast_only):
        order = np.argsort(-(embeddings @ q[i]), kind="stable")[:4]
        assert [h.key for h in hits] == [keys[j] for j in order]
        assert all(h.slow_score is None and h.score == h.fast_score for h in hits)
    # K = N re-ranks everything: the order is the exhaustive slow ranking
    full = two_stage_search(texts, fast, slow, index, getter, k=N, rerank_k=N, beta=0.0)
    for text, hits in zip(texts, full):
        exhaustive = sorted(range(N), key=lambda j: -_slow(slow, tokens[j], text))
        assert [h.key for h in hits] == [keys[j] for j in exhaustive]
    with pytest.raises(ThinkfastError, match="must be >="):
        two_stage_search(texts, fast, slow, index, getter, k=5, rerank_k=3)


def test_fast_hits_and_errors(setup) -> None:
    fast, slow, keys, embeddings, tokens, getter = setup
    hits = fast_hits(["a", None, "b", "a"], [0.9, 0.8, 0.7, 0.6], k=5)
    assert [(h.key, h.score) for h in hits] == [("a", 0.9), ("b", 0.7)]
    assert hits[0].to_dict() == {"key": "a", "score": 0.9, "fast_score": 0.9, "slow_score": None}
    with pytest.raises(ThinkfastError, match="fast scores"):
        rerank(slow, getter, slow.tokenize(["a"]), keys[:2], [0.1], k=1)
    with pytest.raises(ThinkfastError, match="token sets"):
        rerank(slow, lambda ks: np.zeros((1, 21, 32), np.float16), slow.tokenize(["a"]), keys[:2], [0.2, 0.1], k=1)
    assert rerank(slow, getter, slow.tokenize(["a"]), [], [], k=3) == []
