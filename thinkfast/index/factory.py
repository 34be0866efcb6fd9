"""FAISS index choice, training and tuning, independent of where vectors come from.

:func:`choose_factory` picks the ``index_factory`` string as autofaiss does; :func:`train_index`
trains the quantizers once on a sample (the empty trained index that every shard, and every
later ``add``, clones); :func:`tune_search_defaults` finds the nprobe / efSearch that reach the
target recall on held-out sample vectors.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import faiss
import numpy as np

from thinkfast.errors import IndexMismatchError, ThinkfastError
from thinkfast.index.params import SearchSettings, has_hnsw_quantizer, index_kind, ivf_nlist, search_with

logger = logging.getLogger(__name__)

EXACT_BELOW = 100_000  # below this many vectors the default is exact search (autofaiss: flat is fast enough)
MAX_FLAT_CODE_BYTES = 8 << 30  # above this much raw float32, the default compresses with PQ
TUNE_TARGET_RECALL = 0.95  # build-time tuning aims nprobe / efSearch at this recall@10
TUNE_SAMPLE = 20_000  # vectors the tuning indexes and queries (independent of the training sample)




def default_nlist(n: int) -> int:
    """IVF lists: the power of two nearest ``4 * sqrt(n)`` (autofaiss's rule), at most n / 39
    so that k-means has the 39 points per centroid FAISS asks for."""
    target = 4.0 * math.sqrt(max(n, 1))
    nlist = 2 ** round(math.log2(target))
    return int(max(1, min(nlist, n // 39 if n >= 39 else 1)))


def pq_subquantizers(dim: int) -> int:
    """Largest ``m`` dividing ``dim`` with ``dim / m >= 4`` and ``m <= 64`` (4..64 bytes a vector)."""
    for m in range(min(64, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


def choose_factory(n: int, dim: int, exact_below: int = EXACT_BELOW, max_flat_bytes: int = MAX_FLAT_CODE_BYTES) -> str:
    """A ``faiss.index_factory`` string for ``n`` vectors of width ``dim``, as autofaiss picks:
    exact (``Flat``) for small corpora, IVF with an HNSW coarse quantizer above, and
    product-quantised lists once raw float32 vectors would exceed ``max_flat_bytes``."""
    if n < exact_below:
        return "Flat"
    nlist = default_nlist(n)
    if n * dim * 4 <= max_flat_bytes:
        return f"IVF{nlist}_HNSW32,Flat"
    return f"IVF{nlist},PQ{pq_subquantizers(dim)}x8"


def new_index(factory: str, dim: int) -> faiss.Index:
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ThinkfastError(f"invalid FAISS factory string {factory!r} for dim {dim}: {exc}") from exc


# --------------------------------------------------------------------------- vectors


def prepare_vectors(vectors: np.ndarray, dim: int, normalize: bool = True) -> np.ndarray:
    """float32 C-contiguous (N, dim), L2-normalised; rejects wrong dims, NaN and zero vectors."""
    x = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if x.ndim != 2 or x.shape[1] != dim:
        raise IndexMismatchError(f"vectors have shape {x.shape}, the index expects (N, {dim})")
    if not np.isfinite(x).all():
        raise ThinkfastError("vectors contain NaN or inf")
    if normalize:
        norms = np.linalg.norm(x, axis=1)
        if (norms == 0).any():
            raise ThinkfastError(f"{int((norms == 0).sum())} zero vector(s) cannot be normalised")
        faiss.normalize_L2(x)
    return x


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


# --------------------------------------------------------------------------- training and tuning


def faiss_gpus(faiss_module: Any = None) -> int:
    """GPUs this faiss build can use (0 for the CPU-only wheel, which has ``get_num_gpus``
    returning 0 or lacks it)."""
    module = faiss_module or faiss
    get = getattr(module, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def require_faiss_gpus(faiss_module: Any = None) -> int:
    """The GPU count, or the one-line error for ``index --gpu`` without a GPU faiss build."""
    count = faiss_gpus(faiss_module)
    if count <= 0:
        raise ThinkfastError(
            "index --gpu needs a GPU build of faiss (faiss.get_num_gpus() is 0: the faiss-cpu wheel, or no CUDA "
            "device); install faiss-gpu on a GPU machine or drop --gpu")
    return count


def gpu_clustering(ivf: Any, dim: int, faiss_module: Any = None) -> None:
    """Run ``ivf``'s k-means assignment on every GPU (``index_cpu_to_all_gpus`` of a flat
    index of the same metric), the costly part of training. The trained index itself
    stays a CPU index: shards are added, saved and served exactly as without ``--gpu``."""
    module = faiss_module or faiss
    flat = module.IndexFlatIP(dim) if ivf.metric_type == module.METRIC_INNER_PRODUCT else module.IndexFlatL2(dim)
    ivf.clustering_index = module.index_cpu_to_all_gpus(flat)


def train_index(factory: str, dim: int, sample: np.ndarray, seed: int = 0, gpu: bool = False) -> faiss.Index:
    """An empty index with trained quantizers (``sample`` already prepared). ``gpu``: the
    IVF k-means on all GPUs (needs a GPU faiss build; an index without IVF ignores it)."""
    index = new_index(factory, dim)
    if gpu:
        require_faiss_gpus()
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and len(sample) < ivf.nlist:
            raise ThinkfastError(f"{factory} needs at least {ivf.nlist} training vectors, got {len(sample)}")
        if ivf is not None:
            ivf.cp.seed = seed
            if gpu:
                gpu_clustering(ivf, dim)
        inner = faiss.downcast_index(ivf if ivf is not None else index)
        if hasattr(inner, "do_polysemous_training"):
            # polysemous codes only pay off with Hamming filtering, which we never use, and
            # the annealing costs minutes on a small machine
            inner.do_polysemous_training = False
        logger.info("training %s on %d vectors", factory, len(sample))
        index.train(sample)
    return index


def tune_search_defaults(
    trained: faiss.Index, sample: np.ndarray, target: float = TUNE_TARGET_RECALL, k: int = 10, seed: int = 0
) -> dict[str, Any]:
    """Smallest nprobe / efSearch reaching ``target`` recall@k on held-out sample vectors.

    A stand-in for autofaiss's tuning: index most of the sample, query with the rest,
    compare with exact search. Recall depends on the fraction of lists probed more than
    on corpus size, so the setting carries over to the full index. Lossy codes (PQ) may
    never reach the target; then the best setting is kept and exact re-scoring is on."""
    kind = index_kind(trained)
    if isinstance(faiss.downcast_index(trained), faiss.IndexFlat):
        return {}  # exact: nothing to tune
    rng = np.random.default_rng(seed)
    n = len(sample)
    n_queries = min(200, max(1, n // 20))
    order = rng.permutation(n)
    base_n = min(n - n_queries, 50_000)
    queries, base = sample[order[:n_queries]], sample[order[n_queries : n_queries + base_n]]
    if base_n < k or n_queries < 1:
        return {}
    index = faiss.clone_index(trained)
    index.add(base)
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    _, truth = exact.search(queries, k)

    def recall(settings: SearchSettings) -> float:
        _, found = search_with(index, queries, k, settings)
        return float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(found, truth)]) / k)

    best: dict[str, Any] = {}
    if kind == "ivf":
        nlist = ivf_nlist(trained)
        nprobe, score = 1, 0.0
        while True:
            previous, score = score, recall(SearchSettings(nprobe=nprobe))
            # stop at the target, at exhaustive search, or when lossy codes plateau
            if score >= target or nprobe >= nlist or (nprobe >= 16 and score - previous < 0.005):
                break
            nprobe *= 2
        best["nprobe"] = int(min(nprobe, nlist))
        if has_hnsw_quantizer(trained):
            best["efSearch"] = int(max(64, 2 * best["nprobe"]))
    elif kind == "hnsw":
        ef, score = 16, 0.0
        while True:
            score = recall(SearchSettings(efSearch=ef))
            if score >= target or ef >= 1024:
                break
            ef *= 2
        # graph search gets harder as the graph grows: the full index needs more than the
        # sample did (measured: ef 16 gave 0.969 on 20k, 0.93 on 100k), so keep one doubling spare
        best["efSearch"] = ef * 2
    else:
        score = recall(SearchSettings())
    best["tuned_recall"] = round(score, 4)
    if score < target:
        best["rescore"] = True
        logger.warning("tuning reached recall@%d %.3f < %.2f; exact re-scoring is on by default", k, score, target)
    logger.info("tuned search defaults: %s", best)
    return best


def default_train_size(factory: str, dim: int, n: int) -> int:
    """Training vectors: 64 per IVF list (FAISS wants 39..256), at least 10k for PQ codebooks."""
    ivf = faiss.try_extract_index_ivf(new_index(factory, dim))
    size = 64 * ivf.nlist if ivf is not None else 0
    if "PQ" in factory or "SQ" in factory:
        size = max(size, 10_000)
    return int(min(n, max(size, 1)))
