"""Stage 1 across shards: each retriever replica answers a query with its own shard's
top-k, and the global top-k is merged from those replies.

``ShardedIndex`` merges its shards in-process on FAISS ids (``faiss.ResultHeap``); the
service's shards live in different processes and reply with *keys*, so the merge here
works on keys and scores: shards are disjoint, so the global top-k is the top-k of the
union, and ties keep shard order (a stable sort), which is what a single exact index over
the same vectors gives. Empty keys and non-finite scores (a shard's padding when it holds
fewer than k live vectors) are dropped. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# one shard's reply for one query: keys (k,) (None / "" where nothing was found), scores (k,)
ShardHits = tuple[Sequence["str | None"], np.ndarray]
# one shard's reply for n queries: keys (n, k), scores (n, k)
ShardBatch = tuple[Sequence[Sequence["str | None"]], np.ndarray]


@dataclass(frozen=True)
class Candidates:
    """A query's fast candidates, best first."""

    keys: list[str]  # (K,)
    fast_scores: np.ndarray  # (K,) float32, s_fast


def merge_shard_results(results: Sequence[ShardBatch], k: int) -> list[Candidates]:
    """Per-shard top-k lists of each query -> global top-k per query (drops shard padding)."""
    if not results:
        return []
    n = len(results[0][0])
    merged = []
    for q in range(n):
        keys: list[str] = []
        scores: list[np.ndarray] = []
        for shard_keys, shard_scores in results:
            row_keys = shard_keys[q]
            row_scores = np.asarray(shard_scores[q], dtype=np.float32)
            valid = [i for i, key in enumerate(row_keys) if key and np.isfinite(row_scores[i])]
            keys.extend(row_keys[i] for i in valid)  # type: ignore[misc]  # valid keys are non-empty str
            scores.append(row_scores[valid])
        flat = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        order = np.argsort(-flat, kind="stable")[:k]
        merged.append(Candidates([keys[i] for i in order], flat[order]))
    return merged


def merge_query(replies: Sequence[ShardHits], k: int) -> Candidates:
    """One query's global top-k from every shard's reply to it (the ingress' case)."""
    batch: list[ShardBatch] = [([keys], np.asarray(scores)[None, :]) for keys, scores in replies]
    if not batch:
        return Candidates([], np.zeros(0, np.float32))
    return merge_shard_results(batch, k)[0]


__all__ = ["Candidates", "ShardBatch", "ShardHits", "merge_query", "merge_shard_results"]
