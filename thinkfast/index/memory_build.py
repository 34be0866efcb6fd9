"""Building a sharded index from vectors already in memory (``ShardedIndex.build``): train
once, add the shards in threads, write the manifest. Corpora on disk go through
``thinkfast.index.build.build_from_embeddings``, which streams them."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import faiss
import numpy as np

from thinkfast.errors import ThinkfastError
from thinkfast.index import build as B
from thinkfast.utils.timer import StageTimer

logger = logging.getLogger(__name__)


def pool_size() -> int:
    return max(1, os.cpu_count() or 1)


def build_in_memory(
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
) -> None:
    """Write an index of ``keys`` / ``vectors`` (N, d) to ``out_uri`` (see ``ShardedIndex.build``)."""
    keys = [str(k) for k in keys]
    if len(keys) != len(vectors):
        raise ThinkfastError(f"{len(keys)} keys but {len(vectors)} vectors")
    if len(set(keys)) != len(keys):
        raise ThinkfastError(f"{len(keys) - len(set(keys))} duplicate key(s)")
    if not keys:
        raise ThinkfastError("cannot build an index from zero vectors")
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ThinkfastError(f"vectors must be (N, d), got shape {vectors.shape}")
    dim = int(vectors.shape[1])
    if trained is not None and factory is None:
        raise ThinkfastError("pass the factory string that made trained=")
    timer = StageTimer(logger)
    x = B.prepare_vectors(vectors, dim)
    n = len(keys)
    factory = factory or B.choose_factory(n, dim, exact_below=exact_below)
    with timer.stage("train"):
        size = min(n, train_sample or B.default_train_size(factory, dim, n))
        rng = np.random.default_rng(seed)
        picked = rng.permutation(n)[: max(size, min(n, B.TUNE_SAMPLE))]
        sample = x[np.sort(picked[:size])]
        if trained is None:
            trained = B.train_index(factory, dim, sample, seed)
        elif trained.d != dim or trained.ntotal != 0 or not trained.is_trained:
            raise ThinkfastError("trained= must be an empty, trained index of the same dimension")
        B.save_trained(out_uri, trained, s3_endpoint)
        defaults = B.tune_search_defaults(trained, x[np.sort(picked)], seed=seed)
    ranges = B.shard_ranges(n, shards)
    workers = min(len(ranges), pool_size())
    with timer.stage("add"), ThreadPoolExecutor(
        max_workers=workers, initializer=faiss.omp_set_num_threads, initargs=(max(1, pool_size() // workers),)
    ) as pool:
        records = list(
            pool.map(
                lambda i: B.write_shard(
                    out_uri, B.shard_name(i), trained, keys[ranges[i][0] : ranges[i][1]],
                    x[ranges[i][0] : ranges[i][1]], store_vectors, s3_endpoint,
                ),
                range(len(ranges)),
            )
        )
    from thinkfast.index.drift import training_stats

    B.finalize_build(
        out_uri, dim, factory, records, defaults, len(sample), model_identity, timer.as_dict(), s3_endpoint,
        quantizer=training_stats(trained, sample),
    )
