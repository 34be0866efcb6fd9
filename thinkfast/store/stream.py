"""The Arrow tables that carry rows through ``embed``'s stream, built and taken apart here
so that the Ray stages only move them (``pipelines/embed`` holds no table logic).

One stream carries every input row to the sink, good or bad: a row that fails is not
dropped but marked (``stage``, ``reason``, ``detail`` set, payload null) and passed on,
so counting at the sink accounts for every input row exactly once. Pixels and tokens
travel as raw little-endian bytes with an explicit shape column, which keeps variable
shapes (images next to videos in a ``url`` corpus) and rejected rows (no pixels) in one
schema without Ray's tensor extension types.

    decoded_table(DecodedRows)            key, stage, reason, detail, pixels, pixel_shape
    media_table(...)                      key, stage, reason, detail, [embedding], [tokens, token_shape], embedded_at
    split_media(table) -> MediaBundle     what the sink writes to fast/, tokens/, rejected/
    drop_keys(batch, keys=...)            the rows of repeated keys left out (the driver handles them)
    explode_captions(...)                 key, caption_index, caption  (one row per caption)
    texts_table(...)                      key, caption_index, caption, embedding
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from thinkfast.data.decode import REJECT_SCHEMA, Reject
from thinkfast.store.embeddings import embedding_matrix
from thinkfast.store.errors import StoreError

if TYPE_CHECKING:
    from thinkfast.data.decode import DecodedRows

# the status columns every stage emits (REJECT_SCHEMA's); ``stage`` is null for a good row
STATUS_FIELDS = list(REJECT_SCHEMA)
STATUS_NAMES = REJECT_SCHEMA.names
DECODED_SCHEMA = pa.schema(
    STATUS_FIELDS
    + [
        pa.field("pixels", pa.large_binary()),  # float32 bytes of (3,S,S) or (F,3,S,S)
        pa.field("pixel_shape", pa.list_(pa.int32())),
    ]
)
CAPTIONS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("caption_index", pa.int32()),
        pa.field("caption", pa.string()),
    ]
)
TEXTS_COLUMNS = ["key", "caption_index", "caption", "embedding"]


def fixed_size_list(rows: Sequence[np.ndarray | None], dim: int) -> pa.FixedSizeListArray:
    """Rows of (d,) float32 (None = null) -> fixed_size_list<float32>[d] with nulls."""
    valid = np.array([r is not None for r in rows], dtype=bool)
    flat = np.zeros((len(rows), dim), dtype=np.float32)  # (B, d); zeros under nulls
    for i, r in enumerate(rows):
        if r is not None:
            flat[i] = r
    mask = pa.array(~valid) if not valid.all() else None
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float32()), dim, mask=mask)


# --------------------------------------------------------------------------- decode -> embed


def decoded_table(decoded: "DecodedRows") -> pa.Table:
    """The decode stage's output: the usable rows with their pixels, then one marked row
    per reject (null pixels)."""
    keys: list[str | None] = []
    pixels: list[bytes | None] = []
    shapes: list[list[int] | None] = []
    for key, tensor in zip(decoded.keys, decoded.pixels):
        array = np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)
        keys.append(key)
        pixels.append(array.tobytes())
        shapes.append(list(array.shape))
    n = len(keys)
    rejects = decoded.rejects
    return pa.Table.from_pydict(
        {
            "key": keys + [r.key for r in rejects],
            "stage": [None] * n + [r.stage for r in rejects],
            "reason": [None] * n + [r.reason for r in rejects],
            "detail": [None] * n + [r.detail for r in rejects],
            "pixels": pixels + [None] * len(rejects),
            "pixel_shape": shapes + [None] * len(rejects),
        },
        schema=DECODED_SCHEMA,
    )


@dataclass
class StatusColumns:
    """The status of each row of a batch, mutable while a stage marks more rows."""

    keys: list[str | None]
    stages: list[str | None]
    reasons: list[str | None]
    details: list[str | None]

    @classmethod
    def of(cls, batch: pa.Table) -> "StatusColumns":
        return cls(*(batch.column(n).to_pylist() for n in STATUS_NAMES))

    def mark(self, i: int, stage: str, reason: str, detail: str) -> None:
        """Reject row ``i`` (the detail normalised as every :class:`Reject`'s is)."""
        r = Reject(self.keys[i], stage, reason, detail)
        self.stages[i], self.reasons[i], self.details[i] = r.stage, r.reason, r.detail

    def arrays(self) -> dict[str, pa.Array]:
        return {
            "key": pa.array(self.keys, pa.string()),
            "stage": pa.array(self.stages, pa.string()),
            "reason": pa.array(self.reasons, pa.string()),
            "detail": pa.array(self.details, pa.string()),
        }


def pixel_groups(batch: pa.Table) -> dict[tuple[int, ...], tuple[list[int], list[np.ndarray]]]:
    """Good rows of a decoded batch grouped by pixel shape (images and videos cannot share
    a tensor): shape -> (row indices, float32 arrays of that shape)."""
    stages = batch.column("stage").to_pylist()
    raw = batch.column("pixels").to_pylist()
    shapes = batch.column("pixel_shape").to_pylist()
    groups: dict[tuple[int, ...], tuple[list[int], list[np.ndarray]]] = defaultdict(lambda: ([], []))
    for i, stage in enumerate(stages):
        if stage is None:
            shape = tuple(shapes[i])
            rows, arrays = groups[shape]
            rows.append(i)
            arrays.append(np.frombuffer(raw[i], dtype=np.float32).reshape(shape))
    return dict(groups)


def media_table(
    status: StatusColumns,
    embeddings: Sequence[np.ndarray | None] | None,
    dim: int | None,
    tokens: Sequence[np.ndarray | None] | None,
    embedded_at: float,
) -> pa.Table:
    """The embed stage's output: status, ``embedding`` (fast model; None = no fast model),
    ``tokens`` + ``token_shape`` (slow model; float16 bytes of (T, D)), and ``embedded_at``
    (when the batch left the models, unix s: the sink measures steady throughput with it;
    never written out)."""
    columns = status.arrays()
    if embeddings is not None:
        columns["embedding"] = fixed_size_list(embeddings, int(dim or 0))
    if tokens is not None:
        columns["tokens"] = pa.array(
            [None if t is None else np.ascontiguousarray(t, dtype=np.float16).tobytes() for t in tokens], pa.large_binary())
        columns["token_shape"] = pa.array([None if t is None else list(t.shape) for t in tokens], pa.list_(pa.int32()))
    columns["embedded_at"] = pa.array(np.full(len(status.keys), embedded_at), pa.float64())
    return pa.table(columns)


# --------------------------------------------------------------------------- embed -> sink


@dataclass
class MediaBundle:
    """One write bundle split for the sink: good rows' keys, vectors, tokens; the rejected rows."""

    keys: list[str]
    vectors: np.ndarray | None  # (B, d) float32, None without a fast model
    tokens: np.ndarray | None  # (B, T, D) float16, None without a slow model
    rejected: pa.Table  # REJECT_SCHEMA

    def rejected_reasons(self) -> list[str]:
        """``stage:reason`` of each rejected row."""
        return [f"{s}:{r}" for s, r in zip(self.rejected.column("stage").to_pylist(),
                                            self.rejected.column("reason").to_pylist())]


def split_media(table: pa.Table) -> MediaBundle:
    """Good rows (``stage`` null) and marked rows of an embed-stage table."""
    good = table.filter(pc.is_null(table.column("stage")))
    bad = table.filter(pc.is_valid(table.column("stage")))
    vectors = tokens = None
    if good.num_rows and "embedding" in good.column_names:
        vectors = embedding_matrix(good.column("embedding"), "embed stream")
    if good.num_rows and "tokens" in good.column_names:
        shapes = {tuple(s) for s in good.column("token_shape").to_pylist()}
        if len(shapes) != 1:
            raise StoreError(f"one write bundle holds token shapes {sorted(shapes)}; mixed media lengths")
        (t, d), = shapes
        blob = b"".join(good.column("tokens").to_pylist())
        tokens = np.frombuffer(blob, dtype=np.float16).reshape(good.num_rows, t, d)  # (B, T, D)
    rejected = bad.select(REJECT_SCHEMA.names).cast(REJECT_SCHEMA)
    return MediaBundle(good.column("key").to_pylist(), vectors, tokens, rejected)


# --------------------------------------------------------------------------- repeated keys


def drop_keys(batch: pa.Table, *, keys: frozenset[str] | set[str]) -> pa.Table:
    """``batch`` without the rows whose ``key`` is in ``keys``: the rows of repeated keys,
    which the driver accounts for itself (their rejects are written up front and the kept
    copy joins the stream separately), so no stage ever sees a key twice."""
    if not keys or not batch.num_rows:
        return batch
    mask = pc.is_in(batch.column("key"), value_set=pa.array(sorted(keys), pa.string()))
    return batch.filter(pc.invert(pc.fill_null(mask, False)))


# --------------------------------------------------------------------------- captions


def explode_captions(batch: pa.Table, *, caption_column: str) -> pa.Table:
    """Corpus rows -> one row per caption (``key``, ``caption_index``, ``caption``).

    ``caption_column`` is ``caption`` (string) or ``captions`` (list<string>). Null or
    blank captions are kept with a null ``caption`` so the sink can count them as skipped
    (a blank text has no tokens to encode) instead of losing them silently."""
    out_keys: list[str | None] = []
    index: list[int] = []
    captions: list[str | None] = []
    for key, value in zip(batch.column("key").to_pylist(), batch.column(caption_column).to_pylist()):
        texts = value if caption_column == "captions" else [value]
        for i, text in enumerate(texts or []):
            out_keys.append(key)
            index.append(i)
            captions.append(text if (text is not None and text.strip()) else None)
    return pa.table(
        {
            "key": pa.array(out_keys, pa.string()),
            "caption_index": pa.array(index, pa.int32()),
            "caption": pa.array(captions, pa.string()),
        },
        schema=CAPTIONS_SCHEMA,
    )


def texts_table(batch: pa.Table, embeddings: Sequence[np.ndarray | None], dim: int) -> pa.Table:
    """A caption batch with its ``embedding`` column (null for a skipped blank caption)."""
    return pa.table(
        {
            "key": batch.column("key"),
            "caption_index": batch.column("caption_index"),
            "caption": batch.column("caption"),
            "embedding": fixed_size_list(embeddings, dim),
        }
    )
