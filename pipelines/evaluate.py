"""``thinkfast eval``: text-to-visual retrieval on a corpus split, fast vs slow vs re-ranked.

    thinkfast eval --corpus runs/corpus --fast runs/fast --slow runs/slow --rerank 5 10 20 50

Every caption of every image in ``--split`` is a query; its image is the one right answer;
the gallery is the split's images (DESIGN.md §1 "Evaluation"). For each query we rank the
gallery with

* ``fast``: ``f(x)ᵀ g(y)`` over the whole gallery (exact, in memory);
* ``slow``: ``h(x, y)`` of *every* gallery image (exhaustive: N slow evaluations a query,
  the cost the paper avoids);
* ``rerank@K``: fast top-K (from ``--index`` like the service, or exact in memory), then
  ``thinkfast.rerank`` re-scores those K with ``h + β·s_fast`` (the service's code path).

and report R@1/5/10 and median rank (``thinkfast.metrics``), slow-model evaluations per
query and wall time per query. Images (or their embeddings / tokens) come from the corpus
decoded in-process, or from an ``embed`` output (``--embeddings``) so the numbers match
what the service sees (fp16 tokens). Rows that fail to decode are listed in the report
with their reason; queries whose image is missing from the embeddings are counted and
left out (never silently).

Wall time per query is the method's total time over all queries divided by their number
(batched where the method allows it): amortised throughput cost, not a single-query
latency (``benchmarks/serve_bench.py`` measures that).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from thinkfast.utils.paths import user_paths
from thinkfast.errors import ThinkfastError
from thinkfast.utils import fs
from thinkfast.utils.timer import StageTimer

logger = logging.getLogger(__name__)

DEFAULT_RERANK = (5, 10, 20, 50)
DEFAULT_NUM_FRAMES = 8  # frames per video when neither the flag nor an embed manifest says (embed's default)
RECALL_AT = (1, 5, 10)


class EvalError(ThinkfastError):
    """The evaluation cannot run as asked (empty split, mismatched models, bad flags)."""


# --------------------------------------------------------------------------- data


@dataclass
class Gallery:
    """The split's images (or videos) and their captions, decoded lazily per image size."""

    keys: list[str]  # gallery order; query targets index into it
    captions: list[list[str]]  # captions of each gallery item
    media: list[dict[str, Any]]  # the raw corpus rows (key + media column) to decode from
    columns: Any  # thinkfast.data.schema.CorpusColumns of the corpus
    num_frames: int  # frames sampled per video
    rejected: list[dict[str, str]] = field(default_factory=list)  # key, stage, reason, detail
    _pixels: dict[int, Any] = field(default_factory=dict)  # image_size -> (N, 3, S, S) / (N, F, 3, S, S)

    @property
    def is_video(self) -> bool:
        return bool(self.columns.is_video)

    def pixels(self, image_size: int) -> Any:
        """All gallery pixels at ``image_size`` (decoded once per size, cached)."""
        import torch

        from thinkfast.data.media import load_pixels

        if image_size not in self._pixels:
            self._pixels[image_size] = torch.stack(
                [load_pixels(row, self.columns, image_size, num_frames=self.num_frames) for row in self.media]
            )
        return self._pixels[image_size]

    def drop(self, missing: set[str], stage: str, reason: str) -> None:
        """Remove items (e.g. absent from the embeddings), recording each as rejected."""
        if not missing:
            return
        keep = [i for i, k in enumerate(self.keys) if k not in missing]
        for k in sorted(missing):
            self.rejected.append({"key": k, "stage": stage, "reason": reason, "detail": ""})
        self.keys = [self.keys[i] for i in keep]
        self.captions = [self.captions[i] for i in keep]
        self.media = [self.media[i] for i in keep]
        self._pixels = {s: p[keep] for s, p in self._pixels.items()}


@dataclass(frozen=True)
class Queries:
    """Caption queries and the gallery index of the image each one describes."""

    texts: list[str]  # (Q,) caption text
    target: np.ndarray  # (Q,) int64 index into Gallery.keys


def load_gallery(
    corpus: str,
    split: str | None = "test",
    num_frames: int = DEFAULT_NUM_FRAMES,
    max_images: int | None = None,
    s3_endpoint: str | None = None,
    check_decode_size: int | None = None,
) -> Gallery:
    """Read the split's rows; rows that cannot be decoded are recorded, not dropped silently.

    ``check_decode_size`` decodes every row once at that size so undecodable media are
    found (and removed with their reason) before any model runs."""
    from thinkfast.data.media import captions_of, load_pixels
    from thinkfast.data.reader import inspect_corpus, read_table
    from thinkfast.errors import DecodeError

    info = inspect_corpus(corpus, s3_endpoint)
    columns = info.columns
    if split is not None and not columns.has_split:
        raise EvalError(f"{corpus} has no 'split' column; pass --split all to evaluate every row")
    table = read_table(corpus, columns=[columns.key, columns.captions, columns.media],
                       filter_split=split, s3_endpoint=s3_endpoint)
    if table.num_rows == 0:
        raise EvalError(f"{corpus} has no rows in split {split!r}")
    rows = table.to_pylist()
    if max_images is not None:
        rows = rows[:max_images]
    gallery = Gallery(keys=[], captions=[], media=[], columns=columns, num_frames=num_frames)
    decoded = []
    for row in rows:
        key = str(row[columns.key])
        caps = captions_of(row, columns)
        if not caps:
            gallery.rejected.append({"key": key, "stage": "eval", "reason": "no_captions", "detail": ""})
            continue
        if check_decode_size is not None:
            try:
                decoded.append(load_pixels(row, columns, check_decode_size, num_frames=num_frames, s3_endpoint=s3_endpoint))
            except DecodeError as exc:
                gallery.rejected.append({"key": key, "stage": "decode", "reason": exc.reason, "detail": exc.detail})
                continue
        gallery.keys.append(key)
        gallery.captions.append(caps)
        gallery.media.append(row)
    if len(set(gallery.keys)) != len(gallery.keys):
        raise EvalError(f"{corpus}: duplicate keys in split {split!r}")
    if decoded:
        import torch

        gallery._pixels[check_decode_size] = torch.stack(decoded)  # type: ignore[index]
    if not gallery.keys:
        raise EvalError(f"{corpus}: no usable rows in split {split!r} ({len(gallery.rejected)} rejected)")
    logger.info("gallery: %d items from split %r (%d rejected)", len(gallery.keys), split, len(gallery.rejected))
    return gallery


def make_queries(gallery: Gallery, max_queries: int | None = None, seed: int = 0) -> Queries:
    """One query per caption; ``max_queries`` keeps a seeded random subset (same for every method)."""
    texts = [c for caps in gallery.captions for c in caps]
    target = np.asarray([i for i, caps in enumerate(gallery.captions) for _ in caps], dtype=np.int64)
    if max_queries is not None and max_queries < len(texts):
        pick = np.sort(np.random.default_rng(seed).choice(len(texts), size=max_queries, replace=False))
        texts, target = [texts[i] for i in pick], target[pick]
    return Queries(texts=texts, target=target)


# --------------------------------------------------------------------------- model sides


def _batched(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def fast_image_embeddings(fast: Any, gallery: Gallery, batch_size: int = 64) -> np.ndarray:
    """``f(x)`` of every gallery item, (N, d) float32, computed in-process."""
    import torch

    pixels = gallery.pixels(fast.config.image_size)
    with torch.inference_mode():
        out = [fast.encode_image(pixels[s]).float().cpu().numpy() for s in _batched(len(pixels), batch_size)]
    return np.concatenate(out)  # (N, d)


def fast_text_embeddings(fast: Any, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """``g(y)`` of every query, (Q, d) float32."""
    import torch

    out = []
    with torch.inference_mode():
        for s in _batched(len(texts), batch_size):
            tok = fast.tokenize(list(texts[s]))
            out.append(fast.encode_text(tok["input_ids"], tok["attention_mask"]).float().cpu().numpy())
    return np.concatenate(out)  # (Q, d)


def slow_tokens(slow: Any, gallery: Gallery, batch_size: int = 32) -> np.ndarray:
    """``φ(x)`` of every gallery item, (N, T, D) float16 (the token store's precision)."""
    import torch

    pixels = gallery.pixels(slow.config.image_size)
    with torch.inference_mode():
        out = [slow.encode_visual(pixels[s]).to(torch.float16).cpu().numpy() for s in _batched(len(pixels), batch_size)]
    return np.concatenate(out)  # (N, T, D)


def slow_exhaustive_scores(slow: Any, tokens: np.ndarray, texts: Sequence[str], chunk_size: int = 1024) -> np.ndarray:
    """``h(x_j, y_i)`` for every query i and gallery item j, (Q, N) float32 (Q·N slow evaluations)."""
    import torch

    visual = torch.from_numpy(tokens)  # (N, T, D) fp16, cast inside the model
    rows = []
    with torch.inference_mode():
        for s in _batched(len(texts), max(1, chunk_size // max(1, len(tokens)))):
            tok = slow.tokenize(list(texts[s]))
            rows.append(slow.score_matrix(visual, tok["input_ids"], tok["attention_mask"], chunk_size=chunk_size)
                        .float().cpu().numpy())
    return np.concatenate(rows)  # (Q, N)


# --------------------------------------------------------------------------- ranking


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


def exact_candidates(fast_scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact fast top-``k`` per query: (indices (Q, k), scores (Q, k)), best first, ties by
    gallery order (as ``thinkfast.rerank.ExactIndex``)."""
    order = np.argsort(-fast_scores, axis=1, kind="stable")[:, :k]  # (Q, k)
    return order, np.take_along_axis(fast_scores, order, axis=1)


def rerank_ranks(
    slow: Any,
    queries: Queries,
    gallery_keys: list[str],
    fast_scores: np.ndarray,
    token_getter: Any,
    candidates: tuple[np.ndarray, np.ndarray],
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
    for s in _batched(q, query_batch):
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
    index: Any, text_embeddings: np.ndarray, k: int, gallery_keys: list[str]
) -> tuple[tuple[np.ndarray, np.ndarray], int]:
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


# --------------------------------------------------------------------------- the evaluation


def _load_model(kind: str, model: Any) -> Any:
    """A model instance, or a model directory / URI loaded (eval mode)."""
    if model is None or not isinstance(model, str):
        return model.eval() if model is not None else None
    from thinkfast import FastModel, SlowModel

    cls = FastModel if kind == "fast" else SlowModel
    return cls.from_pretrained(model).eval()


def _resolve_num_frames(num_frames: int | None, embeddings: str | None, slow: Any, s3_endpoint: str | None) -> int:
    """Flag, else what ``embed`` used (its manifest), else the default capped by the slow model."""
    if num_frames:
        return int(num_frames)
    if embeddings:
        manifest_uri = fs.join(embeddings, "manifest.json")
        if fs.exists(manifest_uri, s3_endpoint):
            value = fs.read_json(manifest_uri, s3_endpoint).get("num_frames")
            if value:
                return int(value)
    cap = slow.config.max_frames if slow is not None else DEFAULT_NUM_FRAMES
    return min(DEFAULT_NUM_FRAMES, cap)


def _embedding_sources(
    embeddings: str, gallery: Gallery, need_tokens: bool, s3_endpoint: str | None
) -> tuple[np.ndarray, Any]:
    """Gallery vectors (N, d) and a token getter from an ``embed`` output; gallery items the
    embed job did not produce (rejected there) are dropped and recorded."""
    from thinkfast.store import TokenStore, read_embeddings

    keys, vectors = read_embeddings(fs.join(embeddings, "fast"), s3_endpoint)
    position = {k: i for i, k in enumerate(keys)}
    store = TokenStore.open(embeddings, s3_endpoint) if need_tokens else None
    missing = {k for k in gallery.keys if k not in position or (store is not None and k not in store)}
    if missing:
        logger.warning("%d gallery items are not in %s (rejected by embed?): left out", len(missing), embeddings)
    gallery.drop(missing, "embed", "not_in_embeddings")
    if not gallery.keys:
        raise EvalError(f"none of the split's items are in {embeddings}")
    return vectors[[position[k] for k in gallery.keys]], (store.get if store is not None else None)


@user_paths("corpus", "index", "embeddings", "out", models=("fast", "slow"))
def evaluate(
    corpus: str,
    fast: Any,
    slow: Any = None,
    *,
    index: str | None = None,
    embeddings: str | None = None,
    rerank: Sequence[int] = DEFAULT_RERANK,
    split: str | None = "test",
    beta: float = 0.0,
    exhaustive: bool = True,
    max_queries: int | None = None,
    max_images: int | None = None,
    num_frames: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    out: str | None = None,
    s3_endpoint: str | None = None,
    fast_name: str = "fast",
    slow_name: str = "slow",
    gallery: Gallery | None = None,
    per_query_ranks: bool = False,
) -> dict[str, Any]:
    """Evaluate text-to-visual retrieval on ``split``; returns (and with ``out`` writes) the report.

    ``fast`` / ``slow``: model directories / URIs or loaded models (``slow=None``: fast only).
    ``index``: a ShardedIndex URI used for the re-ranking's stage 1 (else exact top-K).
    ``embeddings``: an ``embed`` output whose fast vectors and fp16 tokens are used instead
    of running the image towers here. ``exhaustive=False`` skips the slow-over-everything
    row (Q·N slow evaluations). ``gallery``: a pre-loaded gallery (reused across calls by
    the accuracy benchmark; ``corpus``/``split`` are then only recorded). ``per_query_ranks``
    adds ``ranks``: method -> each query's rank of its image (for paired comparisons)."""
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
            image_vectors, token_getter = _embedding_sources(embeddings, gallery, slow_model is not None, s3_endpoint)
        else:
            image_vectors = fast_image_embeddings(fast_model, gallery, batch_size)  # (N, d)
            token_getter = None
            if slow_model is not None:
                tokens = slow_tokens(slow_model, gallery, batch_size)  # (N, T, D)
                position = {k: i for i, k in enumerate(gallery.keys)}
                token_getter = lambda keys: tokens[[position[k] for k in keys]]  # noqa: E731
    queries = make_queries(gallery, max_queries, seed)
    methods: list[dict[str, Any]] = []
    all_ranks: dict[str, list[int]] = {}

    def add(row: dict[str, Any], ranks: np.ndarray) -> None:
        methods.append(row)
        all_ranks[row["method"]] = [int(r) for r in ranks]

    with timer.stage("fast"):
        t0 = time.perf_counter()
        text_vectors = fast_text_embeddings(fast_model, queries.texts)  # (Q, d)
        encode_s = time.perf_counter() - t0
        fast_scores = text_vectors @ image_vectors.T  # (Q, N)
        fast_s = time.perf_counter() - t0
    from thinkfast import metrics

    fast_ranks = metrics.ranks_from_scores(fast_scores, queries.target)
    add(summarize(fast_name, fast_ranks, 0, fast_s), fast_ranks)

    if slow_model is not None and exhaustive:
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
        with timer.stage(f"rerank@{k}"):
            t0 = time.perf_counter()
            foreign = 0
            if sharded is not None:
                candidates, foreign = index_candidates(sharded, text_vectors, k, gallery.keys)
            else:
                candidates = exact_candidates(fast_scores, min(k, len(gallery.keys)))
            ranks, evals = rerank_ranks(slow_model, queries, gallery.keys, fast_scores, token_getter, candidates, beta)
            seconds = encode_s + time.perf_counter() - t0
        add(summarize(f"{fast_name}+{slow_name} rerank@{k}", ranks, evals, seconds, K=k,
                      **({"foreign_candidates": foreign} if sharded is not None else {})), ranks)

    report: dict[str, Any] = {
        "corpus": str(corpus),
        "split": split,
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
        "rejected": gallery.rejected[:100],
        "methods": methods,
        "timings_s": timer.as_dict(),
    }
    if per_query_ranks:
        report["ranks"] = all_ranks
    if out:
        fs.write_json(out, report, s3_endpoint)
        logger.info("wrote %s", out)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report's methods as a Markdown table (what the CLI, demo and RESULTS.md print)."""
    head = "| method | R@1 | R@5 | R@10 | median rank | slow evals / query | ms / query |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for m in report["methods"]:
        lines.append(f"| {m['method']} | {m['R@1']:.1f} | {m['R@5']:.1f} | {m['R@10']:.1f} | {m['median_rank']:g} "
                     f"| {m['slow_evals_per_query']:g} | {m['ms_per_query']:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="corpus Parquet (local path or s3://)")
    parser.add_argument("--fast", required=True, help="fast model directory or URI")
    parser.add_argument("--slow", help="slow model directory or URI (omit for fast-only metrics)")
    parser.add_argument("--index", help="ShardedIndex URI for the re-ranking's stage 1 (default: exact top-K in memory)")
    parser.add_argument("--embeddings", help="embed output (fast/ + tokens/) to use instead of running the image towers")
    parser.add_argument("--rerank", type=int, nargs="*", default=list(DEFAULT_RERANK), metavar="K",
                        help="re-rank the fast top-K for each K (default: 5 10 20 50; none: no re-ranking)")
    parser.add_argument("--split", default="test", help="corpus split to evaluate ('all' for every row)")
    parser.add_argument("--beta", type=float, default=0.0, help="weight of s_fast in h + beta*s_fast")
    parser.add_argument("--no-exhaustive", action="store_true", help="skip slow scoring of every (query, image) pair")
    parser.add_argument("--max-queries", type=int, help="evaluate a seeded random subset of the captions")
    parser.add_argument("--max-images", type=int, help="use only the first N images of the split")
    parser.add_argument("--num-frames", type=int, help="frames per video (default: embed's, else 8)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-queries subset")
    parser.add_argument("--out", help="write the JSON report here (local path or s3://)")
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")


def run(args: argparse.Namespace) -> int:
    report = evaluate(
        args.corpus, args.fast, args.slow, index=args.index, embeddings=args.embeddings, rerank=args.rerank,
        split=None if args.split == "all" else args.split, beta=args.beta, exhaustive=not args.no_exhaustive,
        max_queries=args.max_queries, max_images=args.max_images, num_frames=args.num_frames,
        batch_size=args.batch_size, seed=args.seed, out=args.out, s3_endpoint=args.s3_endpoint,
    )
    print(f"{report['num_queries']} queries over {report['gallery_size']} items (split {report['split']}), "
          f"{report['rejected_count']} rejected")
    print(format_table(report))
    if not args.out:
        print(json.dumps(report["methods"], indent=2))
    return 0
