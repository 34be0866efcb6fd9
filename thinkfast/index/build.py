"""Building index shards without Ray: factory choice, training, tuning, shard files.

The build is split so that any executor can run it (threads here, Ray tasks in
``pipelines/index.py``):

1. :func:`plan_build` sizes the corpus from Parquet metadata and cuts it into row ranges;
2. :func:`train_on_sample` trains the quantizers once and stores the empty trained index
   (``trained.faiss``), which every shard -- and every later ``add`` -- clones;
3. :func:`build_shard` (one per range, in parallel) reads its rows, adds them to a clone
   and writes ``shard-XXXXX.faiss`` + key table (+ raw vectors for exact re-scoring);
4. :func:`finalize_build` checks keys are unique across shards and writes the manifest.
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from thinkfast.errors import IndexMismatchError, ThinkfastError
from thinkfast.index.manifest import METRIC_IP, TRAINED_NAME, IndexManifest, ShardRecord, write_manifest
from thinkfast.index.params import SearchSettings, has_hnsw_quantizer, index_kind, ivf_nlist, search_with
from thinkfast.store import (
    StoreError,
    check_embedding_schema,
    embedding_matrix,
    list_parquet_files,
    resolve_artifact_dir,
)
from thinkfast.utils import fs

logger = logging.getLogger(__name__)

EXACT_BELOW = 100_000  # below this many vectors the default is exact search (autofaiss: flat is fast enough)
MAX_FLAT_CODE_BYTES = 8 << 30  # above this much raw float32, the default compresses with PQ
TUNE_TARGET_RECALL = 0.95  # build-time tuning aims nprobe / efSearch at this recall@10
TUNE_SAMPLE = 20_000  # vectors the tuning indexes and queries (independent of the training sample)


# --------------------------------------------------------------------------- factory choice


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


def train_index(factory: str, dim: int, sample: np.ndarray, seed: int = 0) -> faiss.Index:
    """An empty index with trained quantizers (``sample`` already prepared)."""
    index = new_index(factory, dim)
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and len(sample) < ivf.nlist:
            raise ThinkfastError(f"{factory} needs at least {ivf.nlist} training vectors, got {len(sample)}")
        if ivf is not None:
            ivf.cp.seed = seed
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


# --------------------------------------------------------------------------- shard files


def put_file(uri: str, data: bytes, s3_endpoint: str | None) -> None:
    """Whole-file write: temp + rename locally, one PUT on S3 (never a half-written shard)."""
    if fs.is_s3(uri):
        fs.write_bytes(uri, data, s3_endpoint)
        return
    path = fs.strip_scheme(uri)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def keys_table_bytes(keys: Sequence[str], removed: np.ndarray) -> bytes:
    """Parquet bytes of a shard's key table: row i is FAISS id i."""
    table = pa.table({"key": pa.array(list(keys), pa.string()), "removed": pa.array(removed, pa.bool_())})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _stage_file(out_uri: str, name: str, write: Callable[[str], None], s3_endpoint: str | None) -> int:
    """Write a (possibly large) file through a local temp path, never as bytes in memory:
    renamed into place locally, uploaded in one piece to S3. Returns its size."""
    target = fs.join(out_uri, name)
    if fs.is_s3(out_uri):
        with tempfile.TemporaryDirectory(prefix="thinkfast-shard-") as tmp_dir:
            tmp = os.path.join(tmp_dir, name)
            write(tmp)
            size = os.path.getsize(tmp)
            fs.fsspec_fs(out_uri, s3_endpoint).put_file(tmp, fs.strip_scheme(target))
        return size
    path = fs.strip_scheme(target)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        write(tmp)
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return size


def write_shard(
    out_uri: str,
    name: str,
    trained: faiss.Index,
    keys: Sequence[str],
    vectors: np.ndarray,
    store_vectors: bool = True,
    s3_endpoint: str | None = None,
) -> ShardRecord:
    """Add prepared ``vectors`` to a clone of ``trained`` and write the shard's files.

    Files go to disk straight from FAISS / numpy: a 1M x 256 shard serialised to bytes
    first measured 5 GB peak for a 1 GB index."""
    if len(keys) != len(vectors):
        raise ThinkfastError(f"{len(keys)} keys but {len(vectors)} vectors")
    if len(set(keys)) != len(keys):
        raise ThinkfastError(f"shard {name}: duplicate keys")
    index = faiss.clone_index(trained)
    index.add(vectors)
    vectors_bytes = 0
    if store_vectors:
        data = np.ascontiguousarray(vectors, dtype=np.float32)
        vectors_bytes = _stage_file(out_uri, name + ".vectors.f32", data.tofile, s3_endpoint)
    index_bytes = _stage_file(out_uri, name + ".faiss", lambda path: faiss.write_index(index, path), s3_endpoint)
    record = ShardRecord(
        name=name, total=len(keys), removed=0, index_bytes=index_bytes, vectors_bytes=vectors_bytes
    )
    put_file(fs.join(out_uri, record.keys_file), keys_table_bytes(keys, np.zeros(len(keys), bool)), s3_endpoint)
    logger.info("shard %s: %d vectors, %.1f MB index", name, len(keys), index_bytes / 1e6)
    return record


def save_trained(out_uri: str, trained: faiss.Index, s3_endpoint: str | None = None) -> None:
    put_file(fs.join(out_uri, TRAINED_NAME), serialize(trained), s3_endpoint)


def load_trained(out_uri: str, s3_endpoint: str | None = None) -> faiss.Index:
    try:
        return deserialize(fs.read_bytes(fs.join(out_uri, TRAINED_NAME), s3_endpoint))
    except (FileNotFoundError, RuntimeError) as exc:
        raise IndexMismatchError(f"{out_uri}: {TRAINED_NAME} is missing or damaged ({exc})") from exc


# --------------------------------------------------------------------------- builds from Parquet


@dataclass(frozen=True)
class BuildPlan:
    """What each shard task needs: picklable, small, the same on every worker."""

    out_uri: str  # index directory (local path or s3://)
    files: tuple[tuple[str, int], ...]  # (Parquet URI, row count) in read order
    dim: int  # embedding dimension
    factory: str  # index_factory string
    ranges: tuple[tuple[int, int], ...]  # [start, end) global rows per shard
    store_vectors: bool  # keep raw float32 vectors for exact re-scoring
    s3_endpoint: str | None  # explicit endpoint, else AWS env vars

    @property
    def count(self) -> int:
        return sum(rows for _, rows in self.files)


def shard_ranges(n: int, shards: int) -> tuple[tuple[int, int], ...]:
    """``shards`` contiguous, near-equal row ranges covering ``[0, n)``."""
    if shards < 1:
        raise ThinkfastError(f"--shards must be >= 1, got {shards}")
    shards = min(shards, max(n, 1))
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    return tuple((int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]))


def plan_build(
    embeddings_uri: str,
    out_uri: str,
    shards: int = 1,
    factory: str | None = None,
    store_vectors: bool = True,
    exact_below: int = EXACT_BELOW,
    s3_endpoint: str | None = None,
) -> BuildPlan:
    """Size the corpus from Parquet footers (no data read) and cut it into shard ranges."""
    files: list[tuple[str, int]] = []
    dim: int | None = None
    for file_uri in list_parquet_files(resolve_artifact_dir(embeddings_uri, "fast", s3_endpoint), s3_endpoint):
        filesystem, path = fs.arrow_fs(file_uri, s3_endpoint)
        try:
            meta = pq.ParquetFile(path, filesystem=filesystem)
        except (pa.ArrowInvalid, OSError) as exc:
            raise StoreError(f"{file_uri}: not a readable Parquet file ({exc})") from exc
        check_embedding_schema(meta.schema_arrow, file_uri)
        rows = meta.metadata.num_rows
        if rows == 0:
            continue
        if dim is None:
            first = next(meta.iter_batches(batch_size=1, columns=["embedding"]))
            dim = int(embedding_matrix(first.column("embedding"), file_uri).shape[1])
        files.append((file_uri, rows))
    if dim is None:
        raise StoreError(f"{embeddings_uri}: no embeddings")
    n = sum(r for _, r in files)
    chosen = factory or choose_factory(n, dim, exact_below=exact_below)
    new_index(chosen, dim)  # fail now, not in a worker, on a bad factory string
    return BuildPlan(
        out_uri=str(out_uri),
        files=tuple(files),
        dim=dim,
        factory=chosen,
        ranges=shard_ranges(n, shards),
        store_vectors=store_vectors,
        s3_endpoint=s3_endpoint,
    )


def _file_batches(
    file_uri: str, dim: int, s3_endpoint: str | None, batch_size: int = 65536
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(keys, vectors) batches of one embeddings file, validated."""
    filesystem, path = fs.arrow_fs(file_uri, s3_endpoint)
    for batch in pq.ParquetFile(path, filesystem=filesystem).iter_batches(
        batch_size=batch_size, columns=["key", "embedding"]
    ):
        if batch.column("key").null_count:
            raise StoreError(f"{file_uri}: null key(s)")
        matrix = embedding_matrix(batch.column("embedding"), file_uri)
        if matrix.shape[1] != dim:
            raise StoreError(f"{file_uri}: embedding dim {matrix.shape[1]}, expected {dim}")
        yield batch.column("key").to_pylist(), matrix


def read_rows(plan: BuildPlan, start: int, end: int) -> tuple[list[str], np.ndarray]:
    """Keys and raw vectors of global rows ``[start, end)``, reading only the files they span."""
    keys: list[str] = []
    parts: list[np.ndarray] = []
    offset = 0
    for file_uri, rows in plan.files:
        if offset < end and start < offset + rows:
            pos = offset
            for batch_keys, matrix in _file_batches(file_uri, plan.dim, plan.s3_endpoint):
                lo, hi = max(start, pos) - pos, min(end, pos + len(batch_keys)) - pos
                if lo < hi:
                    keys.extend(batch_keys[lo:hi])
                    parts.append(matrix[lo:hi])
                pos += len(batch_keys)
                if pos >= end:
                    break
        offset += rows
    vectors = np.concatenate(parts) if parts else np.zeros((0, plan.dim), np.float32)
    return keys, vectors


def sample_rows(plan: BuildPlan, size: int, seed: int = 0) -> np.ndarray:
    """A uniform random sample of ``size`` raw vectors (all of them when the corpus is smaller);
    streams the files, so the driver holds one batch plus the sample."""
    n = plan.count
    if size >= n:
        return read_rows(plan, 0, n)[1]
    wanted = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    out: list[np.ndarray] = []
    pos = 0
    for file_uri, rows in plan.files:
        if not ((wanted >= pos) & (wanted < pos + rows)).any():
            pos += rows
            continue
        for batch_keys, matrix in _file_batches(file_uri, plan.dim, plan.s3_endpoint):
            inside = wanted[(wanted >= pos) & (wanted < pos + len(batch_keys))] - pos
            out.append(matrix[inside])
            pos += len(batch_keys)
    return np.concatenate(out)


def default_train_size(factory: str, dim: int, n: int) -> int:
    """Training vectors: 64 per IVF list (FAISS wants 39..256), at least 10k for PQ codebooks."""
    ivf = faiss.try_extract_index_ivf(new_index(factory, dim))
    size = 64 * ivf.nlist if ivf is not None else 0
    if "PQ" in factory or "SQ" in factory:
        size = max(size, 10_000)
    return int(min(n, max(size, 1)))


def train_on_sample(plan: BuildPlan, train_sample: int | None = None, seed: int = 0) -> tuple[faiss.Index, dict, int]:
    """Train once on a sample; save ``trained.faiss``; return it, tuned defaults, sample size."""
    size = min(plan.count, train_sample or default_train_size(plan.factory, plan.dim, plan.count))
    sample = prepare_vectors(sample_rows(plan, max(size, min(plan.count, TUNE_SAMPLE)), seed), plan.dim)
    order = np.random.default_rng(seed).permutation(len(sample))  # sample_rows keeps file order
    trained = train_index(plan.factory, plan.dim, sample[np.sort(order[:size])], seed)
    save_trained(plan.out_uri, trained, plan.s3_endpoint)
    return trained, tune_search_defaults(trained, sample, seed=seed), size


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def build_shard(plan: BuildPlan, i: int, trained: faiss.Index | bytes) -> ShardRecord:
    """Shard ``i`` of ``plan``: read its rows, add them, write its files (a Ray task body)."""
    if isinstance(trained, (bytes, bytearray)):
        trained = deserialize(bytes(trained))
    start, end = plan.ranges[i]
    keys, vectors = read_rows(plan, start, end)
    if len(keys) != end - start:
        raise StoreError(f"shard {i}: read {len(keys)} rows, expected {end - start}; the Parquet files changed")
    return write_shard(
        plan.out_uri, shard_name(i), trained, keys, prepare_vectors(vectors, plan.dim), plan.store_vectors,
        plan.s3_endpoint,
    )


def finalize_build(
    plan_out_uri: str,
    dim: int,
    factory: str,
    records: Sequence[ShardRecord],
    search_defaults: dict[str, Any],
    train_count: int,
    model_identity: str | None,
    timings: dict[str, float] | None = None,
    s3_endpoint: str | None = None,
) -> IndexManifest:
    """Check keys are unique over all shards, then write the manifest (the commit point)."""
    seen: set[str] = set()
    duplicates: list[str] = []
    for record in records:
        raw = fs.read_bytes(fs.join(plan_out_uri, record.keys_file), s3_endpoint)
        for key in pq.read_table(io.BytesIO(raw), columns=["key"]).column("key").to_pylist():
            if key in seen:
                duplicates.append(key)
            seen.add(key)
    if duplicates:
        raise ThinkfastError(
            f"{len(duplicates)} duplicate key(s) in the embeddings (e.g. {duplicates[:3]}); "
            "each key must appear once"
        )
    manifest = IndexManifest(
        dim=dim,
        factory=factory,
        metric=METRIC_IP,
        normalize=True,
        model_identity=model_identity,
        shards=tuple(records),
        search_defaults=dict(search_defaults),
        train_count=train_count,
        timings=dict(timings or {}),
        build_id=uuid.uuid4().hex,
    )
    write_manifest(plan_out_uri, manifest, s3_endpoint)
    logger.info("index %s: %d vectors in %d shard(s), factory %s", plan_out_uri, manifest.count, len(records), factory)
    return manifest
