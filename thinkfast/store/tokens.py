"""Slow tokens: ``<emb>/tokens/``, the slow model's visual tokens ``φ(x)``, too big for
Parquet cells to be read by key quickly.

Two record formats (``token_format``, one per store): ``float16`` (``T*D`` float16,
row-major, ``2TD`` bytes) and ``int8`` (``T*D`` int8 codes then ``T`` float16 per-token
scales, ``T(D+2)`` bytes: 49.6% at D = 256; :mod:`thinkfast.store.quantize`). Readers
always get float16 back.

Each writer (one per Ray Data write call) writes its own shard: ``shard-<id>.f16`` (or
``.i8``: fixed-size records) and ``shard-<id>.keys.parquet`` (key ->
row, plus the shape in the schema metadata), key table last so that its presence marks a
complete shard. The shard id is a hash of the keys, so a retried batch overwrites its own
files instead of adding a copy. :func:`finalize_token_store` (driver, after the writers)
writes ``keys.parquet`` (key, shard, row, deduplicated) and ``manifest.json``;
:class:`TokenStore` reads them and fetches any K keys with one memmap gather locally or
one ``cat_ranges`` call on S3.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import threading
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from thinkfast.store.embeddings import keys_digest as _keys_digest
from thinkfast.store.errors import StoreError, UnknownKeyError
from thinkfast.store.layout import TOKENS_DIR, resolve_artifact_dir
from thinkfast.store.token_format import _DATA_SUFFIX, TOKEN_DTYPE, TOKEN_FORMATS, TokenShape, check_token_format  # noqa: F401 - re-exported
from thinkfast.utils import fs

if TYPE_CHECKING:
    import fsspec

logger = logging.getLogger(__name__)

TOKEN_MANIFEST = "manifest.json"
TOKEN_KEY_TABLE = "keys.parquet"
TOKEN_FORMAT = "thinkfast-token-store"
MAX_OPEN_SHARDS = 256  # memory-mapped token shards kept open per TokenStore (LRU)
_SHARD_DATA_SUFFIX = _DATA_SUFFIX["float16"]
_SHARD_KEYS_SUFFIX = ".keys.parquet"
CACHE_ENV = "THINKFAST_TOKEN_CACHE_MB"  # records kept in memory by a TokenStore on S3
DEFAULT_CACHE_MB = 256


class TokenStoreWriter:
    """Writes token shards into ``uri`` (``<emb>/tokens``); safe to use from many workers.

    Each :meth:`write` call makes one self-contained shard named by a hash of its keys:
    concurrent writers never share a file, and a retried batch rewrites its own shard.
    Construct it inside the worker (it holds no open handles, so it also pickles).
    ``token_format`` ``int8`` stores each token as int8 codes and a float16 scale."""

    def __init__(self, uri: str, s3_endpoint: str | None = None, token_format: str = "float16") -> None:
        self.uri = str(uri)
        self.s3_endpoint = s3_endpoint
        self.token_format = check_token_format(token_format)

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
        shape = TokenShape(int(data.shape[1]), int(data.shape[2]), self.token_format)
        filesystem = fs.fsspec_fs(self.uri, self.s3_endpoint)
        base = fs.strip_scheme(fs.join(self.uri, shard))
        if not fs.is_s3(self.uri):
            os.makedirs(fs.strip_scheme(self.uri), exist_ok=True)
        # data first, key table last: a key table always points at complete data
        _atomic_put(filesystem, base + shape.data_suffix, shape.encode(data), local=not fs.is_s3(self.uri))
        table = pa.table({"key": pa.array(keys, pa.string()), "row": pa.array(np.arange(len(keys)), pa.int64())})
        table = table.replace_schema_metadata(
            {"thinkfast.shape": f"{shape.num_tokens},{shape.dim}", "thinkfast.dtype": shape.token_format}
        )
        sink = io.BytesIO()
        pq.write_table(table, sink)
        _atomic_put(filesystem, base + _SHARD_KEYS_SUFFIX, sink.getvalue(), local=not fs.is_s3(self.uri))
        logger.debug("token shard %s: %d records of %s", shard, len(keys), shape)
        return shard


def _atomic_put(filesystem: "fsspec.AbstractFileSystem", path: str, data: bytes, local: bool) -> None:
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
        token_format = meta.get(b"thinkfast.dtype", b"float16").decode()
        if token_format not in TOKEN_FORMATS:
            raise StoreError(f"{key_file}: unknown token format {token_format!r}")
        this = TokenShape(t, d, token_format)
        if shape is None:
            shape = this
        elif this != shape:
            raise StoreError(f"{key_file}: token shape {this} differs from {shape} in other shards "
                             "(one store holds one shape and one format: re-embed into a new directory)")
        data_path = posixpath.join(root, name + shape.data_suffix)
        size = filesystem.size(data_path) if filesystem.exists(data_path) else -1
        records = _shard_records(table)  # rows in the data file; the key table may have dropped some
        if size != records * shape.record_bytes:
            raise StoreError(
                f"{data_path}: {size} bytes, expected {records * shape.record_bytes} "
                f"({records} records); the shard is truncated or missing"
            )
        shard_index = len(shards)
        shards.append({"name": name, "count": records})
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
        "dtype": shape.token_format,
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


def _shard_records(table: pa.Table) -> int:
    """Records in a shard's data file: the key table's ``thinkfast.records`` once keys were
    removed from it (:func:`remove_token_keys`), else its row count."""
    value = (table.schema.metadata or {}).get(b"thinkfast.records")
    return int(value) if value is not None else table.num_rows


def remove_token_keys(uri: str, keys: "set[str] | frozenset[str]", s3_endpoint: str | None = None,
                      *, finalize: bool = True) -> int:
    """Drop ``keys`` from every shard's key table under ``uri`` (``<emb>/tokens``) and
    re-index the store; returns how many (shard, key) entries went.

    Data files are never rewritten: a removed key's record stays as dead bytes (a
    running service's memmaps stay valid) and its key-table row goes, with the data
    file's record count kept in the table's ``thinkfast.records`` metadata. Each key
    table is replaced whole (temp + rename, one PUT on S3), so a crash leaves every shard
    either before or after; re-running finishes the job."""
    filesystem = fs.fsspec_fs(uri, s3_endpoint)
    root = fs.strip_scheme(uri).rstrip("/")
    if not keys or not filesystem.isdir(root):
        return 0
    local = not fs.is_s3(uri)
    removed = 0
    for key_file in sorted(p for p in filesystem.ls(root, detail=False) if p.endswith(_SHARD_KEYS_SUFFIX)):
        with filesystem.open(key_file, "rb") as f:
            table = pq.read_table(f)
        hit = pa.compute.is_in(table.column("key"), value_set=pa.array(sorted(keys), pa.string()))
        n = int(pa.compute.sum(hit).as_py() or 0)
        if not n:
            continue
        kept = table.filter(pa.compute.invert(hit))
        meta = dict(table.schema.metadata or {})
        meta[b"thinkfast.records"] = str(_shard_records(table)).encode()
        kept = kept.replace_schema_metadata(meta)
        sink = io.BytesIO()
        pq.write_table(kept, sink)
        _atomic_put(filesystem, key_file, sink.getvalue(), local=local)
        removed += n
    if removed and finalize:
        finalize_token_store(uri, s3_endpoint)
    logger.info("token store %s: removed %d key entr(ies)", uri, removed)
    return removed


class TokenStore:
    """Random access to slow tokens by key: ``TokenStore.open(uri).get(keys) -> (K, T, D)``.

    Locally each shard is a read-only ``np.memmap`` (the OS page cache does the caching);
    on S3 the records not in this store's LRU cache (``cache_mb``, default
    ``$THINKFAST_TOKEN_CACHE_MB`` or 256 MB; 0 turns it off) are fetched with one concurrent
    ``cat_ranges`` call. Either format reads back as float16."""

    def __init__(self, uri: str, manifest: dict[str, Any], key_table: pa.Table, s3_endpoint: str | None,
                 cache_mb: float | None = None) -> None:
        self.uri = str(uri)
        self.manifest = manifest
        self.s3_endpoint = s3_endpoint
        token_format = str(manifest.get("dtype", "float16"))
        if token_format not in TOKEN_FORMATS:
            raise StoreError(f"{uri}: unknown token format {token_format!r} in the manifest")
        self.token_shape = TokenShape(int(manifest["num_tokens"]), int(manifest["dim"]), token_format)
        if cache_mb is None:
            cache_mb = float(os.environ.get(CACHE_ENV, DEFAULT_CACHE_MB))
        if cache_mb < 0:
            raise StoreError(f"cache_mb must be >= 0, got {cache_mb}")
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()  # (shard, row) -> record, LRU
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0
        self._shard_names: list[str] = [s["name"] for s in manifest["shards"]]
        keys = key_table.column("key").to_pylist()
        self._shard_of = np.asarray(key_table.column("shard"), dtype=np.int64)
        self._row_of = np.asarray(key_table.column("row"), dtype=np.int64)
        self._position = {k: i for i, k in enumerate(keys)}
        self._keys = keys
        self._memmaps: OrderedDict[int, np.memmap] = OrderedDict()  # LRU: each mapping holds a file descriptor
        self._fs: "fsspec.AbstractFileSystem | None" = None

    @classmethod
    def open(cls, uri: str, s3_endpoint: str | None = None, cache_mb: float | None = None) -> "TokenStore":
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
        return cls(uri, manifest, key_table, s3_endpoint, cache_mb=cache_mb)

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
            unique = np.unique(shards)
            for shard in unique:
                mask = shards == shard
                records = self._memmap(int(shard))[rows[mask]]  # (k, record_bytes) uint8: one gather
                if len(unique) == 1:
                    self.token_shape.decode(records, out)
                    continue
                part = np.empty((len(records), t, d), dtype=TOKEN_DTYPE)
                self.token_shape.decode(records, part)
                out[mask] = part
        return out

    def _memmap(self, shard: int) -> np.memmap:
        mm = self._memmaps.get(shard)
        if mm is not None:
            self._memmaps.move_to_end(shard)
        else:
            path = fs.strip_scheme(fs.join(self.uri, self._shard_names[shard] + self.token_shape.data_suffix))
            count = int(self.manifest["shards"][shard]["count"])
            size = self.token_shape.record_bytes
            if os.path.getsize(path) != count * size:
                raise StoreError(f"{path}: size does not match {count} records; the shard is damaged")
            mm = np.memmap(path, dtype=np.uint8, mode="r", shape=(count, size))
            self._memmaps[shard] = mm
            if len(self._memmaps) > MAX_OPEN_SHARDS:  # one shard per embed batch: there can be thousands
                self._memmaps.popitem(last=False)
        return mm

    def _get_remote(self, shards: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        size = self.token_shape.record_bytes
        wanted = list(zip(shards.tolist(), rows.tolist()))
        blobs: list[bytes | None] = [None] * len(wanted)
        with self._lock:
            for i, ref in enumerate(wanted):
                blob = self._cache.get(ref)
                if blob is not None:
                    self._cache.move_to_end(ref)
                    blobs[i] = blob
        missing = sorted({ref for ref, blob in zip(wanted, blobs) if blob is None})
        self.cache_hits += len(wanted) - sum(blob is None for blob in blobs)
        self.cache_misses += len(missing)
        if missing:
            if self._fs is None:
                self._fs = fs.fsspec_fs(self.uri, self.s3_endpoint)
            root = fs.strip_scheme(self.uri).rstrip("/")
            paths = [posixpath.join(root, self._shard_names[s] + self.token_shape.data_suffix) for s, _ in missing]
            starts = [int(r) * size for _, r in missing]
            fetched = self._fs.cat_ranges(paths, starts, [s + size for s in starts])
            got: dict[tuple[int, int], bytes] = {}
            for ref, path, blob in zip(missing, paths, fetched):
                if isinstance(blob, Exception) or len(blob) != size:
                    raise StoreError(f"{path}: short read at record {ref[1]}; the shard is damaged")
                got[ref] = blob
            blobs = [blob if blob is not None else got[ref] for ref, blob in zip(wanted, blobs)]
            self._remember(got)
        records = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(wanted), size)  # type: ignore[arg-type]
        self.token_shape.decode(records, out)

    def _remember(self, records: dict[tuple[int, int], bytes]) -> None:
        """Keep fetched records up to ``cache_bytes``, evicting the least recently used."""
        if self.cache_bytes <= 0:
            return
        with self._lock:
            for ref, blob in records.items():
                if ref in self._cache or len(blob) > self.cache_bytes:
                    continue
                self._cache[ref] = blob
                self._cached_bytes += len(blob)
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= len(old)

    @property
    def cached_bytes(self) -> int:
        """Bytes of records held by the S3 cache now (never above ``cache_bytes``)."""
        return self._cached_bytes

    def __getstate__(self) -> dict[str, Any]:
        # memmaps and s3fs clients are per process: reopen lazily after unpickling
        state = self.__dict__.copy()
        state["_memmaps"] = OrderedDict()
        state["_fs"] = None
        state["_cache"] = OrderedDict()
        state["_cached_bytes"] = 0
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
