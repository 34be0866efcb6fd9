"""Building an index from fast-embedding Parquet without Ray: the plan, the training
sample, one shard per row range, the commit.

The build is split so that any executor can run the shards (threads here, Ray tasks in
``pipelines/index.py``):

1. :func:`plan_build` sizes the corpus from Parquet metadata and cuts it into row ranges;
2. :func:`train_on_sample` trains the quantizers once and stores the empty trained index
   (``trained.faiss``), which every shard -- and every later ``add`` -- clones;
3. :func:`build_shard` (one per range, in parallel) reads its rows, adds them to a clone
   and writes ``shard-XXXXX.faiss`` + key table (+ raw vectors for exact re-scoring);
4. :func:`finalize_build` checks keys are unique across shards and writes the manifest.

:func:`build_from_embeddings` runs the four steps with a given shard executor
(:data:`ShardMapper`; default :func:`thread_mapper`). Factory choice and training live in
:mod:`thinkfast.index.factory`, the files in :mod:`thinkfast.index.files`; their names are
re-exported here, where callers have always found them.
"""

from __future__ import annotations

import io
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from thinkfast.errors import ThinkfastError
from thinkfast.index.factory import (  # noqa: F401 - re-exported
    EXACT_BELOW,
    MAX_FLAT_CODE_BYTES,
    TUNE_SAMPLE,
    TUNE_TARGET_RECALL,
    require_faiss_gpus,
    choose_factory,
    default_nlist,
    default_train_size,
    deserialize,
    new_index,
    pq_subquantizers,
    prepare_vectors,
    serialize,
    train_index,
    tune_search_defaults,
)
from thinkfast.index.files import (  # noqa: F401 - re-exported
    delete_stale_shards,
    forget_previous,
    keys_table_bytes,
    load_trained,
    put_file,
    save_trained,
    shard_name,
    write_shard,
)
from thinkfast.index.manifest import METRIC_IP, IndexManifest, ShardRecord, write_manifest
from thinkfast.store import (
    FAST_DIR,
    StoreError,
    check_embedding_schema,
    embedding_matrix,
    find_embed_manifest,
    list_parquet_files,
    resolve_artifact_dir,
)
from thinkfast.utils import fs
from thinkfast.utils.timer import StageTimer

logger = logging.getLogger(__name__)


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
    for file_uri in list_parquet_files(resolve_artifact_dir(embeddings_uri, FAST_DIR, s3_endpoint), s3_endpoint):
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


def train_on_sample(plan: BuildPlan, train_sample: int | None = None, seed: int = 0,
                    stats: dict[str, Any] | None = None, gpu: bool = False) -> tuple[faiss.Index, dict, int]:
    """Train once on a sample; save ``trained.faiss``; return it, tuned defaults, sample size.
    ``stats``, when given, receives the quantizer's drift baseline (:mod:`thinkfast.index.drift`)."""
    from thinkfast.index.drift import training_stats

    size = min(plan.count, train_sample or default_train_size(plan.factory, plan.dim, plan.count))
    sample = prepare_vectors(sample_rows(plan, max(size, min(plan.count, TUNE_SAMPLE)), seed), plan.dim)
    order = np.random.default_rng(seed).permutation(len(sample))  # sample_rows keeps file order
    trained = train_index(plan.factory, plan.dim, sample[np.sort(order[:size])], seed, gpu=gpu)
    save_trained(plan.out_uri, trained, plan.s3_endpoint)
    if stats is not None:
        stats.update(training_stats(trained, sample[np.sort(order[:size])]))
    return trained, tune_search_defaults(trained, sample, seed=seed), size


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
    quantizer: dict[str, Any] | None = None,
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
        quantizer=dict(quantizer or {}),
    )
    write_manifest(plan_out_uri, manifest, s3_endpoint)
    logger.info("index %s: %d vectors in %d shard(s), factory %s", plan_out_uri, manifest.count, len(records), factory)
    return manifest


# --------------------------------------------------------------------------- the whole build

# runs build_shard(plan, i, trained_bytes) for every shard; returns records in shard order
ShardMapper = Callable[["BuildPlan", bytes], list[ShardRecord]]


def thread_mapper(plan: BuildPlan, trained: bytes) -> list[ShardRecord]:
    """Build every shard in local threads (FAISS releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    index = deserialize(trained)
    cpus = os.cpu_count() or 1
    workers = max(1, min(cpus, len(plan.ranges)))
    # OpenMP threads are per calling thread: split the cores, never oversubscribe them
    with ThreadPoolExecutor(
        max_workers=workers, initializer=faiss.omp_set_num_threads, initargs=(max(1, cpus // workers),)
    ) as pool:
        return list(pool.map(lambda i: build_shard(plan, i, index), range(len(plan.ranges))))


def identity_from_embeddings(embeddings: str, s3_endpoint: str | None = None) -> str | None:
    """The fast model identity that ``embed`` recorded in ``<emb>/manifest.json`` (None for
    plain Parquet embeddings without a manifest)."""
    manifest = find_embed_manifest(embeddings, s3_endpoint)
    return manifest.fast_identity if manifest is not None else None


def build_from_embeddings(
    embeddings: str,
    out: str,
    *,
    shards: int = 1,
    factory: str | None = None,
    train_sample: int | None = None,
    model_identity: str | None = None,
    store_vectors: bool = True,
    exact_below: int = EXACT_BELOW,
    seed: int = 0,
    s3_endpoint: str | None = None,
    mapper: ShardMapper | None = None,
    gpu: bool = False,
) -> IndexManifest:
    """Build the index at ``out`` from the fast embeddings at ``embeddings`` (an embed
    output or a Parquet dir/file); ``mapper`` runs the shards (default: local threads).
    ``gpu``: train the IVF quantizer on all GPUs (a GPU faiss build; refused in one line
    before any reading otherwise).

    The old manifest goes first and the new one is written last, so a directory with a
    manifest is always a complete index; shard files a larger previous build left behind
    are deleted afterwards."""
    # before any reading or training: unreadable embeddings or an unwritable --out fail
    # here in seconds, in one line naming the URI and the cause
    fs.check_readable(embeddings, s3_endpoint)
    fs.check_writable(out, s3_endpoint)
    if gpu:
        require_faiss_gpus()
    timer = StageTimer(logger)
    with timer.stage("plan"):
        plan = plan_build(embeddings, out, shards, factory, store_vectors, exact_below, s3_endpoint)
    identity = model_identity or identity_from_embeddings(embeddings, s3_endpoint)
    logger.info(
        "index build: %d vectors of dim %d, %s, %d shard(s), model %s",
        plan.count, plan.dim, plan.factory, len(plan.ranges), identity,
    )
    forget_previous(out, s3_endpoint)
    quantizer: dict[str, Any] = {}
    with timer.stage("train"):
        trained, defaults, train_count = train_on_sample(plan, train_sample, seed, stats=quantizer, gpu=gpu)
    with timer.stage("add"):
        records = (mapper or thread_mapper)(plan, serialize(trained))
    with timer.stage("finalize"):
        manifest = finalize_build(
            out, plan.dim, plan.factory, records, defaults, train_count, identity, timer.as_dict(), s3_endpoint,
            quantizer=quantizer,
        )
    delete_stale_shards(out, manifest, s3_endpoint)
    return manifest


def append_embeddings(embeddings: str, index_uri: str, shard_size: int | None = None,
                      s3_endpoint: str | None = None, replace_changed: bool = False) -> IndexManifest:
    """Add the keys of ``embeddings`` the index does not hold yet (see
    :func:`thinkfast.index.append.append_new_keys`); returns the manifest, whose
    ``last_change`` says how many were added, skipped, changed and replaced."""
    from thinkfast.index.append import append_new_keys

    return append_new_keys(embeddings, index_uri, shard_size, s3_endpoint, replace_changed=replace_changed)
