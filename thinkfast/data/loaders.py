"""Public caption data sets -> the corpus Parquet.

* Flickr30K / COCO "Karpathy split" JSON (``dataset_flickr30k.json``, ``dataset_coco.json``):
  ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw", "tokens"}]}]}``,
  plus the folder of images. ``restval`` (COCO) counts as ``train``, as in the papers.
* img2dataset's output (``--output_format parquet`` or ``webdataset``): one caption per
  image, the image bytes, ``url``, and img2dataset's ``status`` / ``error_message``; rows it
  failed on are rejected with its own reason, and the split comes from a hash of the key.
* VATEX JSON (``vatex_training_v1.0.json``...): ``[{"videoID", "enCap": [...]}]`` plus a
  folder of clips named ``<videoID>.mp4`` (or .webm / .mkv); the split is taken from the
  file name or given.

Media are embedded (``jpg`` / ``mp4`` bytes, checked to decode) or referenced (``url``).
A row whose file is missing, unreadable or has no caption is not dropped silently: it goes
to ``_rejected.parquet`` (key, reason, detail) next to the shards, and the counts come back.
Output is written shard by shard, so a 30k-image set never sits in memory.

From the command line: ``thinkfast corpus karpathy|vatex|tuxpaint|img2dataset ...`` (``thinkfast_pipelines.corpus``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import pyarrow as pa

from thinkfast.data.image import decode_image
from thinkfast.data.media import fetch_bytes
from thinkfast.data.reader import write_table
from thinkfast.data.schema import ERROR_COLUMN, IMAGE_MEDIA, STATUS_COLUMN, SUCCESS, corpus_schema
from thinkfast.data.splits import split_of_key
from thinkfast.data.video import decode_video
from thinkfast.errors import DecodeError, ThinkfastError
from thinkfast.utils import fs as fsutil

logger = logging.getLogger(__name__)

REJECTED_NAME = "_rejected.parquet"  # underscore: corpus readers skip it
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv")


@dataclass
class LoadResult:
    """What a loader wrote."""

    out: str
    files: list[str]
    num_rows: int
    splits: dict[str, int]
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> rows


@dataclass(frozen=True)
class _Item:
    key: str
    captions: list[str]
    candidates: tuple[str, ...]  # media locations to try, in order
    split: str | None
    data: bytes | None = None  # media already in memory (e.g. composited); candidates name its source
    extra: dict[str, Any] = field(default_factory=dict)  # values of ``extra_fields`` columns


@dataclass(frozen=True)
class _Rejected:
    """A source row a loader refused before ``write_corpus`` (goes to the rejected table)."""

    key: str
    error: DecodeError


def _read_json(uri: str) -> Any:
    try:
        return fsutil.read_json(uri)
    except FileNotFoundError as exc:
        raise ThinkfastError(f"annotation file not found: {uri}") from exc
    except ValueError as exc:
        raise ThinkfastError(f"{uri} is not valid JSON: {exc}") from exc


def karpathy_items(json_uri: str, image_dir: str) -> Iterator[_Item]:
    """Rows of a Karpathy-split JSON (Flickr30K, Flickr8K, COCO)."""
    data = _read_json(json_uri)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ThinkfastError(f"{json_uri} is not a Karpathy-split file: no 'images' list")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "filename" not in img:
            raise ThinkfastError(f"{json_uri}: images[{i}] has no 'filename'")
        filename = str(img["filename"])
        split = KARPATHY_SPLITS.get(str(img.get("split", "")))
        if split is None:
            raise ThinkfastError(f"{json_uri}: images[{i}] ({filename}) has unknown split {img.get('split')!r}")
        captions = []
        for s in img.get("sentences") or []:
            raw = s.get("raw") if isinstance(s, dict) else None
            if not raw and isinstance(s, dict) and s.get("tokens"):
                raw = " ".join(s["tokens"])
            if raw and raw.strip():
                captions.append(raw.strip())
        filepath = str(img.get("filepath") or "")
        candidates = [fsutil.join(image_dir, filepath, filename)] if filepath else []
        candidates.append(fsutil.join(image_dir, filename))
        key = os.path.splitext(filename)[0]
        yield _Item(key=key, captions=captions, candidates=tuple(candidates), split=split)


def vatex_split_from_name(json_uri: str) -> str | None:
    name = os.path.basename(json_uri).lower()
    for word, split in (("train", "train"), ("val", "val"), ("test", "test")):
        if word in name:
            return split
    return None


def vatex_items(json_uri: str, video_dir: str, split: str | None = None) -> Iterator[_Item]:
    """Rows of a VATEX annotation file (English captions, ``enCap``)."""
    data = _read_json(json_uri)
    if not isinstance(data, list):
        raise ThinkfastError(f"{json_uri} is not a VATEX file: expected a JSON list of clips")
    split = split or vatex_split_from_name(json_uri)
    if split is None:
        raise ThinkfastError(f"cannot tell the split of {json_uri} from its name; pass --split")
    for i, clip in enumerate(data):
        if not isinstance(clip, dict) or "videoID" not in clip:
            raise ThinkfastError(f"{json_uri}: entry {i} has no 'videoID'")
        vid = str(clip["videoID"])
        captions = [c.strip() for c in clip.get("enCap") or [] if isinstance(c, str) and c.strip()]
        candidates = tuple(fsutil.join(video_dir, vid + suffix) for suffix in VIDEO_SUFFIXES)
        yield _Item(key=vid, captions=captions, candidates=candidates, split=split)


def _locate(item: _Item, s3_endpoint: str | None) -> str:
    for uri in item.candidates:
        if fsutil.exists(uri, s3_endpoint):
            return uri
    raise DecodeError("missing_media", f"none of {', '.join(item.candidates)} exists")


def write_corpus(items: "Iterable[_Item | _Rejected]", out: str, media: str, embed: bool = True, shard_size: int = 1000,
                 s3_endpoint: str | None = None, extra_fields: Iterable[pa.Field] = ()) -> LoadResult:
    """Check each item's media and captions, write shards and the rejected table.

    An item may arrive as a rejection already (``DecodeError`` instead of ``_Item``), from a
    loader that finds the problem while reading its source: it is counted like the others."""
    column = media if embed else "url"
    schema = corpus_schema(column)
    for extra in extra_fields:
        schema = schema.append(extra)
    fsutil.makedirs(out)
    rows: list[dict] = []
    rejected: list[dict] = []
    files: list[str] = []
    splits: dict[str, int] = {}
    seen: set[str] = set()
    total = 0

    def flush() -> None:
        nonlocal rows
        if rows:
            path = fsutil.join(out, f"part-{len(files):05d}.parquet")
            write_table(pa.Table.from_pylist(rows, schema=schema), path, s3_endpoint=s3_endpoint)
            files.append(path)
            logger.info("wrote %s (%d rows so far, %d rejected)", path, total, len(rejected))
            rows = []

    for item in items:
        if isinstance(item, _Rejected):
            rejected.append({"key": item.key, "reason": item.error.reason, "detail": item.error.detail})
            continue
        if item.key in seen:
            raise ThinkfastError(f"duplicate key {item.key!r} in the annotations")
        seen.add(item.key)
        try:
            if not item.captions:
                raise DecodeError("no_captions", "the annotation has no caption")
            uri = item.candidates[0] if item.data is not None else _locate(item, s3_endpoint)
            width = height = None
            if embed:
                data = item.data if item.data is not None else fetch_bytes(uri, s3_endpoint=s3_endpoint)
                if media in IMAGE_MEDIA:
                    width, height = decode_image(data).size
                else:
                    _, info = decode_video(data, 1)
                    width, height = info.width, info.height
                value: Any = data
            else:
                value = uri if fsutil.is_s3(uri) or "://" in uri else os.path.abspath(uri)
        except DecodeError as exc:
            rejected.append({"key": item.key, "reason": exc.reason, "detail": exc.detail})
            continue
        rows.append({"key": item.key, "captions": item.captions, column: value, "split": item.split,
                     "width": width, "height": height, **item.extra})
        splits[item.split or ""] = splits.get(item.split or "", 0) + 1
        total += 1
        if len(rows) >= shard_size:
            flush()
    flush()
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    if rejected:
        table = pa.Table.from_pylist(rejected, schema=pa.schema(
            [("key", pa.string()), ("reason", pa.string()), ("detail", pa.string())]))
        write_table(table, fsutil.join(out, REJECTED_NAME), s3_endpoint=s3_endpoint)
        logger.warning("%d rows rejected: %s (see %s)", len(rejected), reasons, REJECTED_NAME)
    if not files:
        raise ThinkfastError(f"no usable rows: all {len(rejected)} were rejected ({reasons})")
    return LoadResult(out=out, files=files, num_rows=total, splits=splits, rejected=reasons)


def load_karpathy(json_uri: str, image_dir: str, out: str, embed: bool = True, shard_size: int = 1000,
                  s3_endpoint: str | None = None) -> LoadResult:
    """Flickr30K / COCO Karpathy JSON + image folder -> corpus Parquet with ``split``."""
    return write_corpus(karpathy_items(json_uri, image_dir), out, "jpg", embed, shard_size, s3_endpoint)


def load_vatex(json_uri: str, video_dir: str, out: str, split: str | None = None, embed: bool = True,
               shard_size: int = 200, s3_endpoint: str | None = None) -> LoadResult:
    """VATEX JSON + clip folder -> corpus Parquet (``mp4`` column) with ``split``."""
    return write_corpus(vatex_items(json_uri, video_dir, split), out, "mp4", embed, shard_size, s3_endpoint)


def img2dataset_tables(uri: str, s3_endpoint: str | None = None) -> tuple[str, Iterator[pa.Table]]:
    """The image column name and the rows of an img2dataset output folder, a batch at a
    time (Parquet output: its files' record batches; webdataset output: each shard's tar
    samples, then the rows its metadata Parquet records as failed)."""
    import pyarrow.parquet as pq

    from thinkfast.data import img2dataset
    from thinkfast.data.reader import inspect_corpus

    info = inspect_corpus(uri, s3_endpoint, webdataset=True)
    media = info.columns.media
    if media not in IMAGE_MEDIA or info.columns.captions != "caption":
        raise ThinkfastError(f"{uri} is not img2dataset output: it has a {info.columns.captions!r} column and a "
                             f"{media!r} media column (img2dataset writes 'caption' and jpg / png / webp bytes)")
    if info.format == img2dataset.WEBDATASET_FORMAT:
        return media, img2dataset.iter_webdataset_tables(info.files, media, s3_endpoint)

    def batches() -> Iterator[pa.Table]:
        for f in info.files:
            filesystem, path = fsutil.arrow_fs(f, s3_endpoint)
            with filesystem.open_input_file(path) as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=256):
                    yield pa.Table.from_batches([batch])

    return media, batches()


def img2dataset_items(tables: Iterable[pa.Table], media: str) -> Iterator["_Item | _Rejected"]:
    """img2dataset rows -> loader items. A row img2dataset did not fetch is rejected with its
    ``status`` as the reason and its ``error_message`` as the detail; a key seen before is
    rejected as ``duplicate_key`` (the first row is kept, so re-running img2dataset into the
    same folder never writes an image twice)."""
    seen: set[str] = set()
    for table in tables:
        names = set(table.column_names)
        for row in table.to_pylist():
            key = row.get("key")
            if key is None or str(key) == "":
                yield _Rejected("", DecodeError("no_key", f"a row without a key (url {row.get('url')})"))
                continue
            key = str(key)
            status = row.get(STATUS_COLUMN) if STATUS_COLUMN in names else SUCCESS
            if status != SUCCESS:
                yield _Rejected(key, DecodeError(str(status or "no_status"), str(row.get(ERROR_COLUMN) or "")))
                continue
            if key in seen:
                yield _Rejected(key, DecodeError("duplicate_key", "an earlier row has this key; the first is kept"))
                continue
            seen.add(key)
            data = row.get(media)
            if not data:
                yield _Rejected(key, DecodeError("missing_media", f"img2dataset reported success but the row "
                                                                  f"has no {media} bytes"))
                continue
            caption = row.get("caption")
            url = row.get("url")
            yield _Item(key=key, captions=[caption] if caption else [], candidates=(str(url or key),),
                        split=split_of_key(key), data=bytes(data), extra={"url": url})


def load_img2dataset(uri: str, out: str, shard_size: int = 1000, s3_endpoint: str | None = None) -> LoadResult:
    """img2dataset output (Parquet or webdataset) -> corpus Parquet with ``split`` and ``url``.

    ``thinkfast embed`` reads img2dataset output directly; this copy is for what wants the
    corpus layout (a ``captions`` list and a ``split`` column: training, evaluation) and
    checks that every image decodes, once."""
    media, tables = img2dataset_tables(uri, s3_endpoint)
    return write_corpus(img2dataset_items(tables, media), out, media, True, shard_size, s3_endpoint,
                        extra_fields=[pa.field("url", pa.string())])
