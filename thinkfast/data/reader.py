"""Streaming reads of corpus Parquet from a local path, ``file://`` or ``s3://``.

A corpus may be far larger than memory (img2dataset shards of 10k images each), so the
main entry point yields record batches file by file, row group by row group; only
``read_table`` materialises, and it is meant for small corpora and tests. S3 endpoint and
credentials come from the AWS environment variables or an explicit ``s3_endpoint``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from thinkfast.data.schema import CorpusColumns, validate_corpus_schema
from thinkfast.data.splits import check_split, splits_of
from thinkfast.errors import CorpusSchemaError, ThinkfastError
from thinkfast.utils import fs as fsutil

logger = logging.getLogger(__name__)


class CorpusNotFoundError(ThinkfastError):
    """The corpus URI does not exist or holds no Parquet files."""


@dataclass(frozen=True)
class CorpusInfo:
    """A corpus as found on storage: its files, validated columns and row count."""

    uri: str  # what the user passed
    files: tuple[str, ...]  # full URIs of the Parquet files, sorted
    columns: CorpusColumns  # validated column roles
    schema: pa.Schema  # schema of the first file
    num_rows: int  # sum of the files' footer row counts


def _with_scheme(uri: str, path: str) -> str:
    if fsutil.is_s3(uri):
        return "s3://" + path
    return path


def list_parquet_files(uri: str, s3_endpoint: str | None = None) -> list[str]:
    """All ``*.parquet`` files under ``uri`` (or ``uri`` itself if it is one), sorted;
    hidden and ``_``-prefixed files (``_SUCCESS``, ``_metadata``) are skipped."""
    filesystem, path = fsutil.arrow_fs(uri, s3_endpoint)
    try:
        info = filesystem.get_file_info(path)
    except OSError as exc:
        raise CorpusNotFoundError(f"cannot reach corpus {uri}: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise CorpusNotFoundError(f"corpus not found: {uri}")
    if info.type == pafs.FileType.File:
        return [_with_scheme(uri, path)]
    try:
        entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise CorpusNotFoundError(f"cannot list corpus {uri}: {exc}") from exc
    files = sorted(
        e.path for e in entries
        if e.type == pafs.FileType.File and e.path.endswith(".parquet")
        and not any(part.startswith(("_", ".")) for part in e.path[len(path):].split("/") if part)
    )
    if not files:
        raise CorpusNotFoundError(f"no .parquet files under {uri}")
    return [_with_scheme(uri, f) for f in files]


def _open(file_uri: str, s3_endpoint: str | None) -> pq.ParquetFile:
    filesystem, path = fsutil.arrow_fs(file_uri, s3_endpoint)
    try:
        return pq.ParquetFile(filesystem.open_input_file(path))
    except (OSError, pa.ArrowInvalid) as exc:
        raise CorpusSchemaError(f"{file_uri} is not a readable Parquet file: {exc}") from exc


def read_schema(uri: str, s3_endpoint: str | None = None) -> pa.Schema:
    """Schema of the first Parquet file of a corpus (footer only)."""
    return _open(list_parquet_files(uri, s3_endpoint)[0], s3_endpoint).schema_arrow


def inspect_corpus(uri: str, s3_endpoint: str | None = None) -> CorpusInfo:
    """List, validate and count a corpus from its footers; every file must validate the
    same way (a shard with ``caption`` next to one with ``captions`` is an error)."""
    files = list_parquet_files(uri, s3_endpoint)
    first_schema: pa.Schema | None = None
    columns: CorpusColumns | None = None
    num_rows = 0
    for f in files:
        pf = _open(f, s3_endpoint)
        try:
            cols = validate_corpus_schema(pf.schema_arrow)
        except CorpusSchemaError as exc:
            raise CorpusSchemaError(f"{f}: {exc}") from exc
        if columns is None:
            first_schema, columns = pf.schema_arrow, cols
        elif cols != columns:
            raise CorpusSchemaError(f"{f} has columns {cols} but {files[0]} has {columns}")
        num_rows += pf.metadata.num_rows
    assert columns is not None and first_schema is not None
    return CorpusInfo(uri=uri, files=tuple(files), columns=columns, schema=first_schema, num_rows=num_rows)


def iter_batches(
    uri: str,
    columns: Sequence[str] | None = None,
    batch_size: int = 256,
    s3_endpoint: str | None = None,
    filter_split: str | None = None,
    key_column: str = "key",
) -> Iterator[pa.RecordBatch]:
    """Stream the corpus as record batches of at most ``batch_size`` rows.

    ``filter_split`` keeps only the rows of that split: those whose ``split`` column equals
    it, or, in a file without a ``split`` column, those whose key hashes to it
    (:func:`thinkfast.data.splits.split_of_key`, the split training holds out), so every
    reader of a corpus agrees on its val / test rows. The column used for the filter is
    read even when ``columns`` leaves it out, and dropped again.
    """
    wanted = list(columns) if columns is not None else None
    for file_uri in list_parquet_files(uri, s3_endpoint):
        pf = _open(file_uri, s3_endpoint)
        names = set(pf.schema_arrow.names)
        by_column = "split" in names
        filter_col = None if filter_split is None else ("split" if by_column else key_column)
        if filter_split is not None and not by_column:
            try:
                check_split(filter_split)
            except ValueError as exc:  # a typo would silently select nothing
                raise ThinkfastError(f"{file_uri} has no 'split' column to filter on: {exc}") from exc
        read_cols = wanted
        if filter_col is not None and wanted is not None and filter_col not in wanted:
            read_cols = wanted + [filter_col]
        missing = [c for c in (read_cols or []) if c not in names]
        if filter_col is not None and filter_col not in names:
            missing.append(filter_col)
        if missing:
            raise CorpusSchemaError(f"{file_uri} has no column '{missing[0]}'")
        for batch in pf.iter_batches(batch_size=batch_size, columns=read_cols):
            if filter_split is not None:
                if by_column:
                    mask = pc.equal(batch.column("split"), filter_split)
                else:
                    keys = batch.column(key_column).to_pylist()
                    mask = pa.array([s == filter_split for s in splits_of(keys, None)], type=pa.bool_())
                batch = batch.filter(mask)
                if wanted is not None and filter_col not in wanted:
                    batch = batch.select(wanted)
            if batch.num_rows:
                yield batch


def read_table(
    uri: str,
    columns: Sequence[str] | None = None,
    filter_split: str | None = None,
    s3_endpoint: str | None = None,
    key_column: str = "key",
) -> pa.Table:
    """The whole (filtered) corpus as one table: for small corpora, tests and evaluation.
    ``filter_split`` as in :func:`iter_batches` (the ``split`` column, else the key hash)."""
    batches = list(iter_batches(uri, columns, batch_size=4096, s3_endpoint=s3_endpoint, filter_split=filter_split,
                                key_column=key_column))
    if batches:
        return pa.Table.from_batches(batches)
    schema = read_schema(uri, s3_endpoint)
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    return schema.empty_table()


def write_table(table: pa.Table, uri: str, s3_endpoint: str | None = None, row_group_size: int = 256) -> None:
    """Write one Parquet file to a local path or ``s3://`` (parent folders made locally)."""
    filesystem, path = fsutil.arrow_fs(uri, s3_endpoint)
    try:
        if not fsutil.is_s3(uri):
            fsutil.makedirs(path.rsplit("/", 1)[0] if "/" in path else ".")
        pq.write_table(table, path, filesystem=filesystem, row_group_size=row_group_size, compression="zstd")
    except OSError as exc:  # missing bucket, no permission, disk full: one clear line
        raise ThinkfastError(f"cannot write {uri}: {exc}") from exc
