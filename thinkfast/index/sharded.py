"""``ShardedIndex``: FAISS shards + key tables + manifest, searched shard-parallel.

Each shard is an ordinary FAISS index file whose ids are row numbers in the shard's key
table, so global ids are ``shard offset + row``. A search runs every shard in a thread
(FAISS releases the GIL) -- IVF shards share one coarse assignment per query block,
computed once rather than once per shard -- merges the per-shard top-k with FAISS's own ``ResultHeap``
(the merge ``IndexShards`` does), and maps ids back to keys. Removed keys are
tombstoned in the key table and hidden with an ``IDSelectorBitmap`` at search time, so
shard files never change after they are written: they can be memory-mapped, cached
from S3, and shared between processes. ``add`` appends a shard cloned from the stored
trained (empty) index, without retraining or rewriting existing shards.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import faiss
import numpy as np

from thinkfast.errors import IndexMismatchError, ThinkfastError
from thinkfast.index import build as B
from thinkfast.index import fanout as F
from thinkfast.index.drift import DriftReport, after_append, drift_report
from thinkfast.index.manifest import (
    TRAINED_NAME,
    IndexManifest,
    ShardRecord,
    read_manifest,
    write_manifest,
)
from thinkfast.index.files import DEFAULT_CACHE, read_file, sync_from_s3  # noqa: F401 - DEFAULT_CACHE: old home
from thinkfast.index.params import SearchSettings
from thinkfast.index.shard import SharedQuantizer, Shard, UnknownIndexKeys, read_local_shard
from thinkfast.utils import fs

logger = logging.getLogger(__name__)


class ShardedIndex:
    """A loaded index directory. Build with :meth:`build` (arrays) or ``thinkfast index``
    (Parquet, Ray); open with :meth:`load`; query with :meth:`search`."""

    def __init__(
        self,
        uri: str,
        local_dir: str,
        manifest: IndexManifest,
        shards: list[Shard],
        s3_endpoint: str | None = None,
        partial: bool = False,
    ) -> None:
        self.uri = str(uri)
        self.partial = partial  # only some shards loaded (one Serve replica per shard): read-only
        self.local_dir = local_dir
        self.manifest = manifest
        self.s3_endpoint = s3_endpoint
        self._shards = shards
        self._lock = threading.RLock()
        self._pool: ThreadPoolExecutor | None = None
        self._warned_identity = False
        self._positions: dict[str, tuple[int, int]] | None = None  # live key -> (shard, row), built on demand
        self._quantizer_cache: tuple[tuple[int, ...], SharedQuantizer | None] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def factory(self) -> str:
        return self.manifest.factory

    @property
    def model_identity(self) -> str | None:
        return self.manifest.model_identity

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def __len__(self) -> int:
        """Live vectors in the loaded shards."""
        return sum(s.record.count for s in self._shards)

    def keys(self) -> list[str]:
        """Live keys in global-id order."""
        return [k for s in self._shards for k, r in zip(s.keys, s.removed) if not r]

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._live_positions()

    # ------------------------------------------------------------------ building and loading

    @classmethod
    def build(
        cls,
        keys: Sequence[str],
        vectors: np.ndarray,
        out_uri: str,
        *,
        shards: int = 1,
        factory: str | None = None,
        train_sample: int | None = None,
        model_identity: str | None = None,
        store_vectors: bool = True,
        exact_below: int = B.EXACT_BELOW,
        seed: int = 0,
        s3_endpoint: str | None = None,
        trained: faiss.Index | None = None,
    ) -> "ShardedIndex":
        """Build from in-memory ``keys`` and ``vectors`` (N, d) into ``out_uri`` and load it.

        Trains once on ``train_sample`` vectors (or reuses ``trained``, an empty trained
        index of the same ``factory``, e.g. another build's ``trained.faiss``), adds
        ``shards`` shards in threads. For corpora on disk use
        ``thinkfast_pipelines.index.build_index`` (streams, Ray tasks)."""
        from thinkfast.index.memory_build import build_in_memory

        build_in_memory(keys, vectors, out_uri, shards=shards, factory=factory, train_sample=train_sample,
                        model_identity=model_identity, store_vectors=store_vectors, exact_below=exact_below,
                        seed=seed, s3_endpoint=s3_endpoint, trained=trained)
        return cls.load(out_uri, s3_endpoint=s3_endpoint)

    @staticmethod
    def read_manifest(uri: str, s3_endpoint: str | None = None) -> IndexManifest:
        """The validated manifest alone (dim, factory, shard counts); loads no shard."""
        return read_manifest(uri, s3_endpoint)

    @classmethod
    def load(
        cls,
        uri: str,
        *,
        shards: Sequence[int] | None = None,
        mmap: bool = True,
        cache_dir: str | None = None,
        expected_dim: int | None = None,
        expected_model_identity: str | None = None,
        s3_endpoint: str | None = None,
    ) -> "ShardedIndex":
        """Open an index directory (local or ``s3://``; S3 is copied to ``cache_dir`` first,
        reusing files whose size already matches). Shards are memory-mapped when ``mmap``.
        ``shards`` loads only those shard numbers (a read-only view, e.g. one Serve replica
        per shard). ``expected_dim`` / ``expected_model_identity`` fail fast with
        IndexMismatchError."""
        manifest = read_manifest(uri, s3_endpoint)
        chosen = list(range(manifest.num_shards)) if shards is None else [int(i) for i in shards]
        bad = [i for i in chosen if not 0 <= i < manifest.num_shards]
        if bad:
            raise ThinkfastError(f"index {uri} has {manifest.num_shards} shard(s); no shard {bad[0]}")
        if fs.is_s3(uri):
            local_dir = sync_from_s3(uri, manifest, cache_dir, s3_endpoint, chosen)
        else:
            local_dir = os.path.abspath(fs.strip_scheme(uri))
        loaded = [read_local_shard(local_dir, manifest.shards[i], manifest.dim, mmap) for i in chosen]
        partial = chosen != list(range(manifest.num_shards))
        index = cls(uri, local_dir, manifest, loaded, s3_endpoint, partial=partial)
        index.check_compatible(dim=expected_dim, model_identity=expected_model_identity)
        logger.info(
            "loaded index %s: %d vectors, %d shard(s), %s", uri, len(index), len(loaded), manifest.factory
        )
        return index

    def check_compatible(self, dim: int | None = None, model_identity: str | None = None) -> None:
        """Raise IndexMismatchError when the query side's dimension or fast-model identity
        differs from what built the index (searching it would return plausible garbage)."""
        if dim is not None and int(dim) != self.dim:
            raise IndexMismatchError(f"index {self.uri} holds {self.dim}-d vectors, the queries are {dim}-d")
        if model_identity is None:
            return
        if self.model_identity is None:
            if not self._warned_identity:
                logger.warning("index %s records no model identity; cannot check it matches %s", self.uri, model_identity)
                self._warned_identity = True
            return
        if model_identity != self.model_identity:
            raise IndexMismatchError(
                f"index {self.uri} was built from embeddings of fast model {self.model_identity}, "
                f"but the queries come from {model_identity}; rebuild the index (thinkfast embed + index)"
            )

    # ------------------------------------------------------------------ search

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        nprobe: int | None = None,
        efSearch: int | None = None,
        rescore: bool | None = None,
        rescore_factor: int = 4,
        expected_model_identity: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product over all shards: ``(keys (n, k) object, scores (n, k) float32)``.

        ``k`` is capped at the number of live vectors. Slots an approximate index could
        not fill hold key ``None`` and score ``-inf``. ``nprobe`` / ``efSearch`` default
        to the values tuned at build time. ``rescore`` fetches ``k * rescore_factor``
        candidates and re-ranks them by exact inner product with the stored vectors
        (default: on only when the build's tuning found the codes too lossy)."""
        self.check_compatible(model_identity=expected_model_identity)
        x = np.asarray(queries, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise IndexMismatchError(f"queries have shape {np.shape(queries)}, the index expects (n, {self.dim})")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ThinkfastError(f"k must be a positive integer, got {k!r}")
        x = B.prepare_vectors(x, self.dim, normalize=self.manifest.normalize)
        with self._lock:
            shards = list(self._shards)
        live = sum(s.record.count for s in shards)
        k = int(min(k, live))
        if k == 0 or len(x) == 0:
            return np.empty((len(x), k), dtype=object), np.empty((len(x), k), dtype=np.float32)
        defaults = self.manifest.search_defaults
        settings = SearchSettings(
            nprobe=nprobe if nprobe is not None else defaults.get("nprobe"),
            efSearch=efSearch if efSearch is not None else defaults.get("efSearch"),
        )
        do_rescore = bool(defaults.get("rescore", False)) if rescore is None else bool(rescore)
        if do_rescore and not self.manifest.stores_vectors:
            raise IndexMismatchError(f"index {self.uri} was built without stored vectors; exact re-scoring needs them")
        fetch = int(min(live, k * max(1, rescore_factor))) if do_rescore else k
        scores, ids = F.search_ids(shards, x, fetch, settings, self._shared_quantizer(shards), self._executor())
        if do_rescore:
            scores, ids = F.rescore(shards, x, ids, k, self.dim)
        return F.keys_of(shards, ids), scores

    def _shared_quantizer(self, shards: list[Shard]) -> "SharedQuantizer | None":
        """The coarse quantizer every non-empty shard shares, or None (not IVF, wrapped in
        a pre-transform, or quantizers that differ byte for byte -- then results would
        not match a per-shard search). Checked once per set of shard indexes."""
        key = tuple(id(s.index) for s in shards)
        cached = self._quantizer_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        found = SharedQuantizer.of([s for s in shards if s.record.count])
        self._quantizer_cache = (key, found)
        return found

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=F.pool_size(), thread_name_prefix="faiss-search", initializer=F.single_omp_thread
            )
        return self._pool

    # ------------------------------------------------------------------ changes

    def add(self, keys: Sequence[str], vectors: np.ndarray) -> ShardRecord:
        """Append a new shard with ``keys`` / ``vectors`` (no retraining, no rewrite of old
        shards). Keys already live in the index are an error: remove them first."""
        self._require_full("add")
        keys = [str(k) for k in keys]
        if not keys:
            raise ThinkfastError("nothing to add")
        if len(set(keys)) != len(keys):
            raise ThinkfastError("duplicate keys in the batch to add")
        x = B.prepare_vectors(vectors, self.dim, normalize=self.manifest.normalize)
        with self._lock:
            live = self._live_positions()
            clash = [k for k in keys if k in live]
            if clash:
                raise ThinkfastError(f"{len(clash)} key(s) already in the index (e.g. {clash[:3]}); remove them first")
            trained = B.deserialize(read_file(self.local_dir, TRAINED_NAME))
            name = self.manifest.next_shard_name()
            record = B.write_shard(self.local_dir, name, trained, keys, x, self.manifest.stores_vectors)
            if fs.is_s3(self.uri):
                for file_name in (record.vectors_file, record.index_file, record.keys_file):
                    if os.path.exists(os.path.join(self.local_dir, file_name)):
                        fs.write_bytes(fs.join(self.uri, file_name), read_file(self.local_dir, file_name), self.s3_endpoint)
            shard = read_local_shard(self.local_dir, record, self.dim, mmap=True)
            quantizer = after_append(self.manifest.quantizer, trained, x)  # drift: the running residual sums
            self._commit(self.manifest.replace(shards=self.manifest.shards + (record,), quantizer=quantizer),
                         self._shards + [shard])
            live.update((k, (len(self._shards) - 1, row)) for row, k in enumerate(keys))  # O(batch), not O(N)
            self._positions = live
        logger.info("added %d vectors to %s as %s", len(keys), self.uri, name)
        return record

    def remove(self, keys: Sequence[str], missing_ok: bool = False) -> int:
        """Tombstone ``keys``; returns how many were removed. Unknown keys raise
        ``KeyError`` (a ThinkfastError) unless ``missing_ok``."""
        self._require_full("remove")
        with self._lock:
            live = self._live_positions()
            missing = [k for k in keys if k not in live]
            if missing and not missing_ok:
                raise UnknownIndexKeys(missing)
            touched: dict[int, list[int]] = {}
            for key in set(keys) - set(missing):
                s, row = live[key]
                touched.setdefault(s, []).append(row)
            if not touched:
                return 0
            shards = list(self._shards)
            records = list(self.manifest.shards)
            for s, rows in touched.items():
                old = shards[s]
                removed = old.removed.copy()
                removed[rows] = True
                record = dataclasses.replace(old.record, removed=int(removed.sum()))
                data = B.keys_table_bytes(old.keys.tolist(), removed)
                B.put_file(os.path.join(self.local_dir, record.keys_file), data, None)
                if fs.is_s3(self.uri):
                    fs.write_bytes(fs.join(self.uri, record.keys_file), data, self.s3_endpoint)
                shard = Shard(record=record, index=old.index, keys=old.keys, removed=removed, vectors=old.vectors)
                shard.refresh_selector()
                shards[s], records[s] = shard, record
            self._commit(self.manifest.replace(shards=tuple(records)), shards)
            count = sum(len(rows) for rows in touched.values())
        logger.info("removed %d key(s) from %s", count, self.uri)
        return count

    def drift(self) -> DriftReport:
        """Whether appends have moved the data away from the trained quantizer (rebuild due)."""
        with self._lock:
            return drift_report(self.manifest.quantizer, [s.index for s in self._shards])

    def record_change(self, change: dict[str, Any]) -> None:
        """Write ``change`` (counts of an append or remove) as the manifest's ``last_change``."""
        with self._lock:
            self._commit(self.manifest.replace(last_change=dict(change)), self._shards)

    def _require_full(self, what: str) -> None:
        if self.partial:
            raise ThinkfastError(f"cannot {what} on a view of some shards; load the whole index")

    def _live_positions(self) -> dict[str, tuple[int, int]]:
        if self._positions is None:
            self._positions = {
                shard.keys[row]: (s, row)
                for s, shard in enumerate(self._shards)
                for row in np.nonzero(~shard.removed)[0].tolist()
            }
        return self._positions

    def _commit(self, manifest: IndexManifest, shards: list[Shard]) -> None:
        """Manifest last: locally (the cache or the index itself), then on S3."""
        write_manifest(self.local_dir, manifest)
        if fs.is_s3(self.uri):
            write_manifest(self.uri, manifest, self.s3_endpoint)
        self.manifest, self._shards, self._positions = manifest, shards, None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("ShardedIndex holds FAISS objects; pass its URI and ShardedIndex.load() it in the worker")


__all__ = ["ShardedIndex"]
