"""The Serve deployments behind the ingress: text encoder, per-shard retrievers, the
batched slow re-ranker and the corpus catalog.

Each replica loads what it needs from URIs in ``__init__`` (nothing at import), and holds
only its own part: retrievers hold one index shard each, so the index can exceed one
machine's memory; only the re-ranker holds the slow model and the token store, and only
it autoscales, because the slow scoring of K candidates dominates a query's cost.
Replies are plain Python / numpy objects, which Serve passes between replicas by pickle.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
from ray import serve

from thinkfast_pipelines.serve.args import ServeArgs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidates:
    """A query's fast candidates, best first."""

    keys: list[str]  # (K,)
    fast_scores: np.ndarray  # (K,) float32, s_fast


@dataclass(frozen=True)
class RerankItem:
    """One request's share of a re-rank batch."""

    query: str
    candidates: Candidates
    k: int  # results wanted (<= K)


@dataclass(frozen=True)
class Ranked:
    """Final ranking of one query, best first (length min(k, K))."""

    keys: list[str]
    score: np.ndarray  # (k,) h + beta * s_fast
    fast_score: np.ndarray  # (k,)
    slow_score: np.ndarray  # (k,) h = h_fwd + h_bwd


@dataclass(frozen=True)
class MediaReply:
    """What ``GET /media/{key}`` answers: bytes on 200, a ``detail`` otherwise."""

    status: int
    data: bytes = b""
    content_type: str = "application/octet-stream"
    detail: str = ""


def merge_shard_results(results: list[tuple[list[list[str]], np.ndarray]], k: int) -> list[Candidates]:
    """Per-shard top-k lists of each query -> global top-k per query (drops shard padding).

    Shards are disjoint, so the global top-k is the top-k of the union; ties keep shard
    order (a stable sort), which is what a single exact index over the same vectors gives."""
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
            keys.extend(row_keys[i] for i in valid)
            scores.append(row_scores[valid])
        flat = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        order = np.argsort(-flat, kind="stable")[:k]
        merged.append(Candidates([keys[i] for i in order], flat[order]))
    return merged


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


@serve.deployment
class TextEncoder:
    """g(y): the fast model's text tower. Batches concurrent queries into one forward pass."""

    def __init__(self, args: ServeArgs, torch_threads: int = 1) -> None:
        from thinkfast import FastModel
        from thinkfast.index.manifest import read_manifest

        _set_threads(torch_threads)
        self.model = FastModel.from_pretrained(args.fast).eval()
        self.identity = self.model.identity
        manifest = read_manifest(args.index, args.s3_endpoint)
        if manifest.model_identity is not None and manifest.model_identity != self.identity:
            from thinkfast.errors import IndexMismatchError

            raise IndexMismatchError(
                f"index {args.index} holds embeddings of fast model {manifest.model_identity}, but {args.fast} "
                f"is {self.identity}: queries would be scored in another space (re-run embed + index)"
            )
        logger.info("text encoder ready: %s (identity %s)", args.fast, self.identity)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def encode(self, queries: list[str]) -> list[np.ndarray | None]:
        return await asyncio.to_thread(self._encode, queries)

    def _encode(self, queries: list[str]) -> list[np.ndarray | None]:
        """g(y) per query; None for a query with no tokens (its mean pooling is undefined)."""
        import torch

        with torch.inference_mode():
            batch = self.model.tokenize(list(queries))
            vectors = self.model.encode_text(batch["input_ids"], batch["attention_mask"])  # (B, d)
        out = vectors.float().cpu().numpy()
        empty = batch["attention_mask"].sum(dim=1) == 0  # (B,)
        return [None if bool(empty[i]) or not np.isfinite(out[i]).all() else out[i] for i in range(len(queries))]

    def model_identity(self) -> str:
        return self.identity


@serve.deployment
class Retriever:
    """One index shard. Concurrent queries are searched as one (n, d) FAISS batch."""

    def __init__(self, args: ServeArgs, shard: int) -> None:
        from thinkfast import ShardedIndex

        self.shard = shard
        # only this shard is fetched / memory-mapped; the model identity is checked by TextEncoder
        self.index = ShardedIndex.load(args.index, shards=[shard], s3_endpoint=args.s3_endpoint)
        self.nprobe = args.nprobe
        logger.info("retriever for shard %d of %s ready", shard, args.index)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def search(self, requests: list[tuple[np.ndarray, int]]) -> list[tuple[list[str], np.ndarray]]:
        return await asyncio.to_thread(self._search, requests)

    def _search(self, requests: list[tuple[np.ndarray, int]]) -> list[tuple[list[str], np.ndarray]]:
        queries = np.stack([np.asarray(v, dtype=np.float32) for v, _ in requests])  # (n, d)
        k_max = max(k for _, k in requests)
        kwargs = {"nprobe": self.nprobe} if self.nprobe else {}
        keys, scores = self.index.search(queries, k_max, **kwargs)  # (n, k_max) each
        return [
            (list(keys[i][:k]), np.asarray(scores[i][:k], dtype=np.float32)) for i, (_, k) in enumerate(requests)
        ]


@serve.deployment
class Reranker:
    """The slow model over cached phi(x) tokens: candidates of concurrent requests are
    scored together (``@serve.batch``) by ``thinkfast.rerank.rerank_many``, the same code
    path as ``thinkfast eval``, so the service and the evaluation rank identically."""

    def __init__(self, args: ServeArgs) -> None:
        from thinkfast import SlowModel, TokenStore

        size = args.reranker
        _set_threads(size.torch_threads)
        self.model = SlowModel.from_pretrained(args.slow).eval()
        self.store = TokenStore.open(args.embeddings, s3_endpoint=args.s3_endpoint)
        per_frame = self.model.num_visual_tokens(self.model.config.image_size)  # videos: F * per_frame
        if self.store.shape[1] % per_frame:
            from thinkfast.errors import IndexMismatchError

            raise IndexMismatchError(
                f"token store {args.embeddings} holds {self.store.shape[1]} tokens per item but {args.slow} "
                f"makes {per_frame} per frame: the embeddings were made by another slow model"
            )
        self.beta = args.beta
        self.score_batch_size = size.score_batch_size
        self.rerank.set_max_batch_size(size.max_batch_size)
        self.rerank.set_batch_wait_timeout_s(size.batch_wait_timeout_s)
        logger.info("re-ranker ready: %s, tokens %s, beta %.3f", args.slow, self.store.shape, self.beta)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def rerank(self, items: list[RerankItem]) -> list[Ranked | str]:
        return await asyncio.to_thread(self._rerank, items)

    def _rerank(self, items: list[RerankItem]) -> list[Ranked | str]:
        """Ranked per item, or a client-facing reason for an item that cannot be scored
        (one bad query must not fail the other requests of its batch)."""
        from thinkfast import rerank

        out: list[Ranked | str | None] = [None] * len(items)
        good: list[int] = []
        queries = []
        for i, item in enumerate(items):
            tokens = self.model.tokenize([item.query])
            if int(tokens["attention_mask"].sum()) == 0:
                out[i] = "the query has no tokens the slow model can score"
                continue
            good.append(i)
            queries.append(tokens)
        if good:
            k_max = max(items[i].k for i in good)
            hits = rerank.rerank_many(
                self.model,
                self.store.get,
                queries,
                [items[i].candidates.keys for i in good],
                [items[i].candidates.fast_scores for i in good],
                k_max,
                beta=self.beta,
                max_pairs=self.score_batch_size,
            )
            for i, ranked in zip(good, hits):
                top = ranked[: items[i].k]  # top-k is a prefix of top-k_max (same stable order)
                out[i] = Ranked(
                    keys=[h.key for h in top],
                    score=np.array([h.score for h in top]),
                    fast_score=np.array([h.fast_score for h in top]),
                    slow_score=np.array([h.slow_score for h in top]),
                )
        return out  # type: ignore[return-value]


@serve.deployment
class Catalog:
    """Captions and media bytes by key (see ``catalog.CorpusCatalog``)."""

    def __init__(self, args: ServeArgs) -> None:
        from thinkfast_pipelines.serve.catalog import CorpusCatalog

        self.catalog = CorpusCatalog.open(args.corpus, s3_endpoint=args.s3_endpoint)

    def captions(self, keys: list[str]) -> list[str]:
        return self.catalog.captions(keys)

    def media(self, key: str) -> MediaReply:
        """The key's media, or a 404 reply for keys the corpus lacks and rows whose media
        cannot be read (the reason is told, the service stays up)."""
        from thinkfast_pipelines.serve.catalog import UnknownMediaKey
        from thinkfast.errors import DecodeError

        try:
            blob = self.catalog.media(key)
        except UnknownMediaKey:
            return MediaReply(404, detail="unknown media key")
        except DecodeError as exc:
            logger.warning("media of %r unavailable: %s", key, exc)
            return MediaReply(404, detail=f"media of this key is unavailable ({exc.reason})")
        return MediaReply(200, data=blob.data, content_type=blob.content_type)

    def size(self) -> int:
        return len(self.catalog)
