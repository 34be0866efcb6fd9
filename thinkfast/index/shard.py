"""One loaded shard of a :class:`~thinkfast.index.sharded.ShardedIndex`: its FAISS index,
keys by FAISS id, tombstones and raw vectors, read from a local directory with every size
checked against the manifest first (a truncated FAISS file can otherwise crash or half-load).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import faiss
import numpy as np
import pyarrow.parquet as pq

from thinkfast.errors import IndexMismatchError, ThinkfastError
from thinkfast.index.manifest import ShardRecord
from thinkfast.index.params import SearchSettings, search_with

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

    def refresh_selector(self) -> None:
        if not self.removed.any():
            self.selector, self.bitmap = None, None
            return
        self.bitmap = np.packbits(~self.removed, bitorder="little")
        self.selector = faiss.IDSelectorBitmap(len(self.removed), faiss.swig_ptr(self.bitmap))


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
