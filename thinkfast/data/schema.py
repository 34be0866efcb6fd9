"""The corpus Parquet contract (img2dataset-compatible) and its validator.

One row per image or video: ``key`` string; ``caption`` string or ``captions``
list<string>; the media as ``jpg`` / ``png`` / ``webp`` binary, ``mp4`` binary or ``url``
string; optional ``split``, ``width``, ``height`` (and ``scene``, the generated corpus's
JSON description). img2dataset writes ``url`` *and* the encoded image (named after its
``--encode_format``); the embedded bytes win because they need no fetch. It also writes
``status`` and ``error_message``: a row whose status is not ``success`` has no image, and
is rejected with img2dataset's own reason (:func:`thinkfast.data.media.media_of`).

The validator runs on the schema alone (no rows read), so a wrong corpus fails in the
first second with one sentence naming the column, not an hour later inside a Ray worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from thinkfast.errors import CorpusSchemaError

# media columns in order of preference when several exist
MEDIA_COLUMNS = ("jpg", "png", "webp", "mp4", "url")
IMAGE_MEDIA = ("jpg", "png", "webp")  # img2dataset's --encode_format names its image column
VIDEO_MEDIA = "mp4"
# img2dataset's outcome per row: "success", "failed_to_download", "failed_to_resize", ...
STATUS_COLUMN = "status"
ERROR_COLUMN = "error_message"
SUCCESS = "success"


@dataclass(frozen=True)
class CorpusColumns:
    """Which columns of a validated corpus carry what."""

    media: str  # "jpg" | "png" | "webp" | "mp4" | "url": where each row's pixels come from
    captions: str  # "caption" (one string) | "captions" (list<string>)
    has_split: bool  # a ``split`` column exists (train / val / test)
    has_width: bool  # a ``width`` integer column exists
    has_height: bool  # a ``height`` integer column exists
    has_scene: bool  # a ``scene`` JSON string column exists (generated corpus)
    key: str = "key"  # the unique row id column
    has_status: bool = False  # img2dataset's ``status`` and ``error_message`` columns both exist

    @property
    def is_video(self) -> bool:
        """True when rows are videos by schema; ``url`` rows are decided per row by media.py."""
        return self.media == VIDEO_MEDIA

    def read_columns(self) -> list[str]:
        """The columns a decoding stage needs (key, captions, media, split if present)."""
        cols = [self.key, self.captions, self.media]
        if self.has_split:
            cols.append("split")
        return self.stream_columns(cols)

    def stream_columns(self, columns: list[str]) -> list[str]:
        """``columns`` plus img2dataset's ``status`` / ``error_message`` when the corpus has
        them: a stage that sees a failed row must also see why it failed."""
        if not self.has_status:
            return list(columns)
        return list(columns) + [c for c in (STATUS_COLUMN, ERROR_COLUMN) if c not in columns]


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binary(t: pa.DataType) -> bool:
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
            or pa.types.is_fixed_size_binary(t))


def _is_string_list(t: pa.DataType) -> bool:
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return _is_string(t.value_type)
    return False


def _type_error(name: str, actual: pa.DataType, expected: str) -> CorpusSchemaError:
    return CorpusSchemaError(f"corpus column '{name}' has type {actual}, expected {expected}")


def validate_corpus_schema(schema: pa.Schema) -> CorpusColumns:
    """Check a corpus schema; return which columns to use or raise ``CorpusSchemaError``
    naming the missing or mistyped column."""
    names = set(schema.names)
    if "key" not in names:
        raise CorpusSchemaError(f"corpus has no 'key' column (columns: {', '.join(schema.names) or 'none'})")
    if not _is_string(schema.field("key").type):
        raise _type_error("key", schema.field("key").type, "string")

    if "captions" in names:
        captions = "captions"
        if not _is_string_list(schema.field("captions").type):
            raise _type_error("captions", schema.field("captions").type, "list<string>")
    elif "caption" in names:
        captions = "caption"
        if not _is_string(schema.field("caption").type):
            raise _type_error("caption", schema.field("caption").type, "string")
    else:
        raise CorpusSchemaError(
            f"corpus has no 'caption' (string) or 'captions' (list<string>) column "
            f"(columns: {', '.join(schema.names)})")

    media = next((m for m in MEDIA_COLUMNS if m in names), None)
    if media is None:
        raise CorpusSchemaError(
            f"corpus has no media column: need 'jpg', 'png' or 'webp' (binary image), 'mp4' (binary) "
            f"or 'url' (string) "
            f"(columns: {', '.join(schema.names)})")
    media_type = schema.field(media).type
    if media != "url" and not _is_binary(media_type):
        raise _type_error(media, media_type, "binary (encoded bytes)")
    if media == "url" and not _is_string(media_type):
        raise _type_error("url", media_type, "string")

    if "split" in names and not _is_string(schema.field("split").type):
        raise _type_error("split", schema.field("split").type, "string")
    for dim in ("width", "height"):
        if dim in names and not pa.types.is_integer(schema.field(dim).type):
            raise _type_error(dim, schema.field(dim).type, "integer")
    if "scene" in names and not _is_string(schema.field("scene").type):
        raise _type_error("scene", schema.field("scene").type, "string (JSON)")
    for name in (STATUS_COLUMN, ERROR_COLUMN):
        if name in names and not _is_string(schema.field(name).type):
            raise _type_error(name, schema.field(name).type, "string (img2dataset's)")

    return CorpusColumns(
        media=media,
        captions=captions,
        has_split="split" in names,
        has_width="width" in names,
        has_height="height" in names,
        has_scene="scene" in names,
        has_status=STATUS_COLUMN in names and ERROR_COLUMN in names,
    )


def corpus_schema(media: str = "jpg", with_scene: bool = False) -> pa.Schema:
    """The schema thinkfast writes (synth, loaders): ``captions`` list form, split, size."""
    if media not in MEDIA_COLUMNS:
        raise ValueError(f"media must be one of {MEDIA_COLUMNS}, got {media!r}")
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("captions", pa.list_(pa.string())),
        pa.field(media, pa.string() if media == "url" else pa.binary()),
        pa.field("split", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
    if with_scene:
        fields.append(pa.field("scene", pa.string()))
    return pa.schema(fields)


VALID_SPLITS = ("train", "val", "test")
