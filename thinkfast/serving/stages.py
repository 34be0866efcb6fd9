"""The search service's stages, without Ray: what each Serve deployment computes.

* :class:`QueryEncoder`: ``g(y)`` of a batch of text queries, or ``f(x)`` of a batch of
  query images (decoded and preprocessed exactly as embed does), checked at load time
  against the fast model that embedded the index (other weights would score in another space);
* :class:`ShardSearcher`: one index shard's top-k for a batch of query vectors;
* :class:`CandidateReranker`: the slow model over cached phi(x) tokens, through
  ``thinkfast.rerank.rerank_many``, the code path of ``thinkfast eval``, so the service
  and the evaluation rank identically.

Batched methods answer one :data:`~thinkfast.serving.errors.Outcome` per item: a query
that cannot be served is reported as its typed error, and does not fail the other
requests that happen to share its batch. Models are imported when a stage is loaded,
never at import, so the ingress can import the wire types (``RerankItem``) cheaply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from thinkfast.encode import image_vectors, text_vectors
from thinkfast.errors import DecodeError, IndexMismatchError
from thinkfast.rerank import SearchHit, rerank_many
from thinkfast.serving.errors import Outcome, UnreadableImage, UnscorableQuery
from thinkfast.serving.merge import Candidates, ShardHits

if TYPE_CHECKING:
    from thinkfast.index.sharded import ShardedIndex
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast.store import TokenStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RerankItem:
    """One request's share of a re-rank batch."""

    query: str
    candidates: Candidates
    k: int  # results wanted (<= K)
    beta: float | None = None  # weight of s_fast for this query; None: the re-ranker's own (the served beta)


class QueryEncoder:
    """The fast model's two towers for queries: ``g(y)`` of texts, ``f(x)`` of images (query
    by image), one forward pass per batch. Both land in the index's space: the index holds
    ``f(x)`` of the corpus, so an image query is an image-to-image search."""

    def __init__(self, model: FastModel) -> None:
        self.model = model
        self.identity = model.identity

    @classmethod
    def load(cls, fast: str, index: str, s3_endpoint: str | None = None) -> QueryEncoder:
        """The fast model at ``fast``, refused (``IndexMismatchError``) if ``index`` records
        embeddings of another fast model."""
        from thinkfast.index.manifest import read_manifest
        from thinkfast.models.fast import FastModel

        encoder = cls(FastModel.from_pretrained(fast).eval())
        manifest = read_manifest(index, s3_endpoint)
        if manifest.model_identity is not None and manifest.model_identity != encoder.identity:
            raise IndexMismatchError(
                f"index {index} holds embeddings of fast model {manifest.model_identity}, but {fast} "
                f"is {encoder.identity}: queries would be scored in another space (re-run embed + index)"
            )
        return encoder

    def encode(self, queries: Sequence[str]) -> list[Outcome[np.ndarray]]:
        """``g(y)`` ``(d,)`` float32 per query, or :class:`UnscorableQuery` for a query with no
        tokens (its mean pooling is undefined) or a non-finite embedding."""
        queries = list(queries)
        if not queries:
            return []
        empty = (self.model.tokenize(queries)["attention_mask"].sum(dim=1) == 0).tolist()  # (B,)
        vectors = text_vectors(self.model, queries, batch_size=len(queries))  # (B, d), one pass
        return [
            UnscorableQuery("fast") if empty[i] or not np.isfinite(vectors[i]).all() else vectors[i]
            for i in range(len(queries))
        ]

    def encode_images(self, images: Sequence[bytes], max_pixels: int | None = None) -> list[Outcome[np.ndarray]]:
        """``f(x)`` ``(d,)`` float32 per encoded image file, or :class:`UnreadableImage` for one
        that cannot be decoded or has more than ``max_pixels`` pixels (checked from the
        header, before its pixels are decoded). The pixels are made as embed makes them
        (``thinkfast.data.image``: EXIF orientation, alpha on white, shorter side resized to
        the fast model's ``image_size``, centre crop, ImageNet normalisation), so an image of
        the corpus finds itself."""
        import torch

        from thinkfast.data.image import DEFAULT_MAX_PIXELS, decode_image, preprocess_image

        limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        size = int(self.model.config.image_size)
        out: list[Outcome[np.ndarray]] = []
        good: list[int] = []
        pixels = []
        for data in images:
            try:
                pixels.append(preprocess_image(decode_image(bytes(data), max_pixels=limit), size))  # (3, S, S)
            except DecodeError as exc:
                out.append(UnreadableImage(exc.reason, exc.detail))
                continue
            except Exception as exc:  # noqa: BLE001 - an upload that trips Pillow is still the upload's fault
                logger.warning("unexpected failure decoding a query image: %r", exc)
                out.append(UnreadableImage("corrupt", type(exc).__name__))
                continue
            good.append(len(out))
            out.append(None)  # type: ignore[arg-type]  # filled below
        if good:
            vectors = image_vectors(self.model, torch.stack(pixels), batch_size=len(good))  # (B, d), one pass
            for slot, vector in zip(good, vectors):
                out[slot] = UnreadableImage("corrupt", "non-finite embedding") if not np.isfinite(vector).all() else vector
        return out


class ShardSearcher:
    """One shard of a ``ShardedIndex``: concurrent queries are searched as one FAISS batch."""

    def __init__(self, index: ShardedIndex, nprobe: int | None = None) -> None:
        self.index = index
        self.nprobe = nprobe

    @classmethod
    def load(cls, index: str, shard: int, nprobe: int | None = None, s3_endpoint: str | None = None) -> ShardSearcher:
        """Only ``shard`` is fetched / memory-mapped (the index may exceed one machine)."""
        from thinkfast.index.sharded import ShardedIndex

        return cls(ShardedIndex.load(index, shards=[shard], s3_endpoint=s3_endpoint), nprobe)

    def search(self, requests: Sequence[tuple[np.ndarray, int]]) -> list[ShardHits]:
        """``(query vector (d,), k)`` per request -> this shard's ``(keys (k,), scores (k,))``
        for each; keys are None and scores -inf where the shard has fewer than k hits."""
        if not requests:
            return []
        queries = np.stack([np.asarray(v, dtype=np.float32) for v, _ in requests])  # (n, d)
        k_max = max(k for _, k in requests)
        keys, scores = self.index.search(queries, k_max, **({"nprobe": self.nprobe} if self.nprobe else {}))
        return [(list(keys[i][:k]), np.asarray(scores[i][:k], dtype=np.float32)) for i, (_, k) in enumerate(requests)]


class CandidateReranker:
    """The slow model and the token store: fast candidates of several requests are scored
    in one batched pass and ranked by ``h + beta * s_fast``."""

    def __init__(self, model: SlowModel, store: TokenStore, beta: float = 0.0, max_pairs: int | None = None) -> None:
        self.model = model
        self.store = store
        self.beta = beta
        self.max_pairs = max_pairs  # (query, candidate) pairs per forward pass; bounds memory

    @classmethod
    def load(
        cls, slow: str, embeddings: str, beta: float = 0.0, max_pairs: int | None = None, s3_endpoint: str | None = None
    ) -> CandidateReranker:
        """The slow model at ``slow`` over the token store of ``embeddings``, refused
        (``IndexMismatchError``) when the store's tokens per item are not a whole number of
        this model's tokens per frame (another slow model made them)."""
        from thinkfast.models.slow import SlowModel
        from thinkfast.store import TokenStore

        model = SlowModel.from_pretrained(slow).eval()
        store = TokenStore.open(embeddings, s3_endpoint=s3_endpoint)
        per_frame = model.num_visual_tokens(model.config.image_size)  # videos: F * per_frame
        if store.shape[1] % per_frame:
            raise IndexMismatchError(
                f"token store {embeddings} holds {store.shape[1]} tokens per item but {slow} "
                f"makes {per_frame} per frame: the embeddings were made by another slow model"
            )
        return cls(model, store, beta, max_pairs)

    def rerank(self, items: Sequence[RerankItem]) -> list[Outcome[list[SearchHit]]]:
        """The best ``item.k`` of each item's candidates, or :class:`UnscorableQuery` for a
        query the slow tokenizer leaves empty."""
        out: list[Outcome[list[SearchHit]] | None] = [None] * len(items)
        good: list[int] = []
        queries = []
        for i, item in enumerate(items):
            tokens = self.model.tokenize([item.query])
            if int(tokens["attention_mask"].sum()) == 0:
                out[i] = UnscorableQuery("slow")
                continue
            good.append(i)
            queries.append(tokens)
        # one batched slow pass per beta: queries almost always use the served one, so
        # per-query beta (the request's "beta") costs a second pass only when it is used
        groups: dict[float, list[int]] = {}
        for slot, i in enumerate(good):
            beta = self.beta if items[i].beta is None else float(items[i].beta)
            groups.setdefault(beta, []).append(slot)
        for beta, slots in groups.items():
            members = [good[s] for s in slots]
            k_max = max(items[i].k for i in members)
            hits = rerank_many(
                self.model,
                self.store.get,
                [queries[s] for s in slots],
                [items[i].candidates.keys for i in members],
                [items[i].candidates.fast_scores for i in members],
                k_max,
                beta=beta,
                max_pairs=self.max_pairs,
            )
            for i, ranked in zip(members, hits):
                out[i] = ranked[: items[i].k]  # top-k is a prefix of top-k_max (same stable order)
        return out  # type: ignore[return-value]  # every slot is filled


__all__ = ["CandidateReranker", "QueryEncoder", "RerankItem", "ShardSearcher"]
