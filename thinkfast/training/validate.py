"""Per-epoch validation R@K (rank 0 of Ray Train, or the in-process trainer), so every
epoch's record says whether training helps.

* fast (and distill): exact retrieval over the val images with the model's embeddings
  (``thinkfast.encode``, the path indexing and evaluation use); every caption of every val
  image is a query, its image the answer.
* slow: exhaustive re-ranking of a small pool (``val_pool`` images, one caption each) by
  ``h(x, y)``: the slow model's own ranking, without any fast model in the way.

The val split is small: it is read once, from any stream of decoded batches (a Ray
dataset shard, or :func:`thinkfast.training.data.read_split`), and kept.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np
import torch

if TYPE_CHECKING:
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel

logger = logging.getLogger(__name__)

EMBED_BATCH = 128  # images / captions embedded per forward pass during validation


@dataclass
class ValidationSet:
    """Cached val pixels and their caption queries."""

    kind: str  # slow | fast | distill
    pixels: torch.Tensor  # (N, 3, S, S) or (N, F, 3, S, S)
    queries: list[str]  # captions used as queries
    answers: np.ndarray  # (Q,) index into pixels of each query's image

    @classmethod
    def from_batches(cls, kind: str, batches: Iterable[Mapping[str, np.ndarray]], limit: int) -> "ValidationSet | None":
        """The first ``limit`` usable val images of decoded ``batches`` (rejects skipped);
        None when fewer than 2 remain (no ranking to measure)."""
        pixels: list[np.ndarray] = []
        queries: list[str] = []
        answers: list[int] = []
        for batch in batches:
            for caps_json, array, reject in zip(batch["captions"], batch["pixels"], batch["reject"]):
                if reject or len(pixels) >= limit:
                    continue
                caps = json.loads(str(caps_json))
                for caption in caps[:1] if kind == "slow" else caps:
                    queries.append(caption)
                    answers.append(len(pixels))
                pixels.append(np.asarray(array, dtype=np.float32))
        if len(pixels) < 2:
            logger.warning("validation skipped: %d usable val images", len(pixels))
            return None
        logger.info("validation set: %d images, %d queries (%s)", len(pixels), len(queries), kind)
        return cls(kind=kind, pixels=torch.as_tensor(np.stack(pixels)), queries=queries,
                   answers=np.asarray(answers, dtype=np.int64))

    def fast_ranks(self, model: "FastModel", device: torch.device) -> tuple[np.ndarray, float]:
        """Exact retrieval over every val image with the dual encoder's embeddings."""
        from thinkfast.encode import batches, image_vectors, text_vectors
        from thinkfast.metrics import ranks_from_scores

        images = np.concatenate([image_vectors(model, self.pixels[s].to(device), EMBED_BATCH)
                                 for s in batches(len(self.pixels), EMBED_BATCH)])  # (N, d)
        texts = text_vectors(model, self.queries, batch_size=EMBED_BATCH, device=device)  # (Q, d)
        scores = texts @ images.T  # (Q, N)
        return ranks_from_scores(scores, self.answers), float(scores.astype(np.float64).sum())

    @torch.no_grad()
    def slow_ranks(self, model: "SlowModel", device: torch.device) -> tuple[np.ndarray, float]:
        """Every query re-ranks the whole pool with ``thinkfast.rerank`` (beta = 0: h alone),
        the same code path eval and serve use, fed from tokens computed here."""
        from thinkfast.metrics import ranks_from_rankings
        from thinkfast.rerank import rerank_many

        tokens = torch.cat([model.encode_visual(self.pixels[i:i + EMBED_BATCH].to(device)).cpu()
                            for i in range(0, len(self.pixels), EMBED_BATCH)])  # (N, T, D)
        pool = [str(i) for i in range(len(self.pixels))]

        def get_tokens(keys: list[str]) -> np.ndarray:
            return tokens[[int(k) for k in keys]].numpy()

        queries = [model.tokenize([q]) for q in self.queries]
        zeros = [0.0] * len(pool)
        hits = rerank_many(model, get_tokens, queries, [pool] * len(queries), [zeros] * len(queries), k=len(pool))
        ranks = ranks_from_rankings([[h.key for h in row] for row in hits], [str(a) for a in self.answers])
        return ranks, float(sum(h.slow_score for row in hits for h in row))

    def evaluate(self, model: "FastModel | SlowModel", device: torch.device) -> dict[str, float]:
        """``val_r1``, ``val_r5``, ``val_r10``, ``val_median_rank`` (thinkfast.metrics), and
        ``val_score_sum``: the sum of every query-image score, a fingerprint that a reloaded
        checkpoint must reproduce (order-independent, so any row order gives it)."""
        from thinkfast.metrics import retrieval_metrics

        was_training = model.training
        model.eval()
        try:
            ranks, score_sum = self.slow_ranks(model, device) if self.kind == "slow" else self.fast_ranks(model, device)
        finally:
            model.train(was_training)
        metrics = retrieval_metrics(ranks)
        out = {f"val_r{k[2:]}": float(v) for k, v in metrics.items() if k.startswith("R@")}
        out["val_median_rank"] = float(metrics["median_rank"])
        out["val_score_sum"] = score_sum
        out["val_queries"] = len(self.queries)
        out["val_images"] = len(self.pixels)
        return out
