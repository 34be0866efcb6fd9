"""Artifact I/O shared by ``embed``, ``index``, ``eval`` and ``serve``.

Two artifacts live under an embeddings directory ``<emb>`` (local path or ``s3://``):

* ``<emb>/fast/*.parquet``: one row per item, ``key`` string and ``embedding``
  fixed_size_list<float32>[d]. Read whole (:func:`read_embeddings`) for small corpora,
  or streamed (:func:`iter_embeddings`) when the index build must not hold it all.
* ``<emb>/tokens/``: the slow model's visual tokens ``φ(x)`` as float16, too big for
  Parquet cells to be read by key quickly. Each writer (one per Ray Data batch) writes
  its own shard: ``shard-<id>.f16`` (fixed-size records of ``T*D`` float16, row-major)
  and ``shard-<id>.keys.parquet`` (key -> row, plus the shape in the schema metadata),
  key table last so that its presence marks a complete shard. The shard id is a hash of
  the keys, so a retried batch overwrites its own files instead of adding a copy.
  :func:`finalize_token_store` (driver, after the writers) writes ``keys.parquet`` (key,
  shard, row, deduplicated) and ``manifest.json``; :class:`TokenStore` reads them and
  fetches any K keys with one memmap gather locally or one ``cat_ranges`` call on S3.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from thinkfast.errors import ThinkfastError
from thinkfast.utils import fs

logger = logging.getLogger(__name__)

FAST_DIR = "fast"
TOKENS_DIR = "tokens"
TOKEN_MANIFEST = "manifest.json"
TOKEN_KEY_TABLE = "keys.parquet"
TOKEN_FORMAT = "thinkfast-token-store"
TOKEN_DTYPE = np.float16
MAX_OPEN_SHARDS = 256  # memory-mapped token shards kept open per TokenStore (LRU)
_SHARD_DATA_SUFFIX = ".f16"
_SHARD_KEYS_SUFFIX = ".keys.parquet"


class StoreError(ThinkfastError):
    """An embeddings or token artifact is missing, has the wrong schema, or is damaged."""


class UnknownKeyError(StoreError, KeyError):
    """Keys asked of a :class:`TokenStore` that it does not hold (``.missing`` lists them)."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = list(missing)
        shown = ", ".join(repr(k) for k in self.missing[:5])
        more = f" (and {len(self.missing) - 5} more)" if len(self.missing) > 5 else ""
        super().__init__(f"{len(self.missing)} key(s) not in the token store: {shown}{more}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


# --------------------------------------------------------------------------- helpers


def resolve_artifact_dir(uri: str, sub: str, s3_endpoint: str | None) -> str:
    """``<emb>`` or ``<emb>/<sub>`` both name the artifact: prefer the sub-directory if present."""
    candidate = fs.join(uri, sub)
    filesystem = fs.fsspec_fs(uri, s3_endpoint)
    if filesystem.isdir(fs.strip_scheme(candidate)):
        return candidate
    return str(uri)


def _with_scheme(uri: str, path: str) -> str:
    return "s3://" + path if fs.is_s3(uri) else path


def list_parquet_files(uri: str, s3_endpoint: str | None = None) -> list[str]:
    """Sorted ``.parquet`` files under ``uri`` (a file or a directory, recursively)."""
    filesystem = fs.fsspec_fs(uri, s3_endpoint)
    path = fs.strip_scheme(uri)
    if not filesystem.exists(path):
        raise StoreError(f"no such file or directory: {uri}")
    if filesystem.isfile(path):
        return [str(uri)]
    found = sorted(p for p in filesystem.find(path) if p.endswith(".parquet"))
    if not found:
        raise StoreError(f"no .parquet files under {uri}")
    return [_with_scheme(uri, p) for p in found]


# --------------------------------------------------------------------------- fast embeddings


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
    shard by shard. Raises :class:`StoreError` on a wrong schema, nulls, or mixed dims."""
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


# --------------------------------------------------------------------------- slow-token store


def _keys_digest(keys: Sequence[str]) -> str:
    h = hashlib.sha1()
    for k in keys:
        h.update(k.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TokenShape:
    """Shape of one record: ``T`` visual tokens of width ``D``, stored as float16."""

    num_tokens: int  # T: tokens per item (all levels, all frames)
    dim: int  # D: token width

    @property
    def record_bytes(self) -> int:
        return self.num_tokens * self.dim * np.dtype(TOKEN_DTYPE).itemsize


class TokenStoreWriter:
    """Writes token shards into ``uri`` (``<emb>/tokens``); safe to use from many workers.

    Each :meth:`write` call makes one self-contained shard named by a hash of its keys:
    concurrent writers never share a file, and a retried batch rewrites its own shard.
    Construct it inside the worker (it holds no open handles, so it also pickles)."""

    def __init__(self, uri: str, s3_endpoint: str | None = None) -> None:
        self.uri = str(uri)
        self.s3_endpoint = s3_endpoint

    def write(self, keys: Sequence[str], tokens: np.ndarray) -> str:
        """Write ``tokens`` (B, T, D) for ``keys`` (B) as one shard; returns the shard id."""
        keys = [str(k) for k in keys]
        if tokens.ndim != 3:
            raise StoreError(f"tokens must be (B, T, D), got shape {tokens.shape}")
        if len(keys) != tokens.shape[0]:
            raise StoreError(f"{len(keys)} keys but {tokens.shape[0]} token rows")
        if len(set(keys)) != len(keys):
            raise StoreError("duplicate keys within one token batch")
        if not keys:
            raise StoreError("empty token batch")
        with np.errstate(over="ignore"):  # overflow is caught just below, as an error
            data = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)  # (B, T, D)
        if not np.isfinite(data).all():
            raise StoreError("tokens are NaN/inf (or overflow float16) for some rows; refusing to store them")
        shard = "shard-" + _keys_digest(keys)
        shape = TokenShape(int(data.shape[1]), int(data.shape[2]))
        filesystem = fs.fsspec_fs(self.uri, self.s3_endpoint)
        base = fs.strip_scheme(fs.join(self.uri, shard))
        if not fs.is_s3(self.uri):
            os.makedirs(fs.strip_scheme(self.uri), exist_ok=True)
        # data first, key table last: a key table always points at complete data
        _atomic_put(filesystem, base + _SHARD_DATA_SUFFIX, data.tobytes(), local=not fs.is_s3(self.uri))
        table = pa.table({"key": pa.array(keys, pa.string()), "row": pa.array(np.arange(len(keys)), pa.int64())})
        table = table.replace_schema_metadata(
            {"thinkfast.shape": f"{shape.num_tokens},{shape.dim}", "thinkfast.dtype": "float16"}
        )
        sink = io.BytesIO()
        pq.write_table(table, sink)
        _atomic_put(filesystem, base + _SHARD_KEYS_SUFFIX, sink.getvalue(), local=not fs.is_s3(self.uri))
        logger.debug("token shard %s: %d records of %s", shard, len(keys), shape)
        return shard


def _atomic_put(filesystem: Any, path: str, data: bytes, local: bool) -> None:
    """Whole-object write: S3 PUTs are atomic; locally write a temp file and rename."""
    if not local:
        filesystem.pipe_file(path, data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def finalize_token_store(uri: str, s3_endpoint: str | None = None) -> dict[str, Any]:
    """Index every complete shard under ``uri``: write ``keys.parquet`` and ``manifest.json``.

    Run once on the driver after the writers finish (re-running is safe). A key found in
    several shards (a batch re-run with different boundaries) keeps its first copy in
    shard-name order and is counted in ``duplicates_dropped``; mixed shapes are an error."""
    filesystem = fs.fsspec_fs(uri, s3_endpoint)
    root = fs.strip_scheme(uri).rstrip("/")
    if not filesystem.isdir(root):
        raise StoreError(f"no token store at {uri}")
    key_files = sorted(p for p in filesystem.ls(root, detail=False) if p.endswith(_SHARD_KEYS_SUFFIX))
    if not key_files:
        raise StoreError(f"{uri}: no token shards (expected shard-*{_SHARD_KEYS_SUFFIX})")
    shape: TokenShape | None = None
    shards: list[dict[str, Any]] = []
    seen: set[str] = set()
    out_keys: list[str] = []
    out_shard: list[int] = []
    out_row: list[int] = []
    dropped = 0
    for key_file in key_files:
        name = posixpath.basename(key_file)[: -len(_SHARD_KEYS_SUFFIX)]
        with filesystem.open(key_file, "rb") as f:
            table = pq.read_table(f)
        meta = table.schema.metadata or {}
        try:
            t, d = (int(v) for v in meta[b"thinkfast.shape"].decode().split(","))
        except (KeyError, ValueError) as exc:
            raise StoreError(f"{key_file}: key table lacks the thinkfast.shape metadata") from exc
        this = TokenShape(t, d)
        if shape is None:
            shape = this
        elif this != shape:
            raise StoreError(f"{key_file}: token shape {this} differs from {shape} in other shards")
        data_path = posixpath.join(root, name + _SHARD_DATA_SUFFIX)
        size = filesystem.size(data_path) if filesystem.exists(data_path) else -1
        if size != table.num_rows * shape.record_bytes:
            raise StoreError(
                f"{data_path}: {size} bytes, expected {table.num_rows * shape.record_bytes} "
                f"({table.num_rows} records); the shard is truncated or missing"
            )
        shard_index = len(shards)
        shards.append({"name": name, "count": table.num_rows})
        for key, row in zip(table.column("key").to_pylist(), table.column("row").to_pylist()):
            if key in seen:
                dropped += 1
                continue
            seen.add(key)
            out_keys.append(key)
            out_shard.append(shard_index)
            out_row.append(row)
    assert shape is not None
    key_table = pa.table(
        {
            "key": pa.array(out_keys, pa.string()),
            "shard": pa.array(out_shard, pa.int32()),
            "row": pa.array(out_row, pa.int64()),
        }
    )
    sink = io.BytesIO()
    pq.write_table(key_table, sink)
    local = not fs.is_s3(uri)
    _atomic_put(filesystem, posixpath.join(root, TOKEN_KEY_TABLE), sink.getvalue(), local=local)
    manifest = {
        "format": TOKEN_FORMAT,
        "version": 1,
        "dtype": "float16",
        "num_tokens": shape.num_tokens,
        "dim": shape.dim,
        "count": len(out_keys),
        "duplicates_dropped": dropped,
        "shards": shards,
    }
    fs.write_json(fs.join(uri, TOKEN_MANIFEST), manifest, s3_endpoint)
    if dropped:
        logger.warning("token store %s: %d duplicate key(s) from re-run batches ignored", uri, dropped)
    logger.info("token store %s: %d keys in %d shards, shape (%d, %d)", uri, len(out_keys), len(shards), *(t, d))
    return manifest


class TokenStore:
    """Random access to slow tokens by key: ``TokenStore.open(uri).get(keys) -> (K, T, D)``.

    Locally each shard is a read-only ``np.memmap`` (the OS page cache does the caching);
    on S3 the K records are fetched with one concurrent ``cat_ranges`` call."""

    def __init__(self, uri: str, manifest: dict[str, Any], key_table: pa.Table, s3_endpoint: str | None) -> None:
        self.uri = str(uri)
        self.manifest = manifest
        self.s3_endpoint = s3_endpoint
        self.token_shape = TokenShape(int(manifest["num_tokens"]), int(manifest["dim"]))
        self._shard_names: list[str] = [s["name"] for s in manifest["shards"]]
        keys = key_table.column("key").to_pylist()
        self._shard_of = np.asarray(key_table.column("shard"), dtype=np.int64)
        self._row_of = np.asarray(key_table.column("row"), dtype=np.int64)
        self._position = {k: i for i, k in enumerate(keys)}
        self._keys = keys
        self._memmaps: OrderedDict[int, np.memmap] = OrderedDict()  # LRU: each mapping holds a file descriptor
        self._fs: Any = None

    @classmethod
    def open(cls, uri: str, s3_endpoint: str | None = None) -> "TokenStore":
        """Open ``<emb>/tokens`` (or ``<emb>``); needs the manifest that finalize wrote."""
        uri = resolve_artifact_dir(uri, TOKENS_DIR, s3_endpoint)
        manifest_uri = fs.join(uri, TOKEN_MANIFEST)
        if not fs.exists(manifest_uri, s3_endpoint):
            raise StoreError(
                f"no token store manifest at {manifest_uri}; run thinkfast.store.finalize_token_store "
                "after writing the shards"
            )
        manifest = fs.read_json(manifest_uri, s3_endpoint)
        if manifest.get("format") != TOKEN_FORMAT:
            raise StoreError(f"{manifest_uri} is not a thinkfast token store manifest")
        filesystem = fs.fsspec_fs(uri, s3_endpoint)
        with filesystem.open(fs.strip_scheme(fs.join(uri, TOKEN_KEY_TABLE)), "rb") as f:
            key_table = pq.read_table(f)
        if key_table.num_rows != manifest["count"]:
            raise StoreError(f"{uri}: key table has {key_table.num_rows} rows, manifest says {manifest['count']}")
        return cls(uri, manifest, key_table, s3_endpoint)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(N, T, D)``: number of items, tokens per item, token width."""
        return (len(self._keys), self.token_shape.num_tokens, self.token_shape.dim)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._position

    def keys(self) -> list[str]:
        """All keys, in key-table order."""
        return list(self._keys)

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """Tokens of ``keys`` in the order asked: float16 (K, T, D). Unknown keys raise
        :class:`UnknownKeyError` (a ``KeyError`` and a ``ThinkfastError``)."""
        positions = [self._position.get(k, -1) for k in keys]
        missing = [k for k, p in zip(keys, positions) if p < 0]
        if missing:
            raise UnknownKeyError(missing)
        t, d = self.token_shape.num_tokens, self.token_shape.dim
        out = np.empty((len(keys), t, d), dtype=TOKEN_DTYPE)  # (K, T, D)
        if not keys:
            return out
        pos = np.asarray(positions, dtype=np.int64)
        shards, rows = self._shard_of[pos], self._row_of[pos]
        if fs.is_s3(self.uri):
            self._get_remote(shards, rows, out)
        else:
            for shard in np.unique(shards):
                mask = shards == shard
                out[mask] = self._memmap(int(shard))[rows[mask]]
        return out

    def _memmap(self, shard: int) -> np.memmap:
        mm = self._memmaps.get(shard)
        if mm is not None:
            self._memmaps.move_to_end(shard)
        else:
            t, d = self.token_shape.num_tokens, self.token_shape.dim
            path = fs.strip_scheme(fs.join(self.uri, self._shard_names[shard] + _SHARD_DATA_SUFFIX))
            count = int(self.manifest["shards"][shard]["count"])
            if os.path.getsize(path) != count * self.token_shape.record_bytes:
                raise StoreError(f"{path}: size does not match {count} records; the shard is damaged")
            mm = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(count, t, d))
            self._memmaps[shard] = mm
            if len(self._memmaps) > MAX_OPEN_SHARDS:  # one shard per embed batch: there can be thousands
                self._memmaps.popitem(last=False)
        return mm

    def _get_remote(self, shards: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        if self._fs is None:
            self._fs = fs.fsspec_fs(self.uri, self.s3_endpoint)
        size = self.token_shape.record_bytes
        root = fs.strip_scheme(self.uri).rstrip("/")
        paths = [posixpath.join(root, self._shard_names[s] + _SHARD_DATA_SUFFIX) for s in shards.tolist()]
        starts = [int(r) * size for r in rows.tolist()]
        ends = [s + size for s in starts]
        blobs = self._fs.cat_ranges(paths, starts, ends)
        for i, blob in enumerate(blobs):
            if isinstance(blob, Exception) or len(blob) != size:
                raise StoreError(f"{paths[i]}: short read at record {rows[i]}; the shard is damaged")
            out[i] = np.frombuffer(blob, dtype=TOKEN_DTYPE).reshape(out.shape[1:])

    def __getstate__(self) -> dict[str, Any]:
        # memmaps and s3fs clients are per process: reopen lazily after unpickling
        state = self.__dict__.copy()
        state["_memmaps"] = OrderedDict()
        state["_fs"] = None
        return state
