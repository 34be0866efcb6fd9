"""The evaluation itself: load the models and the gallery, score every query three ways,
and assemble (and optionally write) the report. No Ray: the CLI in ``thinkfast_pipelines``
and the benchmarks call :func:`evaluate` in-process."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from thinkfast.evaluation.config import DEFAULT_NUM_FRAMES, EvalConfig, EvalError
from thinkfast.evaluation.gallery import Gallery, load_gallery, make_queries
from thinkfast.evaluation.ranking import (
    exact_candidates,
    index_candidates,
    rerank_ranks,
    reranked_top,
    slow_exhaustive_scores,
    summarize,
)
from thinkfast.utils import fs
from thinkfast.utils.paths import user_paths
from thinkfast.utils.timer import StageTimer

if TYPE_CHECKING:
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast.rerank import TokenGetter

logger = logging.getLogger(__name__)

_D = EvalConfig()  # evaluate()'s defaults are the CLI's


def _load_model(kind: str, model: "str | FastModel | SlowModel | None") -> Any:
    """A model instance, or a model directory / URI loaded (eval mode); ``Any`` because the
    caller knows which of FastModel / SlowModel ``kind`` gives."""
    if model is None or not isinstance(model, str):
        return model.eval() if model is not None else None
    from thinkfast import FastModel, SlowModel

    cls = FastModel if kind == "fast" else SlowModel
    return cls.from_pretrained(model).eval()


def _resolve_num_frames(num_frames: int | None, embeddings: str | None, slow: "SlowModel | None",
                        s3_endpoint: str | None) -> int:
    """Flag, else what ``embed`` used (its manifest), else the default capped by the slow model."""
    if num_frames:
        return int(num_frames)
    if embeddings:
        from thinkfast.store.layout import find_embed_manifest

        manifest = find_embed_manifest(embeddings, s3_endpoint)
        if manifest is not None and manifest.num_frames:
            return int(manifest.num_frames)
    cap = slow.config.max_frames if slow is not None else DEFAULT_NUM_FRAMES
    return min(DEFAULT_NUM_FRAMES, cap)


def _embedding_sources(
    embeddings: str, gallery: Gallery, need_tokens: bool, s3_endpoint: str | None
) -> tuple[np.ndarray, "TokenGetter | None"]:
    """Gallery vectors (N, d) and a token getter from an ``embed`` output; gallery items the
    embed job did not produce (rejected there) are dropped and recorded."""
    from thinkfast.store import TokenStore, read_embeddings
    from thinkfast.store.layout import fast_dir

    keys, vectors = read_embeddings(fast_dir(embeddings), s3_endpoint)
    position = {k: i for i, k in enumerate(keys)}
    store = TokenStore.open(embeddings, s3_endpoint) if need_tokens else None
    missing = {k for k in gallery.keys if k not in position or (store is not None and k not in store)}
    if missing:
        logger.warning("%d gallery items are not in %s (rejected by embed?): left out", len(missing), embeddings)
    gallery.drop(missing, "embed", "not_in_embeddings")
    if not gallery.keys:
        raise EvalError(f"none of the split's items are in {embeddings}")
    return vectors[[position[k] for k in gallery.keys]], (store.get if store is not None else None)


def _in_process_sources(fast: "FastModel", slow: "SlowModel | None", gallery: Gallery,
                        batch_size: int) -> tuple[np.ndarray, "TokenGetter | None"]:
    """Gallery vectors (N, d) and tokens (N, T, D) fp16 computed here from decoded pixels."""
    from thinkfast import encode

    vectors = encode.image_vectors(fast, gallery.pixels(fast.config.image_size), batch_size)  # (N, d)
    if slow is None:
        return vectors, None
    tokens = encode.visual_tokens(slow, gallery.pixels(slow.config.image_size), batch_size)  # (N, T, D)
    position = {k: i for i, k in enumerate(gallery.keys)}
    return vectors, lambda keys: tokens[[position[k] for k in keys]]



@user_paths("corpus", "index", "embeddings", "out", models=("fast", "slow"))
def evaluate(
    corpus: str,
    fast: "str | FastModel",
    slow: "str | SlowModel | None" = None,
    *,
    index: str | None = None,
    embeddings: str | None = None,
    rerank: Sequence[int] = _D.rerank,
    split: str | None = _D.split,
    beta: float = _D.beta,
    exhaustive: bool = _D.exhaustive,
    max_queries: int | None = _D.max_queries,
    max_images: int | None = _D.max_images,
    num_frames: int | None = _D.num_frames,
    batch_size: int = _D.batch_size,
    seed: int = _D.seed,
    precision: bool = _D.precision,
    out: str | None = None,
    s3_endpoint: str | None = _D.s3_endpoint,
    fast_name: str = "fast",
    slow_name: str = "slow",
    gallery: Gallery | None = None,
    per_query_ranks: bool = False,
) -> dict[str, Any]:
    """Evaluate text-to-visual retrieval on ``split``; returns (and with ``out`` writes) the report.

    ``fast`` / ``slow``: model directories / URIs or loaded models (``slow=None``: fast only).
    ``split``: a ``split`` column value; a corpus without that column is split by key hash
    exactly as training splits it (``thinkfast.data.splits``); ``None``: every row.
    ``index``: a ShardedIndex URI used for the re-ranking's stage 1 (else exact top-K).
    ``embeddings``: an ``embed`` output whose fast vectors and fp16 tokens are used instead
    of running the image towers here. ``exhaustive=False`` skips the slow-over-everything
    row (Q·N slow evaluations). ``gallery``: a pre-loaded gallery (reused across calls by
    the accuracy benchmark; ``corpus``/``split`` are then only recorded). ``per_query_ranks``
    adds ``ranks``: method -> each query's rank of its image (for paired comparisons), and
    ``queries``, their texts in the same order.
    ``precision``: on a corpus with a ``scene`` column, each row also gets ``P@5`` (and per
    query kind) over :mod:`thinkfast.evaluation.precision`'s fixed query set."""
    from thinkfast import encode, metrics

    rerank = sorted({int(k) for k in rerank})
    if any(k < 1 for k in rerank):
        raise EvalError(f"--rerank values must be >= 1, got {rerank}")
    if max_queries is not None and max_queries < 1:
        raise EvalError(f"--max-queries must be >= 1, got {max_queries}")
    timer = StageTimer(logger)
    with timer.stage("load_models"):
        fast_model = _load_model("fast", fast)
        slow_model = _load_model("slow", slow)
    if fast_model is None:
        raise EvalError("a fast model is needed (--fast)")
    frames = _resolve_num_frames(num_frames, embeddings, slow_model, s3_endpoint)
    with timer.stage("load_gallery"):
        if gallery is None:
            gallery = load_gallery(corpus, split, frames, max_images, s3_endpoint,
                                   check_decode_size=None if embeddings else fast_model.config.image_size)
    with timer.stage("gallery_embeddings"):
        if embeddings:
            gallery_vectors, token_getter = _embedding_sources(embeddings, gallery, slow_model is not None, s3_endpoint)
        else:
            gallery_vectors, token_getter = _in_process_sources(fast_model, slow_model, gallery, batch_size)
    queries = make_queries(gallery, max_queries, seed)
    methods: list[dict[str, Any]] = []
    all_ranks: dict[str, list[int]] = {}

    def add(row: dict[str, Any], ranks: np.ndarray) -> None:
        methods.append(row)
        all_ranks[row["method"]] = [int(r) for r in ranks]

    with timer.stage("fast"):
        t0 = time.perf_counter()
        query_vectors = encode.text_vectors(fast_model, queries.texts)  # (Q, d)
        encode_s = time.perf_counter() - t0
        fast_scores = query_vectors @ gallery_vectors.T  # (Q, N)
        fast_s = time.perf_counter() - t0
    fast_ranks = metrics.ranks_from_scores(fast_scores, queries.target)
    add(summarize(fast_name, fast_ranks, 0, fast_s), fast_ranks)

    if slow_model is not None and exhaustive:
        assert token_getter is not None
        with timer.stage("slow_exhaustive"):
            t0 = time.perf_counter()
            all_tokens = np.asarray(token_getter(gallery.keys))  # (N, T, D)
            slow_matrix = slow_exhaustive_scores(slow_model, all_tokens, queries.texts)  # (Q, N)
            slow_s = time.perf_counter() - t0
        slow_ranks = metrics.ranks_from_scores(slow_matrix, queries.target)
        add(summarize(slow_name, slow_ranks, len(gallery.keys), slow_s), slow_ranks)

    sharded = None
    if index and slow_model is not None and rerank:
        from thinkfast import ShardedIndex

        sharded = ShardedIndex.load(index, expected_model_identity=fast_model.identity, s3_endpoint=s3_endpoint)
    for k in rerank if slow_model is not None else []:
        assert token_getter is not None
        with timer.stage(f"rerank@{k}"):
            t0 = time.perf_counter()
            foreign = 0
            if sharded is not None:
                candidates, foreign = index_candidates(sharded, query_vectors, k, gallery.keys)
            else:
                candidates = exact_candidates(fast_scores, min(k, len(gallery.keys)))
            ranks, evals = rerank_ranks(slow_model, queries, gallery.keys, fast_scores, token_getter, candidates, beta)
            seconds = encode_s + time.perf_counter() - t0
        add(summarize(f"{fast_name}+{slow_name} rerank@{k}", ranks, evals, seconds, K=k,
                      **({"foreign_candidates": foreign} if sharded is not None else {})), ranks)

    if precision and gallery.scenes is not None and not gallery.is_video:
        with timer.stage("precision"):
            by_method = _precision_by_method(
                fast_model, slow_model, gallery, gallery_vectors, token_getter, sharded, rerank if slow_model else [],
                exhaustive, beta, fast_name, slow_name)
        for row in methods:
            row.update(by_method.get(row["method"], {}))

    report: dict[str, Any] = {
        "corpus": str(corpus),
        "split": split,
        "split_by": gallery.split_by,
        "gallery_size": len(gallery.keys),
        "num_queries": len(queries.texts),
        "video": gallery.is_video,
        "num_frames": gallery.num_frames if gallery.is_video else None,
        "fast_model": fast_model.identity,
        "slow_model": slow_model.identity if slow_model is not None else None,
        "embeddings": embeddings,
        "index": index,
        "beta": beta,
        "rejected_count": len(gallery.rejected),
        "rejected": [r.to_dict() for r in gallery.rejected[:100]],
        "methods": methods,
        "timings_s": timer.as_dict(),
    }
    if per_query_ranks:
        report["ranks"] = all_ranks
        report["queries"] = list(queries.texts)
    if out:
        fs.write_json(out, report, s3_endpoint)
        logger.info("wrote %s", out)
    return report


def _precision_by_method(fast_model: Any, slow_model: Any, gallery: Gallery, gallery_vectors: np.ndarray,
                         token_getter: "TokenGetter | None", sharded: Any, rerank: Sequence[int], exhaustive: bool,
                         beta: float, fast_name: str, slow_name: str, k: int = 5,
                         min_relevant: int | None = None) -> dict[str, dict[str, Any]]:
    """Each method's precision@k over the fixed query set (same candidates path as its R@K row);
    queries need ``min_relevant`` (default ``k``) correct gallery items."""
    from thinkfast import encode
    from thinkfast.evaluation import precision as prec

    assert gallery.scenes is not None
    texts, constraints, relevance = prec.query_set(gallery.scenes, min_relevant=min_relevant or k)
    if not texts:
        logger.info("precision@%d: no query has %d correct gallery items; skipped", k, k)
        return {}
    vectors = encode.text_vectors(fast_model, texts)  # (P, d)
    fast_scores = vectors @ gallery_vectors.T  # (P, N)
    out = {fast_name: prec.summary(prec.precision_at_k(exact_candidates(fast_scores, k)[0], relevance, k), constraints, k)}
    if slow_model is not None and exhaustive and token_getter is not None:
        matrix = slow_exhaustive_scores(slow_model, np.asarray(token_getter(gallery.keys)), texts)
        out[slow_name] = prec.summary(prec.precision_at_k(exact_candidates(matrix, k)[0], relevance, k), constraints, k)
    for big_k in rerank:
        assert token_getter is not None
        if sharded is not None:
            candidates, _ = index_candidates(sharded, vectors, big_k, gallery.keys)
        else:
            candidates = exact_candidates(fast_scores, min(big_k, len(gallery.keys)))
        top = reranked_top(slow_model, texts, gallery.keys, token_getter, candidates, beta, k)
        out[f"{fast_name}+{slow_name} rerank@{big_k}"] = prec.summary(prec.precision_at_k(top, relevance, k),
                                                                        constraints, k)
    return out


def format_table(report: dict[str, Any]) -> str:
    """The report's methods as a Markdown table (what the CLI, demo and RESULTS.md print)."""
    with_p = any(m.get("P@5") is not None for m in report["methods"])
    head = "| method | R@1 | R@5 | R@10 | median rank |" + (" P@5 |" if with_p else "") + " slow evals / query | ms / query |"
    lines = [head, "|---|---:|---:|---:|---:|" + ("---:|" if with_p else "") + "---:|---:|"]
    for m in report["methods"]:
        p5 = (f" {m['P@5']:.1f} |" if m.get("P@5") is not None else " – |") if with_p else ""
        lines.append(f"| {m['method']} | {m['R@1']:.1f} | {m['R@5']:.1f} | {m['R@10']:.1f} | {m['median_rank']:g} |"
                     f"{p5} {m['slow_evals_per_query']:g} | {m['ms_per_query']:.2f} |")
    return "\n".join(lines)
