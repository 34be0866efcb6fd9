"""The Serve deployments behind the ingress: query encoder (text and image towers of the
fast model), per-shard retrievers, the batched slow re-ranker and the corpus catalog.

Only Ray wiring lives here: each deployment loads one stage of ``thinkfast.serving``
(from URIs, in ``__init__``; nothing at import) and runs it off the event loop, batched
with ``@serve.batch`` where concurrent requests can share a forward pass. Each replica
holds only its own part: retrievers hold one index shard each, so the index can exceed
one machine's memory; only the re-ranker holds the slow model and the token store, and
only it autoscales, because the slow scoring of K candidates dominates a query's cost.

A request that cannot be answered comes back as its typed ``ServingError`` *value*
(``thinkfast.serving.errors.Outcome``), which the ingress raises: in a batch, one bad
query must not fail the others, and a value pickles as itself, while an exception raised
in a replica reaches the caller wrapped in Ray's ``RayTaskError``.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from ray import serve

from thinkfast.rerank import SearchHit
from thinkfast.serving.catalog import MediaBlob
from thinkfast.serving.errors import Outcome, ServingError
from thinkfast.serving.stages import RerankItem
from thinkfast_pipelines.serve.args import ServeArgs

logger = logging.getLogger(__name__)


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


@serve.deployment
class TextEncoder:
    """The fast model's query towers: g(y) of texts and, for a query by image, f(x) of
    images, each batching its concurrent queries into one forward pass. One deployment
    for both (its name is kept from when it held the text tower only): the fast model is
    loaded once per replica, under the same thread setting."""

    def __init__(self, args: ServeArgs, torch_threads: int = 1) -> None:
        from thinkfast.serving.stages import QueryEncoder

        _set_threads(torch_threads)
        self.stage = QueryEncoder.load(args.fast, args.index, args.s3_endpoint)
        self.max_image_pixels = args.limits.max_image_pixels
        logger.info("query encoder ready: %s (identity %s)", args.fast, self.stage.identity)

    # no wait for company: a lone query would pay the whole timeout; under load the
    # queue fills while the previous batch runs, so batches still form (issue 16)
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def encode(self, queries: list[str]) -> list[Outcome[np.ndarray]]:
        """``(d,)`` per query, or ``UnscorableQuery``."""
        return await asyncio.to_thread(self.stage.encode, queries)

    # small batches: decoding dominates (~0.4 s for a 10 MP JPEG on one busy core) and is
    # sequential, so a big batch only delays its first image towards the stage timeout
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.002)
    async def encode_image(self, images: list[bytes]) -> list[Outcome[np.ndarray]]:
        """``(d,)`` per encoded image file, or ``UnreadableImage`` (answered 422)."""
        return await asyncio.to_thread(self.stage.encode_images, images, self.max_image_pixels)

    def model_identity(self) -> str:
        return self.stage.identity


@serve.deployment
class Retriever:
    """One index shard. Concurrent queries are searched as one (n, d) FAISS batch."""

    def __init__(self, args: ServeArgs, shard: int) -> None:
        from thinkfast.serving.stages import ShardSearcher

        self.shard = shard
        # only this shard is fetched / memory-mapped; the model identity is checked by TextEncoder
        self.stage = ShardSearcher.load(args.index, shard, args.nprobe, args.s3_endpoint)
        logger.info("retriever for shard %d of %s ready", shard, args.index)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)  # as TextEncoder.encode: no idle wait
    async def search(self, requests: list[tuple[np.ndarray, int]]) -> list[tuple[list[str | None], np.ndarray]]:
        """This shard's ``(keys (k,), scores (k,))`` per ``(vector, k)`` request."""
        return await asyncio.to_thread(self.stage.search, requests)


@serve.deployment
class Reranker:
    """The slow model over cached phi(x) tokens: candidates of concurrent requests are
    scored together (``@serve.batch``) by ``thinkfast.rerank.rerank_many``, the same code
    path as ``thinkfast eval``, so the service and the evaluation rank identically."""

    def __init__(self, args: ServeArgs) -> None:
        from thinkfast.serving.stages import CandidateReranker

        size = args.reranker
        _set_threads(size.torch_threads)
        self.stage = CandidateReranker.load(
            args.slow, args.embeddings, beta=args.beta, max_pairs=size.score_batch_size, s3_endpoint=args.s3_endpoint
        )
        self.rerank.set_max_batch_size(size.max_batch_size)
        self.rerank.set_batch_wait_timeout_s(size.batch_wait_timeout_s)
        logger.info("re-ranker ready: %s, tokens %s, beta %.3f", args.slow, self.stage.store.shape, args.beta)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def rerank(self, items: list[RerankItem]) -> list[Outcome[list[SearchHit]]]:
        """The best ``item.k`` hits per item, or ``UnscorableQuery``."""
        return await asyncio.to_thread(self.stage.rerank, items)


@serve.deployment
class Catalog:
    """Captions and media bytes by key (see ``thinkfast.serving.catalog.CorpusCatalog``)."""

    def __init__(self, args: ServeArgs) -> None:
        from thinkfast.serving.catalog import CorpusCatalog

        self.catalog = CorpusCatalog.open(args.corpus, s3_endpoint=args.s3_endpoint, embeddings=args.embeddings)

    def captions(self, keys: list[str]) -> list[str]:
        return self.catalog.captions(keys)

    def media(self, key: str) -> Outcome[MediaBlob]:
        """The key's media, or ``UnknownMediaKey`` / ``MediaUnavailable`` (answered 404)."""
        try:
            return self.catalog.media(key)
        except ServingError as exc:
            return exc

    def size(self) -> int:
        return len(self.catalog)
