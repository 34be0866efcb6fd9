"""The unseen-concept case: test queries whose content words no training caption uses.

A user's own photos mostly show things the training captions never named, so the test
queries whose words are all new are reported on their own. Without a part-of-speech
tagger (none is installed offline), "nouns" are approximated by content words: lower-cased
alphabetic words that are not in a small stop list, with a plural ``s`` / ``es`` stripped.
A query is *unseen* when none of its content words occurs in any train caption; for
"A great blue heron." next to a train caption "A blue whale." that is false ("blue"), so the
subset is strict: what is left really is new to the training text.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import numpy as np

from thinkfast.evaluation.ranking import summarize

STOP_WORDS = frozenset(
    "a an the of and or with in on at to from by for is are its it this that these those some one two three "
    "which who what as into over under near up down out off very".split())
_WORD = re.compile(r"[a-z]+")


def _stem(word: str) -> str:
    if len(word) > 4 and word.endswith("es") and (word[-3] in "sxz" or word[-4:-2] in ("ch", "sh")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def content_words(text: str) -> set[str]:
    """The caption's content words, lower-cased and singularised (``"Two red apples."`` ->
    ``{"red", "apple"}``)."""
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in STOP_WORDS}


def vocabulary(captions: Iterable[str]) -> set[str]:
    """Every content word of ``captions`` (the train split's)."""
    out: set[str] = set()
    for caption in captions:
        out |= content_words(caption)
    return out


def unseen_mask(queries: Sequence[str], train_captions: Iterable[str]) -> np.ndarray:
    """``(Q,)`` bool: the queries with content words, none of them in a train caption."""
    seen = vocabulary(train_captions)
    return np.array([bool(words) and not (words & seen) for words in map(content_words, queries)], dtype=bool)


def subset_rows(report: dict[str, Any], mask: np.ndarray, suffix: str = " [unseen]") -> list[dict[str, Any]]:
    """R@1/5/10 and median rank of every method of ``report`` (an ``evaluate(...,
    per_query_ranks=True)`` report) over the queries ``mask`` selects."""
    if "ranks" not in report:
        raise ValueError("the report has no per-query ranks: evaluate(..., per_query_ranks=True)")
    rows = []
    for method in report["methods"]:
        ranks = np.asarray(report["ranks"][method["method"]])[mask]
        if len(ranks):
            rows.append(summarize(method["method"] + suffix, ranks, method["slow_evals_per_query"], 0.0))
    return rows
