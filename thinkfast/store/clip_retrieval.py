"""clip-retrieval's embeddings layout: thinkfast writes it (``thinkfast export``) and reads
it (``thinkfast index --embeddings``), so a clip-retrieval / autofaiss user can move either way.

    <dir>/img_emb/img_emb_N.npy          (n, d) float16 | float32, L2-normalised
    <dir>/text_emb/text_emb_N.npy        (n, d) caption embeddings, the same rows (optional)
    <dir>/metadata/metadata_N.parquet    image_path, caption, ... : row r describes row r of part N
    <dir>/thinkfast_export.json          only in thinkfast's exports: source, fast model identity

This is what ``clip-retrieval inference`` writes (``clip_inference/writer.py``: ``N`` is
zero-padded so that a lexicographic sort is numeric, and autofaiss / clip-retrieval's
back-end number the index rows in that sorted order; there is no key column, the row
order *is* the id). Reading pairs ``img_emb_N`` with ``metadata_N`` by ``N`` and takes the
key from metadata's ``key`` column (img2dataset's, when clip-retrieval ran with
``--enable_metadata``), else ``image_path``. A part whose row counts differ is refused: a
silent truncation would attach every later key to the wrong vector.

The ``.npy`` files are streamed (header, then a batch of rows at a time), so neither
export nor import holds more than one batch plus the caption map in memory.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from thinkfast.store.errors import StoreError
from thinkfast.utils import fs

logger = logging.getLogger(__name__)

IMG_EMB_DIR, TEXT_EMB_DIR, METADATA_DIR = "img_emb", "text_emb", "metadata"
EXPORT_MANIFEST = "thinkfast_export.json"
EXPORT_FORMAT = "thinkfast-clip-retrieval-export"
DTYPES = ("float32", "float16")
ROWS_PER_FILE = 1_000_000  # clip-retrieval's own default partition size (write_batch_size)
STAGING_DIR = "_clip_retrieval_import"  # under an index --out while `thinkfast index` imports
_PART = re.compile(r"^img_emb_(.+)\.npy$")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ClipPart:
    """One partition: ``img_emb_N.npy`` and its ``metadata_N.parquet``."""

    name: str  # N, as in the file names
    emb_uri: str
    metadata_uri: str
    rows: int
    dim: int
    dtype: str  # numpy dtype string of the stored vectors, e.g. "<f2"
    data_offset: int  # bytes before the first row (the .npy header)


def is_clip_retrieval_layout(uri: str, s3_endpoint: str | None = None) -> bool:
    """True when ``uri`` is a directory with an ``img_emb/`` folder (clip-retrieval's output root)."""
    filesystem = fs.fsspec_fs(uri, s3_endpoint)
    return filesystem.isdir(fs.strip_scheme(fs.join(uri, IMG_EMB_DIR)))


def _read_npy_header(f: Any, uri: str) -> tuple[tuple[int, ...], np.dtype, int]:
    try:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
    except ValueError as exc:
        raise StoreError(f"{uri}: not a .npy file ({exc})") from exc
    if fortran:
        raise StoreError(f"{uri}: Fortran-ordered arrays are not supported; save it C-ordered")
    if len(shape) != 2 or dtype.kind != "f":
        raise StoreError(f"{uri}: expected a 2-D float array (n, d), got shape {shape} of {dtype}")
    return shape, dtype, f.tell()


def list_parts(uri: str, s3_endpoint: str | None = None) -> list[ClipPart]:
    """The partitions of a clip-retrieval directory in file-name order, their headers read
    and their row counts checked against the metadata footers (no vector data is read)."""
    filesystem = fs.fsspec_fs(uri, s3_endpoint)
    emb_dir, meta_dir = fs.join(uri, IMG_EMB_DIR), fs.join(uri, METADATA_DIR)
    names = sorted(p.rsplit("/", 1)[-1] for p in filesystem.ls(fs.strip_scheme(emb_dir), detail=False))
    matched = [(m.group(1), n) for n in names if (m := _PART.match(n))]
    if not matched:
        raise StoreError(f"{emb_dir}: no img_emb_N.npy files")
    if not filesystem.isdir(fs.strip_scheme(meta_dir)):
        raise StoreError(f"{uri}: no {METADATA_DIR}/ beside {IMG_EMB_DIR}/; the keys come from metadata_N.parquet")
    parts: list[ClipPart] = []
    for name, file_name in matched:
        emb_uri, meta_uri = fs.join(emb_dir, file_name), fs.join(meta_dir, f"metadata_{name}.parquet")
        with filesystem.open(fs.strip_scheme(emb_uri), "rb") as f:
            shape, dtype, offset = _read_npy_header(f, emb_uri)
        if not filesystem.exists(fs.strip_scheme(meta_uri)):
            raise StoreError(f"{emb_uri} has no metadata: {meta_uri} is missing")
        meta_rows = _parquet(meta_uri, s3_endpoint).metadata.num_rows
        if meta_rows != shape[0]:
            raise StoreError(f"{emb_uri} has {shape[0]} rows but {meta_uri} has {meta_rows}; "
                             "they must describe the same items in the same order")
        if parts and shape[1] != parts[0].dim:
            raise StoreError(f"{emb_uri}: dim {shape[1]} differs from {parts[0].dim} in {parts[0].emb_uri}")
        parts.append(ClipPart(name, emb_uri, meta_uri, int(shape[0]), int(shape[1]), dtype.str, offset))
    return parts


def _parquet(uri: str, s3_endpoint: str | None) -> pq.ParquetFile:
    filesystem, path = fs.arrow_fs(uri, s3_endpoint)
    try:
        return pq.ParquetFile(path, filesystem=filesystem)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"{uri}: not a readable Parquet file ({exc})") from exc


def key_column(schema: pa.Schema, source: str) -> str:
    """``key`` when metadata has it (img2dataset's key), else ``image_path``."""
    for name in ("key", "image_path"):
        if name in schema.names:
            return name
    raise StoreError(f"{source}: no 'key' or 'image_path' column to take keys from (have {schema.names})")


def iter_clip_embeddings(uri: str, batch_size: int = 65536,
                         s3_endpoint: str | None = None) -> Iterator[tuple[list[str], np.ndarray]]:
    """``(keys, vectors (B, d) float32)`` batches of a clip-retrieval directory, part by part."""
    filesystem = fs.fsspec_fs(uri, s3_endpoint)
    for part in list_parts(uri, s3_endpoint):
        metadata = _parquet(part.metadata_uri, s3_endpoint)
        column = key_column(metadata.schema_arrow, part.metadata_uri)
        dtype = np.dtype(part.dtype)
        row_bytes = dtype.itemsize * part.dim
        with filesystem.open(fs.strip_scheme(part.emb_uri), "rb") as f:
            f.seek(part.data_offset)
            for batch in metadata.iter_batches(batch_size=batch_size, columns=[column]):
                keys = batch.column(0)
                if keys.null_count:
                    raise StoreError(f"{part.metadata_uri}: {keys.null_count} null value(s) in {column!r}")
                raw = f.read(len(keys) * row_bytes)
                if len(raw) != len(keys) * row_bytes:
                    raise StoreError(f"{part.emb_uri} is truncated: its header promises {part.rows} rows")
                vectors = np.frombuffer(raw, dtype=dtype).reshape(len(keys), part.dim).astype(np.float32)
                yield [str(k) for k in keys.to_pylist()], vectors


def export_identity(uri: str, s3_endpoint: str | None = None) -> str | None:
    """The fast model identity a thinkfast export recorded (None for clip-retrieval's own output)."""
    path = fs.join(uri, EXPORT_MANIFEST)
    if not fs.exists(path, s3_endpoint):
        return None
    data = fs.read_json(path, s3_endpoint)
    return data.get("fast_model_identity") if isinstance(data, dict) and data.get("format") == EXPORT_FORMAT else None


@contextlib.contextmanager
def staged_for_index(embeddings: str, out: str, s3_endpoint: str | None = None) -> Iterator[tuple[str, str | None]]:
    """``(embeddings, identity)`` for an index build: unchanged for thinkfast's own layout;
    a clip-retrieval directory is first copied to key/embedding Parquet under
    ``<out>/_clip_retrieval_import/`` (removed afterwards), because the sharded build reads
    row ranges of Parquet files in parallel tasks. The copy costs float32 ``N x d x 4``
    bytes of temporary space next to the index."""
    if not is_clip_retrieval_layout(embeddings, s3_endpoint):
        yield embeddings, None
        return
    from thinkfast.store.embeddings import write_embeddings

    fs.check_writable(out, s3_endpoint)
    stage = fs.join(out, STAGING_DIR)
    _remove_dir(stage, s3_endpoint)
    try:
        rows = 0
        for i, (keys, vectors) in enumerate(iter_clip_embeddings(embeddings, s3_endpoint=s3_endpoint)):
            write_embeddings(stage, keys, vectors, part=f"part-{i:06d}", s3_endpoint=s3_endpoint)
            rows += len(keys)
        logger.info("staged %d clip-retrieval embeddings from %s in %s", rows, embeddings, stage)
        yield stage, export_identity(embeddings, s3_endpoint)
    finally:
        _remove_dir(stage, s3_endpoint)


def _remove_dir(uri: str, s3_endpoint: str | None) -> None:
    filesystem = fs.fsspec_fs(uri, s3_endpoint)
    if filesystem.exists(fs.strip_scheme(uri)):
        filesystem.rm(fs.strip_scheme(uri), recursive=True)


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_clip_retrieval` wrote."""

    out: str
    count: int
    dim: int
    parts: int
    dtype: str
    texts: bool  # text_emb/ written
    captions_from: str | None  # "texts", "corpus" or None (no captions found)
    fast_model_identity: str | None


def _first_captions(embeddings: str, s3_endpoint: str | None) -> dict[str, tuple[str, np.ndarray]] | None:
    """``key -> (caption, g(caption))`` for each key's first embedded caption, from ``<emb>/texts``."""
    from thinkfast.store.embeddings import embedding_matrix
    from thinkfast.store.layout import list_parquet_files, texts_dir

    uri = texts_dir(embeddings)
    if not fs.fsspec_fs(uri, s3_endpoint).isdir(fs.strip_scheme(uri)):
        return None
    best: dict[str, tuple[int, str, np.ndarray]] = {}
    for file_uri in list_parquet_files(uri, s3_endpoint):
        for batch in _parquet(file_uri, s3_endpoint).iter_batches(columns=["key", "caption_index", "caption",
                                                                           "embedding"]):
            vectors = embedding_matrix(batch.column("embedding"), file_uri)
            for key, index, caption, vector in zip(batch.column("key").to_pylist(),
                                                   batch.column("caption_index").to_pylist(),
                                                   batch.column("caption").to_pylist(), vectors):
                if key not in best or index < best[key][0]:
                    best[key] = (index, caption, vector)
    return {k: (c, v) for k, (_, c, v) in best.items()}


def _corpus_columns(corpus: str | None, s3_endpoint: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """``key -> first caption`` and ``key -> url`` from a Parquet corpus (no media bytes read);
    empty when there is no readable corpus: the export then has keys without captions."""
    from thinkfast.data.schema import validate_corpus_schema  # (thinkfast.data.media would import torch)
    from thinkfast.errors import ThinkfastError
    from thinkfast.store.layout import list_parquet_files

    captions: dict[str, str] = {}
    urls: dict[str, str] = {}
    if not corpus:
        return captions, urls
    try:
        files = list_parquet_files(corpus, s3_endpoint)
        for file_uri in files:
            parquet = _parquet(file_uri, s3_endpoint)
            columns = validate_corpus_schema(parquet.schema_arrow)
            wanted = ["key", columns.captions] + (["url"] if "url" in parquet.schema_arrow.names else [])
            for row in parquet.read(columns=wanted).to_pylist():
                value = row[columns.captions]
                caps = [c.strip() for c in ([value] if isinstance(value, str) else value or []) if c and c.strip()]
                if caps:
                    captions.setdefault(row["key"], caps[0])
                if row.get("url"):
                    urls.setdefault(row["key"], row["url"])
    except (ThinkfastError, OSError) as exc:
        logger.warning("export: no captions or urls from corpus %s (%s)", corpus, exc)
    return captions, urls


def _source_rows(embeddings: str, s3_endpoint: str | None) -> int:
    """Rows to export, from Parquet footers or .npy headers (no vectors read)."""
    from thinkfast.store.layout import FAST_DIR, list_parquet_files, resolve_artifact_dir

    if is_clip_retrieval_layout(embeddings, s3_endpoint):
        return sum(p.rows for p in list_parts(embeddings, s3_endpoint))
    files = list_parquet_files(resolve_artifact_dir(embeddings, FAST_DIR, s3_endpoint), s3_endpoint)
    return sum(_parquet(f, s3_endpoint).metadata.num_rows for f in files)


def _normalized(vectors: np.ndarray, dtype: str) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(dtype)


def _save_npy(uri: str, array: np.ndarray, s3_endpoint: str | None) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    fs.write_bytes(uri, buf.getvalue(), s3_endpoint)


def export_clip_retrieval(
    embeddings: str, out: str, *, dtype: str = "float32", rows_per_file: int = ROWS_PER_FILE,
    corpus: str | None = None, overwrite: bool = False, s3_endpoint: str | None = None,
) -> ExportSummary:
    """Write the fast embeddings at ``embeddings`` (an embed output) as clip-retrieval's
    layout at ``out``: L2-normalised vectors (autofaiss' inner product is then thinkfast's
    cosine), ``text_emb/`` with each item's first caption embedding when embed ran with
    ``--texts`` (a zero row for an item without one), and ``metadata/`` with ``image_path``
    (the corpus' url when it has one, else the key), ``caption`` and ``key``, row for row."""
    from thinkfast.store.embeddings import iter_embeddings
    from thinkfast.store.layout import find_embed_manifest

    if dtype not in DTYPES:
        raise StoreError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if rows_per_file < 1:
        raise StoreError(f"--rows-per-file must be >= 1, got {rows_per_file}")
    fs.check_readable(embeddings, s3_endpoint)
    fs.check_writable(out, s3_endpoint)
    existing = [d for d in (IMG_EMB_DIR, TEXT_EMB_DIR, METADATA_DIR) if fs.exists(fs.join(out, d), s3_endpoint)]
    if existing and not overwrite:
        raise StoreError(f"{out} already holds {', '.join(existing)}/; pass --overwrite to replace them")
    for d in existing:
        _remove_dir(fs.join(out, d), s3_endpoint)
    manifest = find_embed_manifest(embeddings, s3_endpoint) if not is_clip_retrieval_layout(embeddings, s3_endpoint) \
        else None
    identity = manifest.fast_identity if manifest else export_identity(embeddings, s3_endpoint)
    total = _source_rows(embeddings, s3_endpoint)
    if total == 0:
        raise StoreError(f"{embeddings}: no embeddings to export")
    n_parts = math.ceil(total / rows_per_file)
    width = int(math.log10(n_parts)) + 1  # clip-retrieval's own zero padding
    texts = _first_captions(embeddings, s3_endpoint)
    captions, urls = _corpus_columns(corpus or (manifest.corpus if manifest else None), s3_endpoint)
    captions_from = "texts" if texts else ("corpus" if captions else None)

    keys: list[str] = []
    chunks: list[np.ndarray] = []
    written = dim = count = 0

    def flush() -> None:
        nonlocal written
        name = str(written).zfill(width)
        vectors = np.concatenate(chunks)
        _save_npy(fs.join(out, IMG_EMB_DIR, f"img_emb_{name}.npy"), _normalized(vectors, dtype), s3_endpoint)
        if texts is not None:
            text = np.zeros_like(vectors)
            for i, key in enumerate(keys):
                if key in texts:
                    text[i] = texts[key][1]
            _save_npy(fs.join(out, TEXT_EMB_DIR, f"text_emb_{name}.npy"), _normalized(text, dtype), s3_endpoint)
        caption_of = (lambda k: texts[k][0] if k in texts else None) if texts is not None else captions.get
        table = pa.table({
            "image_path": pa.array([urls.get(k, k) for k in keys], pa.string()),
            "caption": pa.array([caption_of(k) for k in keys], pa.string()),
            "key": pa.array(keys, pa.string()),
            **({"url": pa.array([urls.get(k) for k in keys], pa.string())} if urls else {}),
        })
        sink = io.BytesIO()
        pq.write_table(table, sink)
        fs.write_bytes(fs.join(out, METADATA_DIR, f"metadata_{name}.parquet"), sink.getvalue(), s3_endpoint)
        written += 1
        keys.clear()
        chunks.clear()

    for batch_keys, vectors in iter_embeddings(embeddings, s3_endpoint=s3_endpoint):
        dim, count = vectors.shape[1], count + len(batch_keys)
        start = 0
        while start < len(batch_keys):
            take = min(len(batch_keys) - start, rows_per_file - len(keys))
            keys.extend(batch_keys[start:start + take])
            chunks.append(vectors[start:start + take])
            start += take
            if len(keys) == rows_per_file:
                flush()
    if keys:
        flush()
    summary = ExportSummary(out=str(out), count=count, dim=dim, parts=written, dtype=dtype, texts=texts is not None,
                            captions_from=captions_from, fast_model_identity=identity)
    fs.write_json(fs.join(out, EXPORT_MANIFEST), {
        "format": EXPORT_FORMAT, "version": 1, "source": str(embeddings), "fast_model_identity": identity,
        "count": count, "dim": dim, "parts": written, "dtype": dtype, "normalized": True,
        "text_emb": summary.texts, "captions_from": captions_from,
    }, s3_endpoint)
    logger.info("exported %d embeddings from %s to %s in %d part(s)", count, embeddings, out, written)
    return summary


__all__ = [
    "ClipPart", "DTYPES", "EXPORT_MANIFEST", "ExportSummary", "ROWS_PER_FILE", "export_clip_retrieval",
    "export_identity", "is_clip_retrieval_layout", "iter_clip_embeddings", "key_column", "list_parts",
    "staged_for_index",
]
