"""One loaded shard of a :class:`~thinkfast.index.sharded.ShardedIndex`: its FAISS index,
keys by FAISS id, tombstones and raw vectors, read from a local directory with every size
checked against the manifest first (a truncated FAISS file can otherwise crash or half-load).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import faiss
import numpy as np
import pyarrow.parquet as pq

from thinkfast.errors import IndexMismatchError, ThinkfastError
from thinkfast.index.manifest import ShardRecord
from thinkfast.index.params import SearchSettings, make_search_params, search_with

logger = logging.getLogger(__name__)


@dataclass
class Shard:
    """A loaded shard: FAISS index, keys by FAISS id, tombstones, optional raw vectors."""

    record: ShardRecord
    index: faiss.Index
    keys: np.ndarray  # (total,) object: key of FAISS id i
    removed: np.ndarray  # (total,) bool
    vectors: np.ndarray | None  # (total, d) float32 memmap, for exact re-scoring
    selector: faiss.IDSelector | None = None  # hides removed ids; None when nothing is removed
    bitmap: np.ndarray | None = None  # backing store of the selector (SWIG does not own it)
    selector_ok: bool = True  # False once FAISS refused selectors for this index type (e.g. IndexPQ)
    _ivf: faiss.IndexIVF | None = field(default=None, repr=False)  # the index downcast, for search_preassigned
    _params: dict = field(default_factory=dict, repr=False)  # (settings, k, selector) -> (params, keep)

    def params_for(self, settings: SearchSettings, k: int) -> Any:
        """Per-call FAISS parameters for this shard, built once per (settings, k, selector):
        building the SWIG objects costs more than scanning a shard's lists for one query.
        FAISS only reads them, so threads share them; the cache holds what they reference."""
        key = (settings, k, id(self.selector))
        found = self._params.get(key)
        if found is None:
            if len(self._params) >= 32:
                self._params.clear()
            found = self._params[key] = make_search_params(self.index, settings, self.selector, k)
        return found[0]

    def search(self, x: np.ndarray, k: int, settings: SearchSettings) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of live vectors: (scores, local ids), -inf / -1 where fewer were found."""
        if self.selector is None:
            return search_with(self.index, x, k, settings)
        if self.selector_ok:
            try:
                return search_with(self.index, x, k, settings, self.selector)
            except IndexMismatchError:
                logger.info("%s: FAISS index type rejects ID selectors; filtering removed ids after search", self.record.name)
                self.selector_ok = False
        # over-fetch by the number of removed vectors, so k live ones survive the filter
        fetch = min(self.record.total, k + self.record.removed)
        dist, local = search_with(self.index, x, fetch, settings)
        dead = (local >= 0) & self.removed[np.maximum(local, 0)]
        dist, local = np.where(dead, -np.inf, dist), np.where(dead, -1, local)
        order = np.argsort(-dist, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(dist, order, 1), np.take_along_axis(local, order, 1)

    def search_preassigned(
        self, x: np.ndarray, k: int, settings: SearchSettings, assign: np.ndarray, coarse_dis: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of live vectors in the IVF lists ``assign`` (from the shared coarse
        quantizer, see :class:`SharedQuantizer`): the same result as :meth:`search`
        without repeating the coarse search. Only for plain ``IndexIVF`` shards."""
        if self._ivf is None:
            self._ivf = faiss.downcast_index(self.index)
        params = self.params_for(settings, k)
        x = np.ascontiguousarray(x, dtype=np.float32)
        assign = np.ascontiguousarray(assign, dtype=np.int64)
        coarse_dis = np.ascontiguousarray(coarse_dis, dtype=np.float32)
        dist = np.empty((len(x), k), dtype=np.float32)
        ids = np.empty((len(x), k), dtype=np.int64)
        try:
            # the C++ call: the Python wrapper of search_preassigned refuses per-call params
            # (nprobe, the tombstone selector) and insists on the index's own nprobe
            self._ivf.search_preassigned_c(
                len(x), faiss.swig_ptr(x), k, faiss.swig_ptr(assign), faiss.swig_ptr(coarse_dis),
                faiss.swig_ptr(dist), faiss.swig_ptr(ids), False, params,
            )
            return dist, ids
        except RuntimeError as exc:
            raise IndexMismatchError(f"FAISS refused the preassigned search on {self.record.name}: {exc}") from exc

    def refresh_selector(self) -> None:
        if not self.removed.any():
            self.selector, self.bitmap = None, None
            return
        self.bitmap = np.packbits(~self.removed, bitorder="little")
        self.selector = faiss.IDSelectorBitmap(len(self.removed), faiss.swig_ptr(self.bitmap))


@dataclass(frozen=True)
class SharedQuantizer:
    """The coarse quantizer that IVF shards cloned from one trained index have in common.

    A query's IVF lists depend only on the quantizer, so one ``assign`` per query block
    serves every shard (FAISS's ``IndexShardsIVF`` does the same). :meth:`of` accepts the
    shards only if their quantizers serialize to the same bytes, so the shared
    assignment is exactly what each shard's own search would compute."""

    quantizer: faiss.Index
    owner: faiss.Index  # the IVF index that owns ``quantizer`` (SWIG does not keep it alive)

    @classmethod
    def of(cls, shards: Sequence[Shard]) -> "SharedQuantizer | None":
        """The common quantizer of ``shards``, or None when they have none to share."""
        if not shards:
            return None
        ivfs = []
        for shard in shards:
            inner = faiss.downcast_index(shard.index)
            if not isinstance(inner, faiss.IndexIVF):
                return None  # pre-transforms (OPQ, PCA), Flat, HNSW, PQ: searched whole
            ivfs.append(inner)
        first = ivfs[0]
        if len(ivfs) > 1:
            reference = faiss.serialize_index(first.quantizer)
            for ivf in ivfs[1:]:
                if ivf.nlist != first.nlist or ivf.metric_type != first.metric_type:
                    return None
                if not np.array_equal(faiss.serialize_index(ivf.quantizer), reference):
                    logger.info("shards have different coarse quantizers; each shard runs its own coarse search")
                    return None
        return cls(quantizer=first.quantizer, owner=shards[0].index)

    def assign(self, shard: Shard, x: np.ndarray, settings: SearchSettings) -> tuple[np.ndarray, np.ndarray]:
        """(distances, list ids) of the ``nprobe`` lists of each query, with the same
        nprobe and quantizer parameters that ``search`` on ``shard`` would use."""
        params = shard.params_for(settings, 1)
        quantizer_params = params.quantizer_params
        if quantizer_params is None:
            return self.quantizer.search(x, int(params.nprobe))
        return self.quantizer.search(x, int(params.nprobe), params=quantizer_params)


def read_local_shard(directory: str, record: ShardRecord, dim: int, mmap: bool) -> Shard:
    """Load one shard from a local directory, checking sizes against the manifest first
    (a truncated FAISS file can otherwise crash or half-load)."""
    index_path = os.path.join(directory, record.index_file)
    size = os.path.getsize(index_path) if os.path.exists(index_path) else -1
    if size != record.index_bytes:
        raise IndexMismatchError(
            f"{index_path}: {size} bytes, the manifest says {record.index_bytes}; the shard is truncated or missing"
        )
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        index = faiss.read_index(index_path, flags)
    except RuntimeError as exc:
        raise IndexMismatchError(f"{index_path}: FAISS cannot read this shard ({exc})") from exc
    if index.d != dim or index.ntotal != record.total:
        raise IndexMismatchError(
            f"{index_path}: holds {index.ntotal} vectors of dim {index.d}, manifest says {record.total} of dim {dim}"
        )
    keys_path = os.path.join(directory, record.keys_file)
    try:
        table = pq.read_table(keys_path)
    except (OSError, ValueError) as exc:
        raise IndexMismatchError(f"{keys_path}: key table is missing or damaged ({exc})") from exc
    if table.num_rows != record.total:
        raise IndexMismatchError(f"{keys_path}: {table.num_rows} keys for {record.total} vectors")
    keys = table.column("key").to_numpy(zero_copy_only=False).astype(object)
    removed = table.column("removed").to_numpy(zero_copy_only=False).astype(bool)
    if int(removed.sum()) != record.removed:
        raise IndexMismatchError(f"{keys_path}: {int(removed.sum())} removed keys, manifest says {record.removed}")
    vectors = None
    if record.vectors_bytes:
        vec_path = os.path.join(directory, record.vectors_file)
        vsize = os.path.getsize(vec_path) if os.path.exists(vec_path) else -1
        if vsize != record.vectors_bytes or vsize != record.total * dim * 4:
            raise IndexMismatchError(f"{vec_path}: {vsize} bytes, expected {record.vectors_bytes}; truncated")
        vectors = np.memmap(vec_path, dtype=np.float32, mode="r", shape=(record.total, dim))
    shard = Shard(record=record, index=index, keys=keys, removed=removed, vectors=vectors)
    shard.refresh_selector()
    return shard


class UnknownIndexKeys(ThinkfastError, KeyError):
    """Keys asked to be removed that the index does not hold."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = list(missing)
        super().__init__(f"{len(self.missing)} key(s) not in the index: {self.missing[:5]}")

    def __str__(self) -> str:
        return self.args[0]
