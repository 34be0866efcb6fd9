"""Quantizer drift: when appended vectors no longer fit the IVF centroids trained on the first build.

``--append`` never retrains: new vectors go into the inverted lists of the coarse
quantizer (k-means centroids) fitted to the first build's training sample. If the corpus
keeps its distribution, that is as good as a rebuild; if it moves (a new domain of
images, a new fast model fine-tune is *not* this case: that changes the model identity
and is refused), new vectors land far from every centroid and crowd into a few lists, so
recall at the tuned ``nprobe`` drops and search slows. Two measurable signals:

* **residual ratio**: the mean squared distance of appended vectors to their nearest
  centroid (the k-means objective, on L2-normalised vectors) divided by the same mean
  over the training sample at build time. About 1.0 while new data looks like old data.
* **imbalance ratio**: FAISS's list imbalance factor ``nlist * sum(n_i^2) / N^2`` (1.0 =
  perfectly even lists) of the live index, over the training sample's at build time.
  Crowded lists make every probe of them slower.

A rebuild is due when the residual ratio exceeds :data:`MAX_RESIDUAL_RATIO` (measured on
at least :data:`MIN_APPENDED` appended vectors) or the imbalance ratio exceeds
:data:`MAX_IMBALANCE_RATIO`. Both thresholds come from ``tests/test_incremental.py``'s
shifted-distribution test and ``benchmarks/incremental_index.py``: same-distribution
appends stay within 0.9..1.1 of either, a shifted batch of new clusters reaches > 2.
The running sums live in the index manifest's ``quantizer`` record, updated by every
``add``; :func:`drift_report` reads them plus the live list sizes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import faiss
import numpy as np

logger = logging.getLogger(__name__)

MAX_RESIDUAL_RATIO = 1.5  # appended vectors' mean residual / the training sample's
MAX_IMBALANCE_RATIO = 2.0  # live list imbalance / the training sample's
MIN_APPENDED = 100  # below this many appended vectors the residual mean is too noisy to act on


def _centroids(ivf: faiss.IndexIVF) -> np.ndarray:
    """The coarse centroids (nlist, d) float32."""
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def assign(trained: faiss.Index, x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Nearest centroid of each prepared vector and its squared distance; None for an
    index without a coarse quantizer (Flat, HNSW, PQ: nothing can drift)."""
    ivf = faiss.try_extract_index_ivf(trained)
    if ivf is None or len(x) == 0:
        return None
    pre = faiss.downcast_index(trained)
    if isinstance(pre, faiss.IndexPreTransform):  # the IVF sees transformed vectors (OPQ, PCA)
        for i in range(pre.chain.size()):
            x = faiss.downcast_VectorTransform(pre.chain.at(i)).apply(np.ascontiguousarray(x, dtype=np.float32))
    x = np.ascontiguousarray(x, dtype=np.float32)
    centroids = _centroids(ivf)
    _, lists = ivf.quantizer.search(x, 1)
    lists = lists[:, 0]
    residual = ((x - centroids[lists]) ** 2).sum(axis=1)
    return lists, residual


def imbalance_factor(sizes: np.ndarray) -> float:
    """FAISS's definition: ``nlist * sum(n_i^2) / N^2``; 1.0 for equal lists."""
    sizes = np.asarray(sizes, dtype=np.float64)
    total = sizes.sum()
    return float(len(sizes) * (sizes**2).sum() / total**2) if total > 0 else 1.0


def training_stats(trained: faiss.Index, sample: np.ndarray) -> dict[str, Any]:
    """The manifest's ``quantizer`` record at build time ({} for an index without one)."""
    got = assign(trained, sample)
    if got is None:
        return {}
    lists, residual = got
    nlist = faiss.try_extract_index_ivf(trained).nlist
    return {
        "nlist": int(nlist),
        "train_residual": float(residual.mean()),
        "train_imbalance": imbalance_factor(np.bincount(lists, minlength=nlist)),
        "appended": 0,
        "appended_residual_sum": 0.0,
    }


def after_append(stats: dict[str, Any], trained: faiss.Index, x: np.ndarray) -> dict[str, Any]:
    """``stats`` with the appended vectors ``x`` (prepared) added to the running sums."""
    if not stats:
        return stats
    got = assign(trained, x)
    if got is None:
        return stats
    _, residual = got
    return {**stats, "appended": int(stats.get("appended", 0)) + len(x),
            "appended_residual_sum": float(stats.get("appended_residual_sum", 0.0)) + float(residual.sum())}


def list_sizes(indexes: Iterable[faiss.Index], nlist: int) -> np.ndarray:
    """Vectors per inverted list summed over shards (tombstoned ones included: they cost probes)."""
    sizes = np.zeros(nlist, dtype=np.int64)
    for index in indexes:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is None:
            continue
        invlists = ivf.invlists
        sizes += np.fromiter((invlists.list_size(i) for i in range(nlist)), dtype=np.int64, count=nlist)
    return sizes


@dataclass(frozen=True)
class DriftReport:
    """Whether the index's quantizer still fits its vectors (see the module docstring)."""

    applicable: bool  # False: no coarse quantizer (exact or graph index): nothing can drift
    appended: int = 0  # vectors added after the build
    residual_ratio: float | None = None  # appended mean residual / training mean (None: nothing appended)
    imbalance: float | None = None  # live list imbalance factor
    imbalance_ratio: float | None = None  # over the training sample's
    rebuild_due: bool = False
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}

    def describe(self) -> str:
        if not self.applicable:
            return "no coarse quantizer (exact or graph index): appends never drift"
        parts = [f"{self.appended} appended"]
        if self.residual_ratio is not None:
            parts.append(f"residual x{self.residual_ratio:.2f} of training (limit {MAX_RESIDUAL_RATIO})")
        if self.imbalance_ratio is not None:
            parts.append(f"list imbalance x{self.imbalance_ratio:.2f} (limit {MAX_IMBALANCE_RATIO})")
        verdict = f"rebuild due: {self.reason}" if self.rebuild_due else "no rebuild needed"
        return f"quantizer drift: {', '.join(parts)}; {verdict}"


def drift_report(stats: dict[str, Any], indexes: Iterable[faiss.Index]) -> DriftReport:
    """The verdict from the manifest's ``quantizer`` record and the loaded shards."""
    if not stats or not stats.get("nlist"):
        return DriftReport(applicable=False)
    appended = int(stats.get("appended", 0))
    train_residual = float(stats["train_residual"]) or 1e-12
    ratio = (float(stats["appended_residual_sum"]) / appended) / train_residual if appended else None
    imbalance = imbalance_factor(list_sizes(indexes, int(stats["nlist"])))
    imbalance_ratio = imbalance / (float(stats.get("train_imbalance") or 1.0))
    reasons = []
    if ratio is not None and appended >= MIN_APPENDED and ratio > MAX_RESIDUAL_RATIO:
        reasons.append(f"appended vectors lie x{ratio:.2f} farther from their centroids than the training sample")
    if imbalance_ratio > MAX_IMBALANCE_RATIO:
        reasons.append(f"inverted lists are x{imbalance_ratio:.2f} more unequal than at training")
    return DriftReport(applicable=True, appended=appended, residual_ratio=ratio, imbalance=imbalance,
                       imbalance_ratio=imbalance_ratio, rebuild_due=bool(reasons), reason="; ".join(reasons))
