"""Streaming reads of corpus Parquet from a local path, ``file://`` or ``s3://``.

A corpus may be far larger than memory (img2dataset shards of 10k images each), so the
main entry point yields record batches file by file, row group by row group; only
``read_table`` materialises, and it is meant for small corpora and tests. S3 endpoint and
credentials come from the AWS environment variables or an explicit ``s3_endpoint``.

img2dataset's webdataset output (``.tar`` shards + a metadata Parquet per shard) is a
corpus too, but only for callers that ask (``inspect_corpus(..., webdataset=True)``, as
``thinkfast embed`` does): the rows are then read by
:mod:`thinkfast.data.img2dataset`, not by :func:`iter_batches`, which reads Parquet only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
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
    format: str = "parquet"  # "parquet" | "webdataset" (files are then img2dataset's .tar shards)
    metadata_files: tuple[str, ...] = ()  # webdataset: each tar's metadata Parquet, every row

    @property
    def key_files(self) -> tuple[str, ...]:
        """The Parquet files that list every row's key (scanned for repeated keys)."""
        return self.metadata_files if self.format == "webdataset" else self.files


def _with_scheme(uri: str, path: str) -> str:
    if fsutil.is_s3(uri):
        return "s3://" + path
    return path


def list_parquet_files(uri: str, s3_endpoint: str | None = None) -> list[str]:
    """All ``*.parquet`` files under ``uri`` (or ``uri`` itself if it is one), sorted;
    hidden and ``_``-prefixed files (``_SUCCESS``, ``_metadata``) are skipped."""
    return list_files(uri, ".parquet", s3_endpoint)


def list_files(uri: str, suffix: str, s3_endpoint: str | None = None, required: bool = True) -> list[str]:
    """All files ending in ``suffix`` under ``uri`` (or ``uri`` itself if it is a file), as
    :func:`list_parquet_files`; an empty list instead of an error when not ``required``."""
    filesystem, path = fsutil.arrow_fs(uri, s3_endpoint)
    try:
        info = filesystem.get_file_info(path)
    except OSError as exc:
        raise CorpusNotFoundError(f"cannot reach corpus {uri}: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise CorpusNotFoundError(f"corpus not found: {uri}")
    if info.type == pafs.FileType.File:
        return [_with_scheme(uri, path)] if required or path.endswith(suffix) else []
    try:
        entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise CorpusNotFoundError(f"cannot list corpus {uri}: {exc}") from exc
    files = sorted(
        e.path for e in entries
        if e.type == pafs.FileType.File and e.path.endswith(suffix)
        and not any(part.startswith(("_", ".")) for part in e.path[len(path):].split("/") if part)
    )
    if not files and required:
        raise CorpusNotFoundError(f"no {suffix} files under {uri}")
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


def inspect_corpus(uri: str, s3_endpoint: str | None = None, *, webdataset: bool = False) -> CorpusInfo:
    """List, validate and count a corpus from its footers; every file must validate the
    same way (a shard with ``caption`` next to one with ``captions`` is an error).

    A folder of ``.tar`` shards is img2dataset's webdataset output: with ``webdataset``
    it is inspected as such (:func:`inspect_webdataset`), else refused in one line (this
    caller reads Parquet rows itself)."""
    tars = list_files(uri, ".tar", s3_endpoint, required=False)
    if tars:
        if webdataset:
            return inspect_webdataset(uri, tars, s3_endpoint)
        raise CorpusSchemaError(
            f"{uri} holds webdataset .tar shards (img2dataset --output_format webdataset); only thinkfast embed "
            "reads those: for this command run img2dataset with --output_format parquet")
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


def inspect_webdataset(uri: str, tars: Sequence[str], s3_endpoint: str | None = None) -> CorpusInfo:
    """img2dataset webdataset shards as a corpus: the rows are those of the metadata
    Parquet next to each tar (failed ones included), the image column is named after the
    first sample's image extension. Reads footers and one tar's first sample only."""
    from thinkfast.data import img2dataset

    media = img2dataset.image_suffix(tars[0], s3_endpoint)
    metadata = tuple(img2dataset.metadata_file(t) for t in tars)
    num_rows = sum(img2dataset.check_metadata(m, s3_endpoint) for m in metadata)
    schema = img2dataset.webdataset_schema(media)
    return CorpusInfo(uri=uri, files=tuple(tars), columns=validate_corpus_schema(schema), schema=schema,
                      num_rows=num_rows, format=img2dataset.WEBDATASET_FORMAT, metadata_files=metadata)


@dataclass(frozen=True)
class DuplicateKeys:
    """The keys a corpus holds more than once, and where: ``occurrences[key]`` lists
    ``(file URI, row index in that file)`` in file path order, then row order, so "the
    first occurrence" means the same row on every run and every machine. Falsy when the
    corpus has no repeated key."""

    occurrences: dict[str, list[tuple[str, int]]]  # key -> places, first occurrence first

    @property
    def keys(self) -> list[str]:
        """The repeated keys, in the order of their first occurrence."""
        return list(self.occurrences)

    @property
    def num_rows(self) -> int:
        """Rows that carry a repeated key (every occurrence counted)."""
        return sum(len(v) for v in self.occurrences.values())

    @property
    def extra_rows(self) -> int:
        """Rows beyond the first occurrence of each repeated key."""
        return self.num_rows - len(self.occurrences)

    def __bool__(self) -> bool:
        return bool(self.occurrences)

    def describe(self, max_keys: int = 5) -> str:
        """One line: how many keys, how many rows, and the first few with their places."""
        shown = []
        for key in self.keys[:max_keys]:
            places = self.occurrences[key]
            where = ", ".join(f"{f.rsplit('/', 1)[-1]} row {r}" for f, r in places[:3])
            more = f", +{len(places) - 3} more" if len(places) > 3 else ""
            shown.append(f"{key!r} ({len(places)}x: {where}{more})")
        rest = len(self.occurrences) - len(shown)
        return (f"{len(self.occurrences)} key(s) occur more than once ({self.num_rows} rows): "
                + "; ".join(shown) + (f"; and {rest} more" if rest > 0 else ""))


def find_duplicate_keys(corpus: CorpusInfo, s3_endpoint: str | None = None) -> DuplicateKeys:
    """Scan only the key column of every file of ``corpus`` (cheap next to the media:
    a few bytes a row) and return the keys that occur more than once.

    Null keys are not duplicates (embed rejects them as ``missing_key``). Memory: the key
    column of the whole corpus at once (Arrow strings, about key length + 4 bytes a row,
    e.g. ~250 MB for 10M keys of 20 characters); the positions are kept for repeated keys
    only."""
    key_column = corpus.columns.key
    parts = []
    files = corpus.key_files
    for file_index, file_uri in enumerate(files):
        keys = _open(file_uri, s3_endpoint).read(columns=[key_column]).column(key_column)
        n = len(keys)
        parts.append(pa.table({
            "key": keys.cast(pa.string()),
            "file": pa.array(np.full(n, file_index, dtype=np.int32)),
            "row": pa.array(np.arange(n, dtype=np.int64)),
        }))
    if not parts:
        return DuplicateKeys({})
    table = pa.concat_tables(parts)
    table = table.filter(pc.is_valid(table.column("key")))
    counts = table.group_by("key").aggregate([("row", "count")])
    repeated = counts.filter(pc.greater(counts.column("row_count"), 1)).column("key")
    if not len(repeated):
        return DuplicateKeys({})
    places = table.filter(pc.is_in(table.column("key"), value_set=repeated.combine_chunks()))
    places = places.sort_by([("file", "ascending"), ("row", "ascending")])
    occurrences: dict[str, list[tuple[str, int]]] = {}
    for key, f, r in zip(*(places.column(c).to_pylist() for c in ("key", "file", "row"))):
        occurrences.setdefault(key, []).append((files[f], int(r)))
    logger.warning("corpus %s: %d repeated key(s) in %d rows", corpus.uri, len(occurrences),
                   sum(len(v) for v in occurrences.values()))
    return DuplicateKeys(occurrences)


def read_rows(file_uri: str, rows: Sequence[int], columns: Sequence[str],
              s3_endpoint: str | None = None) -> pa.Table:
    """``rows`` (indices into ``file_uri``, in that order) of ``columns``, reading only the
    row groups that hold them: the driver fetches the few rows it must treat specially
    (the kept copy of a repeated key) without reading the file. The metadata Parquet of a
    webdataset shard lacks the image: those rows are completed from the shard's tar."""
    pf = _open(file_uri, s3_endpoint)
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        from thinkfast.data import img2dataset

        tar_uri = img2dataset.tar_file(file_uri)
        if not file_uri.endswith(".parquet") or not fsutil.exists(tar_uri, s3_endpoint):
            raise CorpusSchemaError(f"{file_uri} has no column '{missing[0]}'")
        meta = read_rows(file_uri, rows, [c for c in columns if c not in missing], s3_endpoint)
        media = next((c for c in missing if c in img2dataset.IMAGE_MEDIA), "jpg")
        return img2dataset.rows_by_key(meta, tar_uri, media, s3_endpoint).select(list(columns))
    starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
    wanted = np.asarray(list(rows), dtype=np.int64)
    groups = sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in wanted})
    if not groups:
        return pf.schema_arrow.empty_table().select(list(columns))
    block = pa.concat_tables([pf.read_row_group(g, columns=list(columns)) for g in groups])
    base = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups])  # file row of each block row
    return block.take(pa.array(np.searchsorted(base, wanted)))


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
