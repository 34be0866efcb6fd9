"""Corpus rows -> pixel tensors, with every row that cannot be used recorded as a
:class:`Reject` (key, stage, reason, detail) instead of raised or dropped.

One loop serves embed (Ray Data tasks), training, teacher scores and evaluation, so a bad
file is rejected for the same reason everywhere, and ``rejected/`` Parquet always has the
same four columns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa

from thinkfast.errors import DecodeError

logger = logging.getLogger(__name__)

MAX_DETAIL_CHARS = 500  # a reject's detail is a hint, not a log dump

REJECT_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),  # null when the row had no key
        pa.field("stage", pa.string()),  # read | decode | embed | train | eval | write
        pa.field("reason", pa.string()),  # short tag: corrupt, missing_media, duplicate_key, ...
        pa.field("detail", pa.string()),  # one line for a human
    ]
)


@dataclass(frozen=True)
class Reject:
    """A row that did not make it, and why."""

    key: str | None  # the row's key (None: the row had none)
    stage: str  # the step that refused it
    reason: str  # short machine-readable tag
    detail: str = ""  # one human-readable line

    def __post_init__(self) -> None:
        detail = " ".join(str(self.detail).split())
        if len(detail) > MAX_DETAIL_CHARS:
            detail = detail[: MAX_DETAIL_CHARS - 3] + "..."
        object.__setattr__(self, "detail", detail)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "stage": self.stage, "reason": self.reason, "detail": self.detail}


def rejects_table(rejects: Iterable[Reject]) -> pa.Table:
    """The ``rejected/`` Parquet layout of ``rejects``."""
    return pa.Table.from_pylist([r.to_dict() for r in rejects], schema=REJECT_SCHEMA)


@dataclass
class DecodedRows:
    """What :func:`decode_rows` made of a batch: usable rows in input order, and the rest."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # the usable input rows
    pixels: list[Any] = field(default_factory=list)  # torch (3,S,S) or (F,3,S,S), one per usable row
    rejects: list[Reject] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return [str(r["key"]) for r in self.rows]


def decode_rows(
    rows: Iterable[dict[str, Any]],
    columns: Any,
    image_size: int,
    num_frames: int,
    *,
    key_column: str = "key",
    max_pixels: int | None = None,
    s3_endpoint: str | None = None,
    require_captions: bool = False,
) -> DecodedRows:
    """Decode each row's media (``columns`` is the corpus's ``CorpusColumns``).

    A ``DecodeError`` becomes ``Reject(stage="decode", reason=exc.reason)``; any other
    exception ``reason="decode_error"`` with the exception as detail (and a warning in the
    log: it may be a bug rather than a bad file). ``require_captions`` also rejects rows
    without a caption (``stage="read"``, ``reason="no_captions"``)."""
    from thinkfast.data.media import captions_of, load_pixels

    kwargs: dict[str, Any] = {"s3_endpoint": s3_endpoint}
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
    out = DecodedRows()
    for row in rows:
        key = row.get(key_column)
        if key is None or key == "":
            out.rejects.append(Reject(None, "read", "missing_key", "row has a null or empty key"))
            continue
        key = str(key)
        if require_captions and not captions_of(row, columns):
            out.rejects.append(Reject(key, "read", "no_captions", "row has no caption"))
            continue
        try:
            tensor = load_pixels(row, columns, image_size, num_frames, **kwargs)
        except DecodeError as exc:
            out.rejects.append(Reject(key, "decode", exc.reason, exc.detail or str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the corpus
            logger.warning("unexpected decode failure for key %r: %r", key, exc)
            out.rejects.append(Reject(key, "decode", "decode_error", f"{type(exc).__name__}: {exc}"))
            continue
        out.rows.append(row)
        out.pixels.append(tensor)
    return out
