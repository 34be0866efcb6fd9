"""From a corpus row to pixels: embedded ``jpg`` / ``mp4`` bytes, or a ``url`` fetched from
a local path, ``file://`` or ``s3://`` with retries; and the row's captions.

Every failure becomes a ``DecodeError`` whose reason the embed stage writes to
``rejected/`` (``missing_media``, ``fetch_failed``, or the decoder's own reason), so one bad
row never stops a job and never disappears without a trace. A row that img2dataset
itself failed on (``status`` not ``success``) is rejected with img2dataset's status as the
reason and its ``error_message`` as the detail, not as an anonymous ``missing_media``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping

import torch

from thinkfast.data.image import DEFAULT_MAX_PIXELS, decode_image, preprocess_image
from thinkfast.data.schema import ERROR_COLUMN, STATUS_COLUMN, SUCCESS, CorpusColumns
from thinkfast.data.video import decode_video, preprocess_video
from thinkfast.errors import DecodeError
from thinkfast.utils import fs as fsutil

logger = logging.getLogger(__name__)

# file name endings decoded as video when the media column is ``url``
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ts")


def fetch_bytes(url: str, retries: int = 3, backoff_s: float = 0.5, s3_endpoint: str | None = None) -> bytes:
    """Bytes behind a local path, ``file://`` or ``s3://`` URI. Transient errors are retried
    with exponential back-off; a missing object fails at once (retrying cannot help)."""
    if not url:
        raise DecodeError("missing_media", "empty url")
    if "://" in url and not (fsutil.is_s3(url) or url.startswith("file://")):
        raise DecodeError("fetch_failed", f"unsupported URL scheme in {url!r} (local path, file:// or s3://)")
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            return fsutil.read_bytes(url, s3_endpoint)
        except FileNotFoundError as exc:
            raise DecodeError("fetch_failed", f"not found: {url}") from exc
        except (IsADirectoryError, PermissionError) as exc:
            raise DecodeError("fetch_failed", f"{type(exc).__name__}: {url}") from exc
        except OSError as exc:  # network, throttling, 5xx: worth another try
            last = exc
            if attempt < retries:
                delay = backoff_s * (2 ** attempt)
                logger.debug("fetch %s failed (%s); retry %d in %.1f s", url, exc, attempt + 1, delay)
                time.sleep(delay)
    raise DecodeError("fetch_failed", f"{url} after {retries + 1} attempts: {last}")


def _looks_like_video(url: str, data: bytes) -> bool:
    if os.path.splitext(url.split("?", 1)[0])[1].lower() in VIDEO_EXTENSIONS:
        return True
    # sniff: ISO-BMFF 'ftyp' box (mp4/mov), Matroska/WebM EBML magic, RIFF....AVI
    return data[4:8] == b"ftyp" or data[:4] == b"\x1a\x45\xdf\xa3" or (data[:4] == b"RIFF" and data[8:12] == b"AVI ")


def media_of(row: Mapping[str, Any], columns: CorpusColumns, s3_endpoint: str | None = None,
             retries: int = 3) -> tuple[bytes, bool]:
    """The row's encoded media and whether it is a video."""
    status = row.get(STATUS_COLUMN) if columns.has_status else None
    if status is not None and status != SUCCESS:
        raise DecodeError(str(status), f"img2dataset: {row.get(ERROR_COLUMN) or status}")
    value = row.get(columns.media)
    if value is None or (isinstance(value, (bytes, bytearray, str)) and len(value) == 0):
        raise DecodeError("missing_media", f"row has no {columns.media}")
    if columns.media == "url":
        data = fetch_bytes(str(value), retries=retries, s3_endpoint=s3_endpoint)
        return data, _looks_like_video(str(value), data)
    return bytes(value), columns.media == "mp4"


def load_pixels(
    row: Mapping[str, Any],
    columns: CorpusColumns,
    image_size: int,
    num_frames: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    s3_endpoint: str | None = None,
) -> torch.Tensor:
    """Pixels of one row: ``(3, S, S)`` for an image, ``(F, 3, S, S)`` for a video
    (``F = num_frames``). Raises ``DecodeError``."""
    data, is_video = media_of(row, columns, s3_endpoint=s3_endpoint)
    if is_video:
        frames, _ = decode_video(data, num_frames)
        return preprocess_video(frames, image_size)  # (F, 3, S, S)
    return preprocess_image(decode_image(data, max_pixels=max_pixels), image_size)  # (3, S, S)


def captions_of(row: Mapping[str, Any], columns: CorpusColumns) -> list[str]:
    """The row's non-empty captions (stripped), whichever caption column the corpus has."""
    value = row.get(columns.captions)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [c.strip() for c in items if isinstance(c, str) and c.strip()]
