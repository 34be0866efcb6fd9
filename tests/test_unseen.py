"""The unseen-concept query subset (thinkfast.evaluation.unseen), on hand-made captions."""

from __future__ import annotations

import numpy as np
import pytest

from thinkfast.evaluation.unseen import content_words, subset_rows, unseen_mask


def test_content_words_drop_stop_words_and_plurals():
    assert content_words("Two red apples.") == {"red", "apple"}  # "two" is a stop word
    assert content_words("A box of matches") == {"box", "match"}
    assert content_words("The grass") == {"grass"}  # a double s is not a plural
    assert content_words("A.") == set()


def test_a_query_is_unseen_only_when_none_of_its_words_is_in_training():
    train = ["A zebra.", "A blue whale.", "Some red apples."]
    queries = ["A frog.", "A great blue heron.", "An apple.", "A.", "A pair of cherries."]
    assert unseen_mask(queries, train).tolist() == [True, False, False, False, True]


def test_subset_rows_recompute_recall_over_the_selected_queries():
    report = {"methods": [{"method": "fast", "slow_evals_per_query": 0}],
              "ranks": {"fast": [1, 3, 12, 1]}}
    rows = subset_rows(report, np.array([True, True, True, False]))
    assert rows[0]["method"] == "fast [unseen]" and rows[0]["queries"] == 3
    assert rows[0]["R@1"] == pytest.approx(100 / 3, abs=0.01) and rows[0]["R@5"] == pytest.approx(200 / 3, abs=0.01)
    assert rows[0]["R@10"] == pytest.approx(200 / 3, abs=0.01) and rows[0]["median_rank"] == 3
    with pytest.raises(ValueError, match="per_query_ranks"):
        subset_rows({"methods": []}, np.array([True]))
