"""What an ``embed`` run writes under ``<emb>`` and how a re-run replaces it.

Every file is named by a hash of the keys it holds (:func:`keys_digest`, salted per
output), so a retried write task rewrites its own files instead of adding copies.
Re-runs: the previous run's ``manifest.json`` is deleted first (a half-cleared directory
never looks finished), then its ``fast/ tokens/ rejected/ texts/``; nothing else under
``<emb>`` is touched.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from thinkfast.store.embeddings import keys_digest, write_embeddings
from thinkfast.store.layout import (
    EMBED_MANIFEST,
    EMBED_OUTPUT_DIRS,
    FAILED_EMBED_MANIFEST,
    INCREMENTAL_MARKER,
    fast_dir,
    rejected_dir,
    texts_dir,
    tokens_dir,
)
from thinkfast.store.stream import TEXTS_COLUMNS, split_media
from thinkfast.store.tokens import TokenStoreWriter
from thinkfast.utils import fs

logger = logging.getLogger(__name__)


def write_parquet(table: pa.Table, uri: str, s3_endpoint: str | None = None) -> str:
    """One Parquet file at ``uri`` (parent directories made locally); returns ``uri``."""
    filesystem, path = fs.arrow_fs(uri, s3_endpoint)
    if not fs.is_s3(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, filesystem=filesystem)
    return uri


def write_rejected(out: str, rejected: pa.Table, s3_endpoint: str | None = None) -> str | None:
    """``<out>/rejected/part-<hash>.parquet`` of a REJECT_SCHEMA table; None when empty."""
    if not rejected.num_rows:
        return None
    name = f"part-{keys_digest(rejected.column('key').to_pylist(), 'rejected')}.parquet"
    return write_parquet(rejected, fs.join(rejected_dir(out), name), s3_endpoint)


def write_media_bundle(out: str, table: pa.Table, s3_endpoint: str | None = None,
                       token_format: str = "float16") -> dict[str, int]:
    """Split one embed-stage bundle into ``fast/``, one ``tokens/`` shard (records in
    ``token_format``) and ``rejected/``.

    Returns its counts: ``rows``, ``embedded``, ``rejected`` and one
    ``rejected:<stage>:<reason>`` per reason (summed over bundles on the driver)."""
    bundle = split_media(table)
    counts: Counter = Counter(rows=table.num_rows)
    if bundle.vectors is not None:
        write_embeddings(fast_dir(out), bundle.keys, bundle.vectors, s3_endpoint=s3_endpoint)
    if bundle.tokens is not None:
        TokenStoreWriter(tokens_dir(out), s3_endpoint, token_format=token_format).write(bundle.keys, bundle.tokens)
    counts["embedded"] = len(bundle.keys)
    write_rejected(out, bundle.rejected, s3_endpoint)
    for reason in bundle.rejected_reasons():
        counts[f"rejected:{reason}"] += 1
    counts["rejected"] = bundle.rejected.num_rows
    return dict(counts)


def write_texts_bundle(out: str, table: pa.Table, s3_endpoint: str | None = None) -> dict[str, int]:
    """The non-blank captions of one bundle into ``texts/part-<hash>.parquet``; their counts."""
    table = table.select(TEXTS_COLUMNS)
    good = table.filter(pc.is_valid(table.column("caption")))
    if good.num_rows:
        ids = [f"{k}\x1f{i}" for k, i in zip(good.column("key").to_pylist(), good.column("caption_index").to_pylist())]
        write_parquet(good, fs.join(texts_dir(out), f"part-{keys_digest(ids, 'texts')}.parquet"), s3_endpoint)
    return {"rows": table.num_rows, "texts": good.num_rows, "texts_skipped_blank": table.num_rows - good.num_rows}


def clear_embed_outputs(out: str, s3_endpoint: str | None = None) -> list[str]:
    """Delete the previous run's outputs: manifest first (so a half-cleared dir never
    looks finished), then fast/ tokens/ rejected/ texts/. Returns what was removed."""
    filesystem = fs.fsspec_fs(out, s3_endpoint)
    removed = []
    # digests.parquet is replaced whole at the end of the run; removed.parquet stays (deletes stick)
    for name in (EMBED_MANIFEST, FAILED_EMBED_MANIFEST, INCREMENTAL_MARKER) + EMBED_OUTPUT_DIRS:
        path = fs.strip_scheme(fs.join(out, name))
        if filesystem.exists(path):
            filesystem.rm(path, recursive=True)
            removed.append(name)
    if removed:
        logger.info("removed previous outputs under %s: %s", out, ", ".join(removed))
    if hasattr(filesystem, "invalidate_cache"):
        filesystem.invalidate_cache()
    return removed


def files_inside_outputs(files: Sequence[str], out: str) -> list[tuple[str, str]]:
    """``(file, output dir)`` for each of ``files`` that lies inside a directory a run at
    ``out`` replaces: clearing ``out`` must never delete, say, corpus files."""
    found = []
    for name in EMBED_OUTPUT_DIRS:
        prefix = fs.strip_scheme(fs.join(out, name)).rstrip("/") + "/"
        found += [(f, fs.join(out, name)) for f in files if fs.strip_scheme(f).startswith(prefix)]
    return found
