"""Text-to-visual retrieval on a corpus split, fast vs slow vs re-ranked (``thinkfast eval``).

    from thinkfast.evaluate import evaluate, format_table
    report = evaluate("runs/corpus", "runs/fast", "runs/slow", rerank=[5, 10, 20, 50])

Every caption of every image in ``split`` is a query; its image is the one right answer;
the gallery is the split's images (DESIGN.md §1 "Evaluation"). A corpus without a
``split`` column is split by key hash exactly as training splits it
(:mod:`thinkfast.data.splits`), so its held-out test rows can be evaluated on their own.
For each query we rank the gallery with

* ``fast``: ``f(x)ᵀ g(y)`` over the whole gallery (exact, in memory);
* ``slow``: ``h(x, y)`` of *every* gallery image (exhaustive: N slow evaluations a query,
  the cost the paper avoids);
* ``rerank@K``: fast top-K (from ``index`` like the service, or exact in memory), then
  ``thinkfast.rerank`` re-scores those K with ``h + β·s_fast`` (the service's code path).

and report R@1/5/10 and median rank (``thinkfast.metrics``), slow-model evaluations per
query and wall time per query. Images (or their embeddings / tokens) come from the corpus
decoded in-process, or from an ``embed`` output (``embeddings``) so the numbers match
what the service sees (fp16 tokens). Rows that fail to decode are listed in the report
with their reason (``Reject.to_dict()``); queries whose image is missing from the
embeddings are counted and left out (never silently).

Wall time per query is the method's total time over all queries divided by their number
(batched where the method allows it): amortised throughput cost, not a single-query
latency (``benchmarks/serve_bench.py`` measures that).

Nothing here needs Ray; the ``thinkfast eval`` command (``thinkfast_pipelines.evaluate``)
only turns flags into an :class:`EvalConfig` and calls :func:`evaluate`.
"""

from __future__ import annotations

from thinkfast.evaluation.config import (
    ALL_SPLITS,
    DEFAULT_NUM_FRAMES,
    DEFAULT_RERANK,
    RECALL_AT,
    EvalConfig,
    EvalError,
)
from thinkfast.evaluation.gallery import Gallery, Queries, load_gallery, make_queries
from thinkfast.evaluation.ranking import (
    Candidates,
    exact_candidates,
    index_candidates,
    rerank_ranks,
    slow_exhaustive_scores,
    summarize,
)
from thinkfast.evaluation.run import evaluate, format_table

__all__ = [
    "ALL_SPLITS", "DEFAULT_NUM_FRAMES", "DEFAULT_RERANK", "RECALL_AT",
    "Candidates", "EvalConfig", "EvalError", "Gallery", "Queries",
    "evaluate", "exact_candidates", "format_table", "index_candidates", "load_gallery", "make_queries",
    "rerank_ranks", "slow_exhaustive_scores", "summarize",
]
