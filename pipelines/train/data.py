"""The training data path: corpus Parquet (local or S3) -> Ray Data -> decoded pairs.

The driver reads only the small columns (key, captions, split) to count rows and build the
word vocabulary; the media are decoded inside the Ray Data pipeline (``map_batches`` tasks),
so decoding runs beside training instead of in the training loop, and each Ray Train worker
streams its shard with ``get_dataset_shard``. A row that fails to decode is not dropped: it
keeps its key and a ``reject`` reason, the workers skip it, count it and log it.

Rows of the decoded dataset: ``key`` (str), ``captions`` (JSON list of str), ``pixels``
(float16 (3, S, S) or (F, 3, S, S)), ``reject`` ("" when decoded, else ``reason: detail``).
With ``caption_sampling="all"`` each caption becomes its own row (captions = [that one]).
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from thinkfast.errors import CorpusSchemaError, DecodeError, ThinkfastError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# decoded pixels travel (and are cached) as float16: half the object-store memory of
# float32; normalised pixel values lose < 1e-3, far below what training notices
PIXEL_DTYPE = np.float16
# without a split column, rows are assigned by a hash of their key: 5% val, 5% test, 90% train
_HASH_BUCKETS = {"val": range(0, 5), "test": range(5, 10), "train": range(10, 100)}


def split_of_key(key: str) -> str:
    """Deterministic split for corpora without a ``split`` column (stable across runs)."""
    bucket = zlib.crc32(key.encode("utf-8")) % 100
    for name, buckets in _HASH_BUCKETS.items():
        if bucket in buckets:
            return name
    raise AssertionError("unreachable: hash buckets cover 0..99")


@dataclass(frozen=True)
class CorpusInfo:
    """What the driver learns from the small columns before training starts."""

    uri: str  # the corpus URI as given
    files: tuple[str, ...]  # its Parquet files (full URIs), what Ray Data reads
    columns: Any  # thinkfast.data.schema.CorpusColumns (media / captions column names, has_split)
    counts: dict[str, int]  # rows per split (train / val / test)
    train_captions: tuple[str, ...]  # every caption of the train split (vocabulary source)
    is_video: bool  # media column is mp4 (pixels are (F, 3, S, S))


def inspect_corpus(uri: str) -> CorpusInfo:
    """Validate the corpus (every file's schema) and read its small columns on the driver."""
    from thinkfast.data import reader
    from thinkfast.data.media import captions_of

    found = reader.inspect_corpus(uri)
    columns = found.columns
    wanted = [columns.key, columns.captions] + (["split"] if columns.has_split else [])
    table = reader.read_table(uri, columns=wanted)
    keys = [str(k) for k in table.column(columns.key).to_pylist()]
    if len(set(keys)) != len(keys):
        raise CorpusSchemaError(f"corpus {uri}: column '{columns.key}' has duplicate values")
    splits = table.column("split").to_pylist() if columns.has_split else [split_of_key(k) for k in keys]
    counts = {s: 0 for s in SPLITS}
    train_captions: list[str] = []
    for split, caps in zip(splits, table.column(columns.captions).to_pylist()):
        counts[str(split)] = counts.get(str(split), 0) + 1
        if split == "train":
            train_captions.extend(captions_of({columns.captions: caps}, columns))
    if counts["train"] == 0:
        raise ThinkfastError(f"corpus {uri} has no rows in the train split")
    logger.info("corpus %s: %s rows per split, %d train captions", uri, counts, len(train_captions))
    return CorpusInfo(uri=uri, files=found.files, columns=columns, counts=counts,
                      train_captions=tuple(train_captions), is_video=columns.is_video)


def decode_rows(batch: pa.Table, columns: Any, split: str, image_size: int, num_frames: int,
                explode_captions: bool) -> dict[str, np.ndarray]:
    """Ray Data UDF: keep this split's rows, decode their media, keep rejects with a reason."""
    from thinkfast.data.media import captions_of, load_pixels

    rows = batch.to_pylist()
    if columns.has_split:
        rows = [r for r in rows if r.get("split") == split]
    else:
        rows = [r for r in rows if split_of_key(str(r["key"])) == split]
    shape = (num_frames, 3, image_size, image_size) if columns.is_video else (3, image_size, image_size)
    keys: list[str] = []
    captions: list[str] = []
    pixels: list[np.ndarray] = []
    rejects: list[str] = []
    for row in rows:
        caps = captions_of(row, columns)
        reject = ""
        array = np.zeros(shape, dtype=PIXEL_DTYPE)
        if not caps:
            reject = "no_caption: row has no non-empty caption"
        else:
            try:
                array = load_pixels(row, columns, image_size, num_frames).numpy().astype(PIXEL_DTYPE)
            except DecodeError as exc:
                reject = f"{exc.reason}: {exc.detail}"
            if not reject and array.shape != shape:
                reject = f"bad_shape: decoded {tuple(array.shape)}, expected {shape}"
                array = np.zeros(shape, dtype=PIXEL_DTYPE)
        groups = [[c] for c in caps] if (explode_captions and caps and not reject) else [caps]
        for group in groups:
            keys.append(str(row[columns.key]))
            captions.append(json.dumps(group))
            pixels.append(array)
            rejects.append(reject)
    return {
        "key": np.array(keys, dtype=object),
        "captions": np.array(captions, dtype=object),
        "pixels": np.stack(pixels) if pixels else np.zeros((0, *shape), dtype=PIXEL_DTYPE),
        "reject": np.array(rejects, dtype=object),
    }


def decoded_dataset(info: CorpusInfo, split: str, image_size: int, num_frames: int, explode_captions: bool,
                    decode_batch_size: int = 64) -> Any:
    """A lazy Ray Dataset of one split's decoded rows (re-executed each epoch)."""
    import ray.data

    columns = info.columns
    ds = ray.data.read_parquet(list(info.files), columns=columns.read_columns())
    return ds.map_batches(
        decode_rows,
        batch_format="pyarrow",
        batch_size=decode_batch_size,
        fn_kwargs={"columns": columns, "split": split, "image_size": image_size, "num_frames": num_frames,
                   "explode_captions": explode_captions},
    )


def sample_captions(captions_json: Iterable[str], keys: Iterable[str], seed: int, epoch: int) -> list[str]:
    """One caption per row, drawn afresh each epoch but reproducibly (seed, epoch, key)."""
    out: list[str] = []
    for key, text in zip(keys, captions_json):
        caps = json.loads(text)
        rng = np.random.default_rng([seed, epoch, zlib.crc32(str(key).encode("utf-8"))])
        out.append(caps[int(rng.integers(len(caps)))])
    return out


def decoded_bytes_per_row(is_video: bool, image_size: int, num_frames: int) -> int:
    """Object-store bytes of one decoded row's pixels (to decide whether caching fits)."""
    frames = num_frames if is_video else 1
    return frames * 3 * image_size * image_size * np.dtype(PIXEL_DTYPE).itemsize


def maybe_cache(ds: Any, rows: int, row_bytes: int, enabled: bool, name: str) -> Any:
    """Materialise a decoded split in the object store when it fits in a third of it, so
    epochs after the first skip decoding; otherwise stream (decode every epoch)."""
    import ray

    if not enabled:
        return ds
    capacity = float(ray.available_resources().get("object_store_memory", 0.0))
    need = rows * row_bytes
    if capacity and need > capacity / 3:
        logger.warning("%s: decoded split needs ~%.0f MB, more than a third of the object store (%.0f MB): "
                       "streaming and decoding every epoch instead", name, need / 2**20, capacity / 2**20)
        return ds
    started = time.perf_counter()
    ds = ds.materialize()
    logger.info("%s: decoded and cached %d rows (~%.1f MB) in %.1f s", name, rows, need / 2**20,
                time.perf_counter() - started)
    return ds
