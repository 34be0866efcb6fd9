"""A growing (and shrinking) embeddings directory: content digests, removed keys, and
dropping keys from every file under ``<emb>`` without writing anything twice.

    <emb>/digests.parquet   key, digest: the media each embedded key was embedded from
    <emb>/removed.parquet   key: keys removed from the corpus (never re-embedded by --incremental)

A digest is a BLAKE2b-128 of the corpus media cell: the encoded bytes of a ``jpg`` /
``mp4`` column, the URL string of a ``url`` column (the bytes behind a URL are fetched
by the decode stage only; a changed URL is a changed item, new bytes behind the same URL
are not seen). Both files are small (tens of bytes a key) and replaced whole on every
change (temp + rename, one PUT on S3).

``drop_keys_from_parquet_dir`` rewrites only the Parquet parts that hold one of the keys,
under the same name (so a later re-run still replaces rather than adds). Token records
are dropped from the token store's key tables (:func:`thinkfast.store.tokens.remove_token_keys`).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from thinkfast.store.layout import (
    DIGESTS_FILE,
    REMOVED_FILE,
    fast_dir,
    find_embed_manifest,
    rejected_dir,
    texts_dir,
    tokens_dir,
    write_embed_manifest,
)
from thinkfast.store.outputs import write_parquet
from thinkfast.utils import fs

logger = logging.getLogger(__name__)


def media_digest(value: object) -> str:
    """32 hex digits naming a media cell's content ("" for a missing one)."""
    if value is None:
        return ""
    if isinstance(value, str):
        data = b"url:" + value.encode("utf-8")
    else:
        data = bytes(value)  # type: ignore[arg-type]
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def digest_table(keys: list[str], media: Iterable[object]) -> pa.Table:
    """(key, digest) of corpus rows; what the incremental pre-pass computes per block."""
    return pa.table({"key": pa.array(keys, pa.string()),
                     "digest": pa.array([media_digest(v) for v in media], pa.string())})


def _read_small(uri: str, s3_endpoint: str | None) -> pa.Table | None:
    if not fs.exists(uri, s3_endpoint):
        return None
    filesystem, path = fs.arrow_fs(uri, s3_endpoint)
    return pq.read_table(path, filesystem=filesystem)


def read_digests(emb: str, s3_endpoint: str | None = None) -> dict[str, str] | None:
    """key -> digest of every embedded key; None for a directory written before digests."""
    table = _read_small(fs.join(emb, DIGESTS_FILE), s3_endpoint)
    if table is None:
        return None
    return dict(zip(table.column("key").to_pylist(), table.column("digest").to_pylist()))


def write_digests(emb: str, digests: dict[str, str], s3_endpoint: str | None = None) -> str:
    keys = sorted(digests)
    table = pa.table({"key": pa.array(keys, pa.string()), "digest": pa.array([digests[k] for k in keys], pa.string())})
    return _replace(fs.join(emb, DIGESTS_FILE), table, s3_endpoint)


def read_removed(emb: str, s3_endpoint: str | None = None) -> set[str]:
    """Keys removed from the corpus (:func:`remove_from_embeddings`); empty if none."""
    table = _read_small(fs.join(emb, REMOVED_FILE), s3_endpoint)
    return set(table.column("key").to_pylist()) if table is not None else set()


def write_removed(emb: str, keys: set[str], s3_endpoint: str | None = None) -> str:
    return _replace(fs.join(emb, REMOVED_FILE), pa.table({"key": pa.array(sorted(keys), pa.string())}), s3_endpoint)


def _replace(uri: str, table: pa.Table, s3_endpoint: str | None) -> str:
    """One Parquet file replaced whole: temp + rename locally, one PUT on S3."""
    if fs.is_s3(uri):
        return write_parquet(table, uri, s3_endpoint)
    import os
    import uuid

    path = fs.strip_scheme(uri)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    write_parquet(table, tmp)
    os.replace(tmp, path)
    return uri


def parquet_keys(directory: str, s3_endpoint: str | None = None) -> list[str]:
    """Every ``key`` of the Parquet parts under ``directory`` (key column only); [] if absent."""
    from thinkfast.store.layout import list_parquet_files

    if not fs.exists(directory, s3_endpoint):
        return []
    filesystem = fs.fsspec_fs(directory, s3_endpoint)
    if not filesystem.isdir(fs.strip_scheme(directory)) or not filesystem.find(fs.strip_scheme(directory)):
        return []
    keys: list[str] = []
    for f in list_parquet_files(directory, s3_endpoint):
        arrow_fs, path = fs.arrow_fs(f, s3_endpoint)
        keys += pq.read_table(path, columns=["key"], filesystem=arrow_fs).column("key").to_pylist()
    return keys


def drop_keys_from_parquet_dir(directory: str, keys: set[str] | frozenset[str],
                               s3_endpoint: str | None = None) -> int:
    """Rewrite the parts under ``directory`` that hold any of ``keys`` without those rows
    (a part left empty is deleted); returns the rows dropped."""
    from thinkfast.store.layout import list_parquet_files

    if not keys or not fs.exists(directory, s3_endpoint):
        return 0
    filesystem = fs.fsspec_fs(directory, s3_endpoint)
    if not filesystem.find(fs.strip_scheme(directory)):
        return 0
    value_set = pa.array(sorted(keys), pa.string())
    dropped = 0
    for f in list_parquet_files(directory, s3_endpoint):
        arrow_fs, path = fs.arrow_fs(f, s3_endpoint)
        table = pq.read_table(path, filesystem=arrow_fs)
        hit = pc.is_in(table.column("key"), value_set=value_set)
        n = int(pc.sum(hit).as_py() or 0)
        if not n:
            continue
        kept = table.filter(pc.invert(hit))
        if kept.num_rows:
            _replace(f, kept, s3_endpoint)
        else:
            filesystem.rm_file(fs.strip_scheme(f))
        dropped += n
    return dropped


def drop_keys_everywhere(emb: str, keys: set[str], s3_endpoint: str | None = None,
                         *, rejected: bool = True) -> dict[str, int]:
    """Drop ``keys`` from fast/, tokens/, texts/ (and rejected/) and the digest table;
    returns the rows dropped per output. Used by removals and by ``--reembed-changed``
    (the old rows go before the new ones are written)."""
    from thinkfast.store.tokens import remove_token_keys

    counts = {"fast": drop_keys_from_parquet_dir(fast_dir(emb), keys, s3_endpoint),
              "texts": drop_keys_from_parquet_dir(texts_dir(emb), keys, s3_endpoint),
              "tokens": remove_token_keys(tokens_dir(emb), keys, s3_endpoint)}  # re-indexes the store
    if rejected:
        counts["rejected"] = drop_keys_from_parquet_dir(rejected_dir(emb), keys, s3_endpoint)
    digests = read_digests(emb, s3_endpoint)
    if digests is not None and keys & digests.keys():
        write_digests(emb, {k: v for k, v in digests.items() if k not in keys}, s3_endpoint)
    return counts


def remove_from_embeddings(emb: str, keys: Iterable[str], s3_endpoint: str | None = None) -> dict[str, int]:
    """Remove ``keys`` from the embeddings directory ``emb``: fast/, tokens/, texts/,
    rejected/ and the digests lose them, ``removed.parquet`` gains them (so the serving
    catalog hides them and ``embed --incremental`` never embeds them again), and the
    manifest's counts are updated. Keys ``emb`` never held are still recorded as removed
    (a takedown list may name keys of shards not embedded yet). Returns the counts."""
    keys = {str(k) for k in keys}
    counts = drop_keys_everywhere(emb, keys, s3_endpoint)
    removed = read_removed(emb, s3_endpoint)
    counts["newly_recorded"] = len(keys - removed)
    write_removed(emb, removed | keys, s3_endpoint)
    manifest = find_embed_manifest(emb, s3_endpoint)
    if manifest is not None:
        totals = dict(manifest.incremental or {"total_embedded": manifest.counts.embedded or 0})
        totals["total_embedded"] = max(0, int(totals.get("total_embedded", 0)) - counts["fast"])
        totals["total_removed"] = len(removed | keys)
        write_embed_manifest(emb, manifest.replace(incremental=totals), s3_endpoint)
    logger.info("removed %d key(s) from %s: %s", len(keys), emb, counts)
    return counts
