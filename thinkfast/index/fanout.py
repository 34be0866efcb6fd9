"""Fan-out search over the shards of a :class:`~thinkfast.index.sharded.ShardedIndex`:
tasks on a thread pool (FAISS releases the GIL), one ``ResultHeap`` merge, global ids
mapped back to keys, and the optional exact re-scoring. Pure functions of the shard list,
so the index object only holds state (shards, pool, cached quantizer)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

from thinkfast.index.params import SearchSettings
from thinkfast.index.shard import SharedQuantizer, Shard


def search_ids(
    shards: list[Shard], x: np.ndarray, k: int, settings: SearchSettings,
    quantizer: SharedQuantizer | None, executor: ThreadPoolExecutor,
) -> tuple[np.ndarray, np.ndarray]:
    """Global ids and scores of the merged top-k (ids -1 where nothing was found).

    IVF shards cloned from one trained index share their coarse quantizer, so each
    query block is assigned to its ``nprobe`` lists once and every shard only scans
    its part of those lists (``search_preassigned``, what FAISS's ``IndexShardsIVF``
    does). Searching each shard whole would repeat the coarse search S times: at 1M x
    256 with nprobe 4 that search is most of a query's cost, which is why 4 shards ran
    at 0.33-0.48x the single index. Other index types search shard x block tasks."""
    offsets = np.cumsum([0] + [s.record.total for s in shards])
    workers = pool_size()
    if quantizer is not None:
        # same task layout as one index: query blocks, each scanning every shard
        blocks = max(1, min(workers, len(x) // 16))
    else:
        # tasks = shard x query block: enough to fill the cores even with one shard
        blocks = max(1, min(-(-workers // len(shards)), len(x) // 16))
    bounds = np.linspace(0, len(x), blocks + 1).astype(int)
    live = [i for i, s in enumerate(shards) if s.record.count]

    def scan(i: int, a: int, dist: np.ndarray, local: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        return a, dist, np.where(local >= 0, local + offsets[i], -1)

    def one(task: tuple[int, int, int]) -> list[tuple[int, np.ndarray, np.ndarray]]:
        i, a, b = task
        shard = shards[i]
        return [scan(i, a, *shard.search(x[a:b], min(k, shard.record.count), settings))]

    def preassigned(task: tuple[int, int, int]) -> list[tuple[int, np.ndarray, np.ndarray]]:
        _, a, b = task
        block = x[a:b]
        coarse_dis, assign = quantizer.assign(shards[live[0]], block, settings)
        parts = [
            scan(i, a, *shards[i].search_preassigned(block, min(k, shards[i].record.count), settings,
                                                     assign, coarse_dis))
            for i in live
        ]
        if len(parts) == 1:
            return parts
        # side by side, (block, S * k): one heap insertion per block instead of S
        return [(a, np.hstack([d for _, d, _ in parts]), np.hstack([g for _, _, g in parts]))]

    if quantizer is not None:
        tasks = [(-1, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        run = preassigned
    else:
        tasks = [(i, a, b) for i in live for a, b in zip(bounds[:-1], bounds[1:])]
        run = one
    heap = faiss.ResultHeap(len(x), k, keep_max=True)
    for parts in executor.map(run, tasks):
        for a, dist, gid in parts:
            heap.add_result_subset(np.arange(a, a + len(dist)), dist, gid)
    heap.finalize()
    scores = heap.D.copy()
    scores[heap.I < 0] = -np.inf
    return scores, heap.I.copy()


def locate(shards: list[Shard], ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [s.record.total for s in shards])
    shard_of = np.searchsorted(offsets, ids, side="right") - 1
    return shard_of, ids - offsets[np.clip(shard_of, 0, len(shards) - 1)]

def keys_of(shards: list[Shard], ids: np.ndarray) -> np.ndarray:
    out = np.full(ids.shape, None, dtype=object)
    valid = ids >= 0
    shard_of, row = locate(shards, ids[valid])
    found = np.empty(len(row), dtype=object)
    for s in np.unique(shard_of):
        mask = shard_of == s
        found[mask] = shards[s].keys[row[mask]]
    out[valid] = found
    return out

def rescore(
    shards: list[Shard], x: np.ndarray, ids: np.ndarray, k: int, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of the candidates with their stored float32 vectors."""
    valid = ids >= 0
    shard_of, row = locate(shards, ids[valid])
    cand = np.zeros((len(row), dim), np.float32)  # (C, d)
    for s in np.unique(shard_of):
        mask = shard_of == s
        cand[mask] = shards[s].vectors[row[mask]]
    exact = np.full(ids.shape, -np.inf, np.float32)  # (n, fetch)
    query_of = np.nonzero(valid)[0]
    exact[valid] = np.einsum("cd,cd->c", cand, x[query_of])
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, order, 1), np.take_along_axis(np.where(valid, ids, -1), order, 1)


def pool_size() -> int:
    return max(1, os.cpu_count() or 1)


def single_omp_thread() -> None:
    """Pool threads run FAISS with one OpenMP thread each (the setting is per thread):
    the pool already spreads shards and query blocks over the cores, and nested OpenMP
    teams spin-wait against each other -- on a busy 2-core machine a single-query search
    measured 60 ms with OpenMP's 2 threads and 0.6 ms with one."""
    faiss.omp_set_num_threads(1)


__all__ = ["keys_of", "locate", "pool_size", "rescore", "search_ids", "single_omp_thread"]
