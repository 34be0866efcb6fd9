"""Fast embeddings: ``<emb>/fast/*.parquet``, one row per item, ``key`` string and
``embedding`` fixed_size_list<float32>[d].

Read whole (:func:`read_embeddings`) for small corpora, or streamed
(:func:`iter_embeddings`) when an index build must not hold it all. Written by embed's
sink, one Parquet part per write call (:func:`write_embeddings`), named by a hash of its
keys so that a retried write replaces its own file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from thinkfast.store.errors import StoreError
from thinkfast.store.layout import FAST_DIR, list_parquet_files, resolve_artifact_dir
from thinkfast.utils import fs

logger = logging.getLogger(__name__)


def keys_digest(keys: Sequence[str], salt: str = "") -> str:
    """16 hex digits naming a file by the keys it holds: a re-written batch replaces its
    own file instead of adding a copy. ``salt`` keeps different outputs of one batch apart."""
    h = hashlib.sha1(salt.encode())
    for k in keys:
        h.update(str(k).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


_keys_digest = keys_digest  # old private name



def embeddings_schema(dim: int) -> pa.Schema:
    """The fast-embedding Parquet schema for dimension ``dim``."""
    return pa.schema([("key", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])


def embeddings_table(keys: Sequence[str], vectors: np.ndarray) -> pa.Table:
    """Arrow table of ``keys`` and float32 ``vectors`` (N, d), validated."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise StoreError(f"embeddings must be 2-D (N, d), got shape {vectors.shape}")
    if len(keys) != vectors.shape[0]:
        raise StoreError(f"{len(keys)} keys but {vectors.shape[0]} embedding rows")
    if not np.isfinite(vectors).all():
        raise StoreError("embeddings contain NaN or inf")
    n, d = vectors.shape
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(flat, d)
    return pa.Table.from_arrays([pa.array(list(keys), type=pa.string()), column], schema=embeddings_schema(d))


def write_embeddings(
    uri: str,
    keys: Sequence[str],
    vectors: np.ndarray,
    *,
    part: str | None = None,
    s3_endpoint: str | None = None,
) -> str:
    """Write one Parquet part of fast embeddings into directory ``uri``; returns its URI.

    ``part`` names the file (``<part>.parquet``); by default a hash of the keys, so writing
    the same batch twice replaces the file rather than duplicating rows."""
    table = embeddings_table(keys, vectors)
    name = part or "part-" + _keys_digest(keys)
    target = fs.join(uri, name if name.endswith(".parquet") else name + ".parquet")
    filesystem, path = fs.arrow_fs(target, s3_endpoint)
    if not fs.is_s3(target):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, filesystem=filesystem)
    logger.debug("wrote %d embeddings to %s", table.num_rows, target)
    return target


def embedding_matrix(column: pa.ChunkedArray | pa.Array, source: str) -> np.ndarray:
    """(N, d) float32 from a fixed-size / variable list column (or Ray's tensor extension)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if isinstance(column.type, pa.ExtensionType):  # Ray Data's ArrowTensorType and friends
        column = column.storage
    if column.null_count:
        raise StoreError(f"{source}: {column.null_count} null embedding(s)")
    n = len(column)
    if pa.types.is_fixed_size_list(column.type):
        d = column.type.list_size
        values = column.flatten()
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = np.asarray(column.value_lengths())
        d = int(lengths[0]) if n else 0
        if n and not (lengths == d).all():
            raise StoreError(f"{source}: embeddings have different lengths ({lengths.min()}..{lengths.max()})")
        values = column.flatten()
    else:
        raise StoreError(f"{source}: column 'embedding' has type {column.type}, expected a list of float32")
    if values.null_count:
        raise StoreError(f"{source}: null values inside embeddings")
    matrix = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return matrix.reshape(n, d)


def check_embedding_schema(schema: pa.Schema, source: str) -> None:
    for name in ("key", "embedding"):
        if name not in schema.names:
            raise StoreError(f"{source}: missing column {name!r} (have {schema.names})")
    key_type = schema.field("key").type
    if not (pa.types.is_string(key_type) or pa.types.is_large_string(key_type)):
        raise StoreError(f"{source}: column 'key' has type {key_type}, expected string")


def iter_embeddings(
    uri: str, batch_size: int = 65536, s3_endpoint: str | None = None
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Stream ``(keys, vectors (B, d) float32)`` batches from ``<emb>/fast`` or a Parquet dir/file.

    Memory stays at one batch, so an index build over a corpus larger than RAM can add
    shard by shard. Raises :class:`StoreError` on a wrong schema, nulls, or mixed dims.
    A clip-retrieval directory (``img_emb/*.npy`` + ``metadata/*.parquet``) reads too."""
    from thinkfast.store import clip_retrieval

    if clip_retrieval.is_clip_retrieval_layout(uri, s3_endpoint):
        yield from clip_retrieval.iter_clip_embeddings(uri, batch_size, s3_endpoint)
        return
    dim: int | None = None
    for file_uri in list_parquet_files(resolve_artifact_dir(uri, FAST_DIR, s3_endpoint), s3_endpoint):
        filesystem, path = fs.arrow_fs(file_uri, s3_endpoint)
        try:
            parquet = pq.ParquetFile(path, filesystem=filesystem)
        except (pa.ArrowInvalid, OSError) as exc:
            raise StoreError(f"{file_uri}: not a readable Parquet file ({exc})") from exc
        check_embedding_schema(parquet.schema_arrow, file_uri)
        for batch in parquet.iter_batches(batch_size=batch_size, columns=["key", "embedding"]):
            keys_col = batch.column("key")
            if keys_col.null_count:
                raise StoreError(f"{file_uri}: {keys_col.null_count} null key(s)")
            vectors = embedding_matrix(batch.column("embedding"), file_uri)
            if dim is None:
                dim = vectors.shape[1]
            elif vectors.shape[1] != dim:
                raise StoreError(f"{file_uri}: embedding dim {vectors.shape[1]} differs from {dim} in earlier files")
            yield keys_col.to_pylist(), vectors


def read_embeddings(uri: str, s3_endpoint: str | None = None) -> tuple[list[str], np.ndarray]:
    """All fast embeddings: ``(keys, vectors (N, d) float32)``; duplicate keys are an error."""
    keys: list[str] = []
    parts: list[np.ndarray] = []
    for batch_keys, vectors in iter_embeddings(uri, s3_endpoint=s3_endpoint):
        keys.extend(batch_keys)
        parts.append(vectors)
    if not parts:
        raise StoreError(f"{uri}: no embeddings (all Parquet files are empty)")
    if len(set(keys)) != len(keys):
        raise StoreError(f"{uri}: {len(keys) - len(set(keys))} duplicate key(s) in the embeddings")
    return keys, np.concatenate(parts, axis=0)


def embedding_dim(uri: str, s3_endpoint: str | None = None) -> int:
    """The embedding dimension, from the first non-empty batch."""
    for _, vectors in iter_embeddings(uri, batch_size=1, s3_endpoint=s3_endpoint):
        return int(vectors.shape[1])
    raise StoreError(f"{uri}: no embeddings")
