"""Re-ranking: fast narrows, slow decides (DESIGN.md section 1, query time).

1. ``g(y)`` -> top-K candidates by ``s_fast`` (a FAISS ``ShardedIndex`` or the exact
   in-memory ``ExactIndex`` below; both expose ``search(queries (n, d), K) -> (keys, scores)``);
2. ``h(x, y)`` for those K only, from cached phi(x) tokens (a token getter: keys ->
   ``(K, T, D)`` fp16), all K pairs in one batched forward pass;
3. ``s = h + beta * s_fast``; the best ``k <= K`` are returned.

``thinkfast eval`` and the Serve re-ranker both call ``rerank`` / ``rerank_many`` so they
rank identically. Ties are broken by candidate order (i.e. by fast score), so results are
deterministic. Candidates that are empty keys (an index returning fewer than K hits) are
dropped; a key returned twice (overlapping shards) is kept once, at its first position.

torch is imported only by the functions that run the slow model, so the service's ingress
can build fast-only results (``fast_hits``) without loading it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence, TypeVar

import numpy as np

from thinkfast.encode import text_vectors
from thinkfast.errors import ThinkfastError

if TYPE_CHECKING:
    import torch

    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel

logger = logging.getLogger(__name__)

# default bound on one pass's (pairs x tokens x vocab) logits: 2^25 floats = 128 MiB, which
# is every pair at once for a word vocabulary and ~30 pairs a pass for BERT's 30k pieces
LOGIT_BUDGET = 1 << 25

# keys -> cached slow tokens phi(x) of those keys, (K, T, D), any float dtype (fp16 in the store)
TokenGetter = Callable[[Sequence[str]], np.ndarray]

# a candidate key as indexes return it: str, or None / "" for a slot with no hit
CandidateKey = str | None

# scores combine elementwise in any of these (both arguments of one kind)
Score = TypeVar("Score", float, np.ndarray, "torch.Tensor")


class Retriever(Protocol):
    """What stage 1 needs: ``ShardedIndex`` and ``ExactIndex`` both qualify."""

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class SearchHit:
    """One result, as the HTTP API returns it (``caption`` is added by the service)."""

    key: str  # corpus key of the image / video
    score: float  # final score: h + beta * s_fast after re-ranking, s_fast when fast only
    fast_score: float  # s_fast(x, y) = f(x)^T g(y)
    slow_score: float | None  # h(x, y) = h_fwd + h_bwd; None when not re-ranked

    def to_dict(self) -> dict[str, str | float | None]:
        return asdict(self)


@dataclass(frozen=True)
class HitExplanation:
    """Why a result sits where it does: its place in the fast ranking next to its final
    place, so a user sees what re-ranking changed (``"explain": true`` of the service)."""

    rank: int  # final position, 1-based
    fast_rank: int  # position among the fast candidates (by s_fast), 1-based
    fast_score: float  # s_fast
    slow_score: float | None  # h; None when not re-ranked

    def to_dict(self) -> dict[str, int | float | None]:
        return asdict(self)


def explain_hits(
    hits: Sequence[SearchHit], candidate_keys: Sequence[CandidateKey], fast_scores: Sequence[float]
) -> list[HitExplanation]:
    """Each hit's final and fast rank. ``candidate_keys`` / ``fast_scores`` are the stage-1
    list the hits were chosen from, cleaned as ``rerank`` / ``fast_hits`` clean it (empty
    keys and repeats dropped), so fast ranks count the candidates the slow model saw."""
    keys, _ = _clean_candidates(candidate_keys, fast_scores)
    fast_rank = {key: i + 1 for i, key in enumerate(keys)}
    missing = [h.key for h in hits if h.key not in fast_rank]
    if missing:
        raise ThinkfastError(f"{len(missing)} hit(s) are not among the fast candidates, e.g. {missing[0]!r}")
    return [HitExplanation(i + 1, fast_rank[h.key], h.fast_score, h.slow_score) for i, h in enumerate(hits)]


def combined_score(h: Score, s_fast: Score, beta: float) -> Score:
    """``h + beta * s_fast`` (tensors, arrays or floats)."""
    return h + beta * s_fast


class ExactIndex:
    """Exact inner-product top-K over in-memory embeddings ``(N, d)``: the reference stage 1
    (and what small corpora and tests use instead of FAISS)."""

    def __init__(self, keys: Sequence[str], embeddings: np.ndarray) -> None:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(keys):
            raise ThinkfastError(f"ExactIndex needs (N, d) embeddings for N={len(keys)} keys, got {embeddings.shape}")
        self.keys = np.asarray(list(keys), dtype=object)
        self.embeddings = embeddings

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(keys (n, k'), scores (n, k'))``, best first, ``k' = min(k, N)``; ties by corpus order."""
        queries = np.atleast_2d(np.asarray(query_vectors, dtype=np.float32))
        if queries.shape[1] != self.embeddings.shape[1]:
            raise ThinkfastError(f"query dimension {queries.shape[1]} != index dimension {self.embeddings.shape[1]}")
        if k < 1:
            raise ThinkfastError(f"k must be >= 1, got {k}")
        scores = queries @ self.embeddings.T  # (n, N)
        k = min(k, scores.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (n, k)
        return self.keys[order], np.take_along_axis(scores, order, axis=1)


def fast_hits(candidate_keys: Sequence[CandidateKey], fast_scores: Sequence[float], k: int) -> list[SearchHit]:
    """Results of stage 1 alone (``rerank=0``)."""
    keys, scores = _clean_candidates(candidate_keys, fast_scores)
    return [SearchHit(key=key, score=float(s), fast_score=float(s), slow_score=None) for key, s in zip(keys[:k], scores[:k])]


def _clean_candidates(candidate_keys: Sequence[CandidateKey], fast_scores: Sequence[float]) -> tuple[list[str], np.ndarray]:
    """Drop empty keys and repeats (first occurrence wins); keep fast order."""
    if len(candidate_keys) != len(fast_scores):
        raise ThinkfastError(f"{len(candidate_keys)} candidate keys but {len(fast_scores)} fast scores")
    seen: set[str] = set()
    keys: list[str] = []
    scores: list[float] = []
    for key, score in zip(candidate_keys, np.asarray(fast_scores, dtype=np.float64).reshape(-1)):
        if key is None or key == "" or not np.isfinite(score):
            continue
        key = str(key)
        if key in seen:
            continue
        seen.add(key)
        keys.append(key)
        scores.append(float(score))
    return keys, np.asarray(scores, dtype=np.float64)


def _query_row(query: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One tokenized query -> its valid ids ``(n,)`` (padding dropped)."""
    import torch

    ids = torch.as_tensor(query["input_ids"])
    mask = torch.as_tensor(query["attention_mask"])
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise ThinkfastError(f"expected one tokenized query, got a batch of {ids.shape[0]}")
        ids, mask = ids[0], mask[0]
    if ids.shape != mask.shape or ids.ndim != 1:
        raise ThinkfastError("query input_ids and attention_mask must have the same (L,) or (1, L) shape")
    valid = mask.bool()
    if not bool(valid.any()):
        raise ThinkfastError("the query has no tokens")
    return ids[valid], torch.ones(int(valid.sum()), dtype=torch.long)


def slow_scores_for_pairs(
    slow_model: SlowModel,
    visual_tokens: np.ndarray | torch.Tensor,
    query_index: Sequence[int],
    queries: Sequence[dict[str, torch.Tensor]],
    max_pairs: int | None = None,
) -> np.ndarray:
    """``h`` for pairs (visual_tokens[p], queries[query_index[p]]) -> ``(P,)`` float64.

    All pairs go through the decoders in one forward pass, unless their logits would exceed
    ``LOGIT_BUDGET`` floats (or ``max_pairs`` is given): then in passes of that many pairs.
    Queries of different lengths are right-padded, which changes nothing."""
    import torch

    with torch.inference_mode():
        return _slow_scores_for_pairs(slow_model, visual_tokens, query_index, queries, max_pairs)


def _slow_scores_for_pairs(
    slow_model: SlowModel,
    visual_tokens: np.ndarray | torch.Tensor,
    query_index: Sequence[int],
    queries: Sequence[dict[str, torch.Tensor]],
    max_pairs: int | None,
) -> np.ndarray:
    import torch

    if getattr(slow_model, "training", False):
        logger.warning("re-ranking with a SlowModel in training mode: dropout makes scores random; call .eval()")
    rows = [_query_row(q) for q in queries]
    length = max(ids.shape[0] for ids, _ in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)  # (Q, L) right-padded
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (row_ids, row_mask) in enumerate(rows):
        ids[i, : row_ids.shape[0]] = row_ids
        mask[i, : row_mask.shape[0]] = row_mask
    tokens = torch.as_tensor(visual_tokens)  # (P, T, D)
    index = torch.as_tensor(list(query_index), dtype=torch.long)  # (P,)
    if tokens.ndim != 3 or tokens.shape[0] != index.shape[0]:
        raise ThinkfastError(f"need (P, T, D) visual tokens for P={index.shape[0]} pairs, got {tuple(tokens.shape)}")
    step = max_pairs or max(1, LOGIT_BUDGET // (length * int(slow_model.config.vocab_size)))
    out = [
        slow_model.score(tokens[s : s + step], ids[index[s : s + step]], mask[index[s : s + step]]).double().cpu()
        for s in range(0, tokens.shape[0], step)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0)


def rerank_many(
    slow_model: SlowModel,
    token_getter: TokenGetter,
    queries: Sequence[dict[str, torch.Tensor]],
    candidate_keys: Sequence[Sequence[CandidateKey]],
    fast_scores: Sequence[Sequence[float]],
    k: int,
    beta: float = 0.0,
    max_pairs: int | None = None,
) -> list[list[SearchHit]]:
    """Re-rank several queries' candidates with one token fetch and one batched slow pass
    (what a ``@serve.batch`` re-ranker and ``thinkfast eval`` call).

    ``queries[i]``: query i tokenized by the *slow* model's tokenizer (``(1, L)`` or ``(L,)``);
    ``candidate_keys[i]`` / ``fast_scores[i]``: its stage-1 top-K. Returns, per query, the
    best ``k`` as ``SearchHit`` sorted by ``h + beta * s_fast``."""
    if k < 1:
        raise ThinkfastError(f"k must be >= 1, got {k}")
    if not (len(queries) == len(candidate_keys) == len(fast_scores)):
        raise ThinkfastError("queries, candidate_keys and fast_scores must have one entry per query")
    cleaned = [_clean_candidates(keys, scores) for keys, scores in zip(candidate_keys, fast_scores)]
    all_keys = [key for keys, _ in cleaned for key in keys]
    if not all_keys:
        return [[] for _ in queries]
    query_index = [i for i, (keys, _) in enumerate(cleaned) for _ in keys]
    tokens = np.asarray(token_getter(all_keys))  # (P, T, D)
    if tokens.shape[0] != len(all_keys):
        raise ThinkfastError(f"token getter returned {tokens.shape[0]} token sets for {len(all_keys)} keys")
    h = slow_scores_for_pairs(slow_model, tokens, query_index, queries, max_pairs=max_pairs)
    results: list[list[SearchHit]] = []
    start = 0
    for keys, fast in cleaned:
        slow = h[start : start + len(keys)]
        start += len(keys)
        final = combined_score(slow, fast, beta)
        order = np.argsort(-final, kind="stable")[:k]
        results.append([SearchHit(key=keys[j], score=float(final[j]), fast_score=float(fast[j]), slow_score=float(slow[j]))
                        for j in order])
    return results


def rerank(
    slow_model: SlowModel,
    token_getter: TokenGetter,
    query: dict[str, torch.Tensor],
    candidate_keys: Sequence[CandidateKey],
    fast_scores: Sequence[float],
    k: int,
    beta: float = 0.0,
    max_pairs: int | None = None,
) -> list[SearchHit]:
    """Re-rank one query's K candidates (see ``rerank_many``)."""
    return rerank_many(slow_model, token_getter, [query], [candidate_keys], [fast_scores], k, beta, max_pairs)[0]


def two_stage_search(
    texts: Sequence[str],
    fast_model: FastModel,
    slow_model: SlowModel,
    retriever: Retriever,
    token_getter: TokenGetter,
    k: int = 10,
    rerank_k: int = 100,
    beta: float = 0.0,
    max_pairs: int | None = None,
) -> list[list[SearchHit]]:
    """Full search for several texts: fast top-``rerank_k`` then slow re-ranking to ``k``.
    ``rerank_k == 0`` returns the fast top-``k`` only. Each model tokenizes with its own
    tokenizer (the two vocabularies may differ)."""
    if not texts:
        return []
    if rerank_k and rerank_k < k:
        raise ThinkfastError(f"rerank K={rerank_k} must be >= k={k} (or 0 for fast only)")
    query_vectors = text_vectors(fast_model, list(texts))  # (n, d)
    cand_keys, cand_scores = retriever.search(query_vectors, rerank_k or k)
    if not rerank_k:
        return [fast_hits(list(keys), list(scores), k) for keys, scores in zip(cand_keys, cand_scores)]
    slow_queries = [slow_model.tokenize([t]) for t in texts]
    return rerank_many(slow_model, token_getter, slow_queries, [list(x) for x in cand_keys],
                       [list(x) for x in cand_scores], k, beta, max_pairs)
