"""img2dataset's webdataset output as a corpus: ``.tar`` shards plus one Parquet per shard.

``img2dataset --output_format webdataset`` writes, per shard ``NNNNN``:

- ``NNNNN.tar``: for each image it *did* fetch, ``KEY.jpg`` (or ``.png`` / ``.webp``, its
  ``--encode_format``), ``KEY.txt`` (the caption) and ``KEY.json`` (the row's metadata:
  ``key``, ``caption``, ``url``, ``status``, ``error_message``, sizes, ...);
- ``NNNNN.parquet``: the same metadata for *every* row of the shard, failed ones included
  (``status`` ``failed_to_download`` / ``failed_to_resize`` / ..., no image anywhere);
- ``NNNNN_stats.json``: counts (not read here: the Parquet has the rows themselves).

So the corpus's rows are the Parquet rows: the successful ones take their image and
caption from the tar, the failed ones come from the Parquet with no image, and embed
rejects them with img2dataset's reason (:func:`thinkfast.data.media.media_of`). The rows
come out in the corpus layout (:data:`webdataset_schema`), the same columns as
img2dataset's own Parquet output, so everything downstream of the reader is shared.

This module is the plain-Python reader (``tarfile``, streaming, local or ``s3://``) used
in-process and for the few rows the driver reads by key; ``thinkfast embed`` reads the
shards with Ray Data's ``read_webdataset`` and converts each batch with
:func:`samples_table` (``thinkfast_pipelines.embed.stages.read_corpus``).
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import tarfile
from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from thinkfast.data.schema import ERROR_COLUMN, IMAGE_MEDIA, STATUS_COLUMN, SUCCESS
from thinkfast.errors import CorpusSchemaError
from thinkfast.utils import fs as fsutil

logger = logging.getLogger(__name__)

WEBDATASET_FORMAT = "webdataset"
# the sample key and extension of a tar member, as the webdataset spec (and Ray) split it
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def webdataset_schema(media: str = "jpg") -> pa.Schema:
    """The rows a webdataset corpus yields: img2dataset's Parquet-output columns."""
    return pa.schema([
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field(STATUS_COLUMN, pa.string()),
        pa.field(ERROR_COLUMN, pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field(media, pa.binary()),
    ])


def metadata_file(tar_uri: str) -> str:
    """The Parquet img2dataset writes next to ``tar_uri`` (``00000.tar`` -> ``00000.parquet``)."""
    return tar_uri[: -len(".tar")] + ".parquet"


def tar_file(parquet_uri: str) -> str:
    return parquet_uri[: -len(".parquet")] + ".tar"


# --------------------------------------------------------------------------- tar samples


def iter_tar_samples(tar_uri: str, s3_endpoint: str | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one tar, streaming: ``{"__key__": KEY, "jpg": bytes, "txt": bytes,
    ...}`` per run of consecutive members that share a key (the webdataset rule)."""
    filesystem, path = fsutil.arrow_fs(tar_uri, s3_endpoint)
    try:
        stream = filesystem.open_input_stream(path)
    except OSError as exc:
        raise CorpusSchemaError(f"cannot open webdataset shard {tar_uri}: {exc}") from exc
    sample: dict[str, Any] | None = None
    with stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    match = _MEMBER.match(member.name) if member.isreg() else None
                    if match is None:
                        continue
                    prefix, suffix = match.group(1), match.group(2).lower()
                    data = tar.extractfile(member).read()
                    if sample is None or sample["__key__"] != prefix:
                        if sample is not None:
                            yield sample
                        sample = {"__key__": prefix}
                    sample[suffix] = data
        except tarfile.TarError as exc:
            raise CorpusSchemaError(f"{tar_uri} is not a readable tar file: {exc}") from exc
    if sample is not None:
        yield sample


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):  # NaN: pandas' missing
        return None
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


def samples_table(samples: Iterable[dict[str, Any]], media: str) -> pa.Table:
    """Tar samples (this module's, or Ray ``read_webdataset(decoder=None)`` rows) -> rows
    of :func:`webdataset_schema`. The key and metadata come from ``KEY.json`` (the key
    img2dataset recorded), the caption from ``KEY.txt``, falling back to each other."""
    rows = []
    for sample in samples:
        meta_text = _text(sample.get("json"))
        meta = json.loads(meta_text) if meta_text else {}
        caption = _text(sample.get("txt"))
        image = sample.get(media)
        rows.append({
            "key": str(meta.get("key") or posixpath.basename(str(sample["__key__"]))),
            "caption": caption if caption is not None else meta.get("caption"),
            "url": meta.get("url"),
            STATUS_COLUMN: meta.get(STATUS_COLUMN, SUCCESS),
            ERROR_COLUMN: meta.get(ERROR_COLUMN),
            "width": meta.get("width"),
            "height": meta.get("height"),
            media: bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else None,
        })
    return pa.Table.from_pylist(rows, schema=webdataset_schema(media))


def ray_samples_table(batch: pa.Table, *, media: str, columns: Sequence[str]) -> pa.Table:
    """A Ray ``read_webdataset(decoder=None)`` batch -> ``columns`` of the corpus rows."""
    names = [n for n in ("__key__", media, "txt", "json") if n in batch.column_names]
    samples = batch.select(names).to_pylist()
    return samples_table(samples, media).select(list(columns))


def failed_rows(metadata: pa.Table, media: str) -> pa.Table:
    """The rows of a shard's metadata Parquet that img2dataset failed on (no image in the
    tar), as rows of :func:`webdataset_schema` with a null image."""
    status = metadata.column(STATUS_COLUMN)
    failed = metadata.filter(pc.fill_null(pc.not_equal(status, SUCCESS), False))
    return _as_rows(failed, media)


def _as_rows(metadata: pa.Table, media: str) -> pa.Table:
    schema = webdataset_schema(media)
    n = metadata.num_rows
    arrays = [metadata.column(f.name).cast(f.type) if f.name in metadata.column_names else pa.nulls(n, f.type)
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def failed_rows_batch(batch: pa.Table, *, media: str, columns: Sequence[str]) -> pa.Table:
    """Ray ``map_batches`` form of :func:`failed_rows` (a batch of metadata Parquet rows)."""
    return failed_rows(batch, media).select(list(columns))


# --------------------------------------------------------------------------- the corpus


def image_suffix(tar_uri: str, s3_endpoint: str | None = None) -> str:
    """The image extension of a shard (``jpg`` unless img2dataset ran with another
    ``--encode_format``), from its first sample; ``jpg`` for an empty shard."""
    for sample in iter_tar_samples(tar_uri, s3_endpoint):
        for suffix in IMAGE_MEDIA:
            if suffix in sample:
                return suffix
        raise CorpusSchemaError(f"{tar_uri}: sample {sample['__key__']!r} has no image "
                                f"(members: {', '.join(k for k in sample if k != '__key__')}); "
                                f"expected one of {', '.join(IMAGE_MEDIA)}")
    return "jpg"


def check_metadata(parquet_uri: str, s3_endpoint: str | None = None) -> int:
    """Rows of one shard's metadata Parquet (footer only), after checking it is one."""
    filesystem, path = fsutil.arrow_fs(parquet_uri, s3_endpoint)
    try:
        pf = pq.ParquetFile(filesystem.open_input_file(path))
    except FileNotFoundError as exc:
        raise CorpusSchemaError(
            f"{parquet_uri} is missing: img2dataset writes one next to each .tar, and the rows it failed on "
            "are listed only there") from exc
    except (OSError, pa.ArrowInvalid) as exc:
        raise CorpusSchemaError(f"{parquet_uri} is not a readable Parquet file: {exc}") from exc
    missing = [c for c in ("key", STATUS_COLUMN) if c not in pf.schema_arrow.names]
    if missing:
        raise CorpusSchemaError(f"{parquet_uri} has no '{missing[0]}' column: not img2dataset's shard metadata")
    return pf.metadata.num_rows


def read_metadata(parquet_uri: str, s3_endpoint: str | None = None) -> pa.Table:
    filesystem, path = fsutil.arrow_fs(parquet_uri, s3_endpoint)
    return pq.read_table(path, filesystem=filesystem)


def iter_webdataset_tables(tars: Sequence[str], media: str, s3_endpoint: str | None = None) -> Iterator[pa.Table]:
    """Every recorded row of the shards, shard by shard: the tar's samples, then the
    metadata Parquet's failed rows (plain Python; one shard's images in memory at a time)."""
    for tar_uri in tars:
        yield samples_table(iter_tar_samples(tar_uri, s3_endpoint), media)
        failed = failed_rows(read_metadata(metadata_file(tar_uri), s3_endpoint), media)
        if failed.num_rows:
            yield failed


def read_webdataset_table(tars: Sequence[str], media: str, s3_endpoint: str | None = None) -> pa.Table:
    """All rows of the shards as one table: for small corpora and tests."""
    tables = list(iter_webdataset_tables(tars, media, s3_endpoint))
    return pa.concat_tables(tables) if tables else webdataset_schema(media).empty_table()


def rows_by_key(metadata: pa.Table, tar_uri: str, media: str, s3_endpoint: str | None = None) -> pa.Table:
    """``metadata`` rows (of ``tar_uri``'s shard) as full corpus rows, in their order: the
    image and caption of each successful one read from the tar. For the few rows the
    driver treats itself (the kept copy of a repeated key); it scans the whole tar."""
    wanted = set(metadata.column("key").to_pylist())
    found = {}
    for sample in iter_tar_samples(tar_uri, s3_endpoint):
        row = samples_table([sample], media)
        key = row.column("key")[0].as_py()
        if key in wanted:
            found[key] = row
    rows = _as_rows(metadata, media)
    parts = [found.get(k, rows.slice(i, 1)) for i, k in enumerate(rows.column("key").to_pylist())]
    return pa.concat_tables(parts) if parts else rows
