"""R@K and median rank on hand-made rankings, several captions per image."""

from __future__ import annotations

import math

import numpy as np
import pytest

from thinkfast.errors import ThinkfastError
from thinkfast.metrics import caption_targets, median_rank, ranks_from_rankings, ranks_from_scores, recall_at_k, retrieval_metrics


def test_ranks_from_scores_with_several_captions_per_image() -> None:
    # 3 images, 5 captions: captions 0,1 -> img A; 2,3 -> img B; 4 -> img C
    targets = caption_targets(["A", "A", "B", "B", "C"], ["A", "B", "C"])
    assert targets.tolist() == [0, 0, 1, 1, 2]
    scores = np.array([
        [0.9, 0.1, 0.2],  # rank 1
        [0.3, 0.5, 0.1],  # rank 2
        [0.1, 0.2, 0.3],  # rank 2
        [0.8, 0.7, 0.9],  # rank 3
        [0.4, 0.4, 0.4],  # all tied: pessimistic rank 3
    ])
    ranks = ranks_from_scores(scores, targets)
    assert ranks.tolist() == [1, 2, 2, 3, 3]
    assert recall_at_k(ranks, ks=(1, 2, 3)) == {"R@1": 20.0, "R@2": 60.0, "R@3": 100.0}
    assert median_rank(ranks) == 2.0
    report = retrieval_metrics(ranks)
    assert report == {"R@1": 20.0, "R@5": 100.0, "R@10": 100.0, "median_rank": 2.0, "num_queries": 5}


def test_ranks_from_rankings_and_missing_answers() -> None:
    rankings = [["b", "a", "c"], ["a"], ["c", "b"], ["x", "y", "z", "w"]]
    ranks = ranks_from_rankings(rankings, ["a", "a", "a", "w"])
    assert ranks[:2].tolist() == [2, 1] and math.isinf(ranks[2]) and ranks[3] == 4
    assert ranks_from_rankings(rankings, ["a", "a", "a", "w"], missing_rank=100)[2] == 100
    assert recall_at_k(ranks, ks=(1, 2)) == {"R@1": 25.0, "R@2": 50.0}
    assert median_rank([1, 2, 4, 10]) == 3.0


def test_bad_inputs() -> None:
    with pytest.raises(ThinkfastError):
        ranks_from_scores(np.zeros((2, 3)), [0, 3])
    with pytest.raises(ThinkfastError):
        ranks_from_scores(np.zeros((2, 3)), [0])
    with pytest.raises(ThinkfastError, match="NaN"):
        ranks_from_scores(np.full((1, 2), np.nan), [0])
    with pytest.raises(ThinkfastError, match="unknown image"):
        caption_targets(["Z"], ["A"])
    with pytest.raises(ThinkfastError, match="no queries"):
        recall_at_k([])
    with pytest.raises(ThinkfastError):
        ranks_from_rankings([["a"]], [])
