"""The corpus as the service sees it: a key table with captions and where each item's
media lives. No Ray; the service's ``Catalog`` deployment wraps one of these.

Why a table and not paths: ``GET /media/{key}`` must never let a request choose what is
read. The key from the URL is only ever used as a dictionary lookup; the file, row group
and row (or the corpus' own ``url`` value) come from the table built at start-up, so
``../`` or an absolute path in a key is simply an unknown key. Media bytes are not held
in memory: the row group holding a key is read on demand and a few are kept (LRU), which
suits thumbnails of adjacent results that usually share row groups.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from thinkfast.errors import DecodeError, ThinkfastError
from thinkfast.serving.errors import MediaUnavailable, UnknownMediaKey
from thinkfast.utils import fs

if TYPE_CHECKING:
    from PIL.Image import Image

    from thinkfast.data.schema import CorpusColumns

logger = logging.getLogger(__name__)

# magic bytes -> content type, for media a browser shows as is
_SNIFF: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


@dataclass(frozen=True)
class MediaBlob:
    """An item's media as the browser gets it."""

    data: bytes  # encoded bytes, ready to send
    content_type: str  # e.g. image/png


def sniff_content_type(data: bytes) -> str | None:
    """Browser-safe image type of ``data`` from its magic bytes, else None."""
    for magic, ctype in _SNIFF:
        if data.startswith(magic):
            return ctype
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _png_bytes(image: "Image") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class CorpusCatalog:
    """``key -> caption`` and ``key -> media bytes`` over a corpus Parquet directory."""

    def __init__(
        self,
        files: list[str],
        columns: "CorpusColumns",
        keys: list[str],
        captions: list[str],
        file_of: np.ndarray,
        group_of: np.ndarray,
        row_of: np.ndarray,
        urls: list[str] | None,
        s3_endpoint: str | None,
        cache_groups: int,
    ) -> None:
        self.files = files
        self._columns = columns
        self.media_column = columns.media  # "jpg" | "mp4" | "url"
        self._position = {k: i for i, k in enumerate(keys)}
        self._captions = captions
        self._file_of, self._group_of, self._row_of = file_of, group_of, row_of
        self._urls = urls
        self._s3_endpoint = s3_endpoint
        self._cache: OrderedDict[tuple[int, int], pa.Array] = OrderedDict()
        self._cache_groups = cache_groups
        self._lock = threading.Lock()

    @classmethod
    def open(cls, uri: str, s3_endpoint: str | None = None, cache_groups: int = 8, *,
             exclude: "Iterable[str]" = (), embeddings: str | None = None) -> "CorpusCatalog":
        """Read keys, captions and media locations (not media bytes) of every Parquet file.

        Keys in ``exclude``, and the keys removed from the corpus that ``embeddings``'s
        ``removed.parquet`` lists (``thinkfast index --remove-keys --embeddings``), are
        left out: a deleted item has no caption and its media is an unknown key (404),
        even while its row is still in the corpus files."""
        from thinkfast.data.media import captions_of
        from thinkfast.data.reader import list_parquet_files
        from thinkfast.data.schema import validate_corpus_schema

        hidden = set(exclude)
        if embeddings:
            from thinkfast.store.incremental import read_removed

            hidden |= read_removed(embeddings, s3_endpoint)

        files = list_parquet_files(uri, s3_endpoint=s3_endpoint)
        keys: list[str] = []
        captions: list[str] = []
        file_of: list[int] = []
        group_of: list[int] = []
        row_of: list[int] = []
        urls: list[str] = []
        media = None
        first_columns = None
        seen: set[str] = set()
        duplicates = 0
        for fi, path in enumerate(files):
            pf = _parquet_file(path, s3_endpoint)
            columns = validate_corpus_schema(pf.schema_arrow)
            if media is None:
                media, first_columns = columns.media, columns
            elif columns.media != media:
                raise ThinkfastError(f"{path}: media column {columns.media!r} differs from {media!r} in {files[0]}")
            wanted = ["key", columns.captions] + (["url"] if media == "url" else [])
            for gi in range(pf.num_row_groups):
                table = pf.read_row_group(gi, columns=wanted)
                for ri, row in enumerate(table.to_pylist()):
                    key = row["key"]
                    if key is None or key in seen:
                        duplicates += 1
                        continue
                    if key in hidden:
                        continue
                    seen.add(key)
                    caps = captions_of(row, columns)
                    keys.append(key)
                    captions.append(caps[0] if caps else "")
                    file_of.append(fi)
                    group_of.append(gi)
                    row_of.append(ri)
                    if media == "url":
                        urls.append(row["url"])
        if duplicates:
            logger.warning("corpus %s: %d rows with a null or repeated key ignored (first one wins)", uri, duplicates)
        logger.info("catalog of %s: %d keys in %d files, media %s", uri, len(keys), len(files), media)
        return cls(
            files,
            first_columns,
            keys,
            captions,
            np.asarray(file_of, dtype=np.int32),
            np.asarray(group_of, dtype=np.int32),
            np.asarray(row_of, dtype=np.int32),
            urls if media == "url" else None,
            s3_endpoint,
            cache_groups,
        )

    def __len__(self) -> int:
        return len(self._position)

    def __contains__(self, key: object) -> bool:
        return key in self._position

    def remove(self, keys: "Iterable[str]") -> int:
        """Forget ``keys`` (deleted from the corpus): unknown from now on; returns how many went."""
        with self._lock:
            gone = [k for k in set(keys) if self._position.pop(k, None) is not None]
        return len(gone)

    def keys(self) -> list[str]:
        """Every key of the corpus, in file / row order."""
        return list(self._position)

    def captions(self, keys: list[str]) -> list[str]:
        """First caption of each key ("" for keys the corpus lacks: results never drop)."""
        out = []
        for key in keys:
            pos = self._position.get(key)
            out.append(self._captions[pos] if pos is not None else "")
        return out

    def media(self, key: str) -> MediaBlob:
        """The item's image (videos: their first frame) as browser-ready bytes.
        Raises :class:`UnknownMediaKey`, or :class:`MediaUnavailable` (a ``DecodeError``) for
        a row whose media is unusable: both are answered 404, the service stays up."""
        pos = self._position.get(key)
        if pos is None:
            raise UnknownMediaKey("unknown media key")
        try:
            return self._blob(pos)
        except MediaUnavailable:
            raise
        except DecodeError as exc:
            logger.warning("media of %r unavailable: %s", key, exc)
            raise MediaUnavailable(exc.reason, exc.detail) from exc

    def _blob(self, pos: int) -> MediaBlob:
        """Row ``pos``'s media, re-encoded only when a browser could not show it as stored."""
        from thinkfast.data.media import media_of

        data, is_video = media_of({self.media_column: self._media_value(pos)}, self._columns,
                                  s3_endpoint=self._s3_endpoint)
        if is_video:
            from thinkfast.data.video import decode_video

            frames, _ = decode_video(data, 1)
            return MediaBlob(_png_bytes(frames[0]), "image/png")
        ctype = sniff_content_type(data)
        if ctype is not None:
            return MediaBlob(data, ctype)
        from thinkfast.data.image import decode_image  # TIFF, BMP, ...: re-encode for the browser

        return MediaBlob(_png_bytes(decode_image(data)), "image/png")

    def _media_value(self, pos: int) -> object:
        """The row's media cell: bytes (jpg / mp4) or the corpus' own URL string."""
        if self._urls is not None:
            return self._urls[pos]
        column = self._media_group(int(self._file_of[pos]), int(self._group_of[pos]))
        return column[int(self._row_of[pos])].as_py()

    def _media_group(self, fi: int, gi: int) -> pa.Array:
        with self._lock:
            hit = self._cache.get((fi, gi))
            if hit is not None:
                self._cache.move_to_end((fi, gi))
                return hit
        pf = _parquet_file(self.files[fi], self._s3_endpoint)
        column = pf.read_row_group(gi, columns=[self.media_column]).column(0).combine_chunks()
        with self._lock:
            self._cache[(fi, gi)] = column
            while len(self._cache) > self._cache_groups:
                self._cache.popitem(last=False)
        return column


def _parquet_file(path: str, s3_endpoint: str | None) -> pq.ParquetFile:
    filesystem, plain = fs.arrow_fs(path, s3_endpoint)
    return pq.ParquetFile(filesystem.open_input_file(plain))


__all__ = ["CorpusCatalog", "MediaBlob", "MediaUnavailable", "UnknownMediaKey", "sniff_content_type"]
