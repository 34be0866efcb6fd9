"""Text-to-visual retrieval metrics: every caption is a query, its image is the answer.

Images usually have several captions (Flickr30K: 5), so a score matrix is ``(Q captions,
N images)`` with ``targets[q]`` the column of caption q's image. Ranks are 1-based.

Ties are counted *pessimistically*: the answer ranks after every other image with an equal
score, so a model that scores everything the same gets chance-level recall, not 100 %.
A ranked list that does not contain the answer (a re-ranked top-K) gives rank ``inf``
unless the caller supplies where the answer would fall.
"""

from __future__ import annotations

import logging
from typing import Hashable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from thinkfast.errors import ThinkfastError

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)


def ranks_from_scores(scores: ArrayLike, targets: ArrayLike) -> np.ndarray:
    """``scores (Q, N)`` (higher is better) and ``targets (Q,)`` column indices -> ranks ``(Q,)``:
    ``1 + #{j != t : scores[q, j] >= scores[q, t]}``."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ThinkfastError(f"need scores (Q, N) and targets (Q,), got {scores.shape} and {targets.shape}")
    if targets.size and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ThinkfastError(f"targets must index the {scores.shape[1]} score columns")
    if np.isnan(scores).any():
        raise ThinkfastError("scores contain NaN")
    target_scores = scores[np.arange(scores.shape[0]), targets][:, None]  # (Q, 1)
    return (scores >= target_scores).sum(axis=1).astype(np.float64)  # the target itself counts as 1


def ranks_from_rankings(rankings: Sequence[Sequence[Hashable]], targets: Sequence[Hashable],
                        missing_rank: float = float("inf")) -> np.ndarray:
    """Ranked lists of ids (best first) and each query's answer id -> ranks ``(Q,)``;
    ``missing_rank`` where the answer is not in the list."""
    if len(rankings) != len(targets):
        raise ThinkfastError(f"{len(rankings)} rankings but {len(targets)} targets")
    ranks = np.empty(len(targets), dtype=np.float64)
    for q, (ranked, target) in enumerate(zip(rankings, targets)):
        ranks[q] = missing_rank
        for position, item in enumerate(ranked):
            if item == target:
                ranks[q] = position + 1
                break
    return ranks


def caption_targets(caption_image_ids: Sequence[Hashable], image_ids: Sequence[Hashable]) -> np.ndarray:
    """Column index of each caption's image (captions carry their image key)."""
    column = {key: i for i, key in enumerate(image_ids)}
    if len(column) != len(image_ids):
        raise ThinkfastError("image ids must be unique")
    try:
        return np.asarray([column[key] for key in caption_image_ids], dtype=np.int64)
    except KeyError as exc:
        raise ThinkfastError(f"caption refers to unknown image {exc.args[0]!r}") from exc


def recall_at_k(ranks: ArrayLike, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``{"R@k": percent of queries with rank <= k}``."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ThinkfastError("no queries to evaluate")
    return {f"R@{k}": float(100.0 * (ranks <= k).mean()) for k in ks}


def median_rank(ranks: ArrayLike) -> float:
    """Median of the 1-based ranks (the mean of the two middle ones for an even count)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ThinkfastError("no queries to evaluate")
    return float(np.median(ranks))


def retrieval_metrics(ranks: ArrayLike, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """R@k for each k, median rank and the number of queries, in one dict for reports."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = recall_at_k(ranks, ks)
    out["median_rank"] = median_rank(ranks)
    out["num_queries"] = int(ranks.size)
    return out
