"""The Ray side of the training data path: corpus Parquet (local or S3) -> Ray Data ->
decoded rows, and a rank's view of them.

The driver reads only the small columns (``thinkfast.training.data.inspect_corpus``); the
media are decoded inside the Ray Data pipeline (``map_batches`` tasks running
``thinkfast.training.data.decode_split``), so decoding runs beside training instead of in
the training loop. Each Ray Train rank takes its shard with ``get_dataset_shard`` and, with
``data_order="permutation"``, holds it (``ShardRows``: key order, then a (seed, epoch)
permutation, the in-process trainer's order); with ``stream`` it iterates the shard
through Ray Data's local shuffle buffer each epoch.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Iterator

import numpy as np

from thinkfast.training.data import CorpusInfo, decode_split

if TYPE_CHECKING:
    import ray.data

    from thinkfast.training.config import TrainConfig

logger = logging.getLogger(__name__)


def decoded_dataset(info: CorpusInfo, split: str, image_size: int, num_frames: int, explode_captions: bool,
                    decode_batch_size: int = 64) -> "ray.data.Dataset":
    """A lazy Ray Dataset of one split's decoded rows (re-executed each epoch unless cached)."""
    import ray.data

    columns = info.columns
    ds = ray.data.read_parquet(list(info.files), columns=columns.read_columns())
    return ds.map_batches(
        decode_split,
        batch_format="pyarrow",
        batch_size=decode_batch_size,
        fn_kwargs={"columns": columns, "split": split, "image_size": image_size, "num_frames": num_frames,
                   "explode_captions": explode_captions},
    )


def maybe_cache(ds: "ray.data.Dataset", rows: int, row_bytes: int, enabled: bool, name: str) -> tuple["ray.data.Dataset", bool]:
    """Materialise a decoded split in the object store when it fits in a third of it, so
    epochs after the first skip decoding; otherwise stream (decode every epoch).
    Returns the dataset and whether it was cached."""
    import ray

    if not enabled:
        return ds, False
    capacity = float(ray.available_resources().get("object_store_memory", 0.0))
    need = rows * row_bytes
    if capacity and need > capacity / 3:
        logger.warning("%s: decoded split needs ~%.0f MB, more than a third of the object store (%.0f MB): "
                       "streaming and decoding every epoch instead", name, need / 2**20, capacity / 2**20)
        return ds, False
    started = time.perf_counter()
    ds = ds.materialize()
    logger.info("%s: decoded and cached %d rows (~%.1f MB) in %.1f s", name, rows, need / 2**20,
                time.perf_counter() - started)
    return ds, True


def shard_batches(config: "TrainConfig", rows_per_step: int, images_per_row: int, epoch: int,
                  start: int) -> Iterator[dict[str, np.ndarray]]:
    """``data_order="stream"``: this rank's shard through the local shuffle buffer, from
    batch ``start`` on (the earlier ones are read and dropped: a stream cannot seek)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    # the buffer is counted in images: grouped rows (G images each) need G times fewer
    buffer = config.shuffle_buffer // max(1, images_per_row)
    stream = shard.iter_batches(
        batch_size=rows_per_step,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=buffer if buffer >= 2 else None,
        local_shuffle_seed=config.seed * 1000 + epoch if config.shuffle_buffer else None,
    )
    for index, batch in enumerate(stream):
        if index >= start:
            yield batch
