"""Ranks of each query's answer under the three methods, and one report row per method.

The re-ranked ranks come from :func:`thinkfast.rerank.rerank_many`, the service's own
code path, so what is measured here is what the service does. Ties count pessimistically,
as in :mod:`thinkfast.metrics`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from thinkfast.encode import batches
from thinkfast.evaluation.config import RECALL_AT

if TYPE_CHECKING:
    from thinkfast.evaluation.gallery import Queries
    from thinkfast.index.sharded import ShardedIndex
    from thinkfast.models.slow import SlowModel
    from thinkfast.rerank import TokenGetter

Candidates = tuple[np.ndarray, np.ndarray]  # (gallery indices (Q, K) int64, -1 = empty; fast scores (Q, K))


def slow_exhaustive_scores(slow: "SlowModel", tokens: np.ndarray, texts: Sequence[str],
                           chunk_size: int = 1024) -> np.ndarray:
    """``h(x_j, y_i)`` for every query i and gallery item j, (Q, N) float32 (Q·N slow evaluations)."""
    import torch

    visual = torch.from_numpy(tokens)  # (N, T, D) fp16, cast inside the model
    rows = []
    with torch.inference_mode():
        for s in batches(len(texts), max(1, chunk_size // max(1, len(tokens)))):
            tok = slow.tokenize(list(texts[s]))
            rows.append(slow.score_matrix(visual, tok["input_ids"], tok["attention_mask"], chunk_size=chunk_size)
                        .float().cpu().numpy())
    return np.concatenate(rows)  # (Q, N)


def summarize(name: str, ranks: np.ndarray, slow_evals: float, seconds: float, **extra: Any) -> dict[str, Any]:
    """One row of the report table: R@1/5/10, median rank and the cost per query."""
    from thinkfast import metrics

    row: dict[str, Any] = {"method": name}
    row.update({k: round(v, 2) for k, v in metrics.recall_at_k(ranks, RECALL_AT).items()})
    row["median_rank"] = float(metrics.median_rank(ranks))
    row["slow_evals_per_query"] = round(float(slow_evals), 2)
    row["ms_per_query"] = round(1000.0 * seconds / max(1, len(ranks)), 3)
    row["queries"] = int(len(ranks))
    row.update(extra)
    return row


def exact_candidates(fast_scores: np.ndarray, k: int) -> Candidates:
    """Exact fast top-``k`` per query: (indices (Q, k), scores (Q, k)), best first, ties by
    gallery order (as ``thinkfast.rerank.ExactIndex``)."""
    order = np.argsort(-fast_scores, axis=1, kind="stable")[:, :k]  # (Q, k)
    return order, np.take_along_axis(fast_scores, order, axis=1)


def rerank_ranks(
    slow: "SlowModel",
    queries: "Queries",
    gallery_keys: list[str],
    fast_scores: np.ndarray,
    token_getter: "TokenGetter",
    candidates: Candidates,
    beta: float,
    query_batch: int = 16,
    max_pairs: int | None = 1024,
) -> tuple[np.ndarray, float]:
    """Ranks after ``thinkfast.rerank.rerank_many`` re-scores each query's candidates;
    returns (ranks (Q,), mean slow evaluations per query).

    ``candidates``: (gallery indices (Q, K), fast scores (Q, K)), -1 for an empty slot.
    An answer among the candidates gets its re-ranked position; one outside keeps its fast
    order after them: ``#candidates + 1 + #(other images scoring >= it)``, which equals its
    fast rank when the candidates are the exact fast top-K (ties counted pessimistically,
    as in ``thinkfast.metrics``)."""
    from thinkfast import rerank

    cand_idx, cand_scores = candidates
    q = len(queries.texts)
    ranks = np.empty(q, dtype=np.float64)
    evals = 0
    for s in batches(q, query_batch):
        keys = [[gallery_keys[j] for j in cand_idx[i] if j >= 0] for i in range(s.start, s.stop)]
        scores = [cand_scores[i][cand_idx[i] >= 0] for i in range(s.start, s.stop)]
        tokenized = [slow.tokenize([t]) for t in queries.texts[s]]
        k_max = max(1, max(len(x) for x in keys))
        hits = rerank.rerank_many(slow, token_getter, tokenized, keys, scores, k_max, beta=beta, max_pairs=max_pairs)
        for offset, (i, ranked) in enumerate(zip(range(s.start, s.stop), hits)):
            evals += len(keys[offset])
            target = int(queries.target[i])
            ranked_keys = [h.key for h in ranked]
            answer = gallery_keys[target]
            if answer in ranked_keys:
                ranks[i] = ranked_keys.index(answer) + 1
                continue
            outside = np.ones(len(gallery_keys), dtype=bool)
            outside[cand_idx[i][cand_idx[i] >= 0]] = False
            outside[target] = False
            ranks[i] = len(ranked_keys) + 1 + int((fast_scores[i][outside] >= fast_scores[i, target]).sum())
    return ranks, evals / max(1, q)


def index_candidates(
    index: "ShardedIndex", text_embeddings: np.ndarray, k: int, gallery_keys: list[str]
) -> tuple[Candidates, int]:
    """Stage 1 through a FAISS ``ShardedIndex`` (ANN effects included, like the service).

    The index may hold more than the evaluated gallery (it is built over every split, the
    gallery is one split). Each query's candidates are its best ``k`` *gallery* keys in the
    index's order: the search over-fetches (and widens until every query has ``k``, or the
    whole index was searched), skipping other splits' keys instead of spending candidate
    slots on them. Returns ((gallery indices (Q, k), scores (Q, k)), foreign) where
    ``foreign`` counts the skipped keys; a slot stays -1 only when the index holds fewer
    than ``k`` of the gallery's keys."""
    position = {key: i for i, key in enumerate(gallery_keys)}
    queries = np.ascontiguousarray(text_embeddings, dtype=np.float32)
    total = max(len(index), 1)
    fetch = min(total, max(k, int(np.ceil(1.5 * k * total / max(1, len(gallery_keys))))))
    while True:
        keys, scores = index.search(queries, fetch)  # (Q, fetch) each
        idx = np.full((len(queries), k), -1, dtype=np.int64)
        out = np.full((len(queries), k), -np.inf, dtype=np.float32)
        foreign = 0
        for q, (row_keys, row_scores) in enumerate(zip(keys, scores)):
            n = 0
            for key, score in zip(row_keys, row_scores):
                if n == k or key in (None, ""):
                    break
                i = position.get(str(key))
                if i is None:
                    foreign += 1
                    continue
                idx[q, n], out[q, n] = i, score
                n += 1
        if fetch >= total or bool((idx >= 0).all()):
            return (idx, out), foreign
        fetch = min(total, fetch * 4)


def reranked_top(
    slow: "SlowModel",
    texts: Sequence[str],
    gallery_keys: list[str],
    token_getter: "TokenGetter",
    candidates: Candidates,
    beta: float,
    k: int,
    query_batch: int = 16,
    max_pairs: int | None = 1024,
) -> np.ndarray:
    """The first ``k`` gallery indices ``(Q, k)`` after re-ranking each query's candidates
    (``thinkfast.rerank.rerank_many``, as the service does); -1 pads a short list."""
    from thinkfast import rerank

    position = {key: i for i, key in enumerate(gallery_keys)}
    cand_idx, cand_scores = candidates
    top = np.full((len(texts), k), -1, dtype=np.int64)
    for s in batches(len(texts), query_batch):
        keys = [[gallery_keys[j] for j in cand_idx[i] if j >= 0] for i in range(s.start, s.stop)]
        scores = [cand_scores[i][cand_idx[i] >= 0] for i in range(s.start, s.stop)]
        tokenized = [slow.tokenize([t]) for t in texts[s]]
        hits = rerank.rerank_many(slow, token_getter, tokenized, keys, scores, k, beta=beta, max_pairs=max_pairs)
        for i, ranked in zip(range(s.start, s.stop), hits):
            row = [position[h.key] for h in ranked[:k]]
            top[i, :len(row)] = row
    return top
