"""The Ray Data stages of ``thinkfast embed``: decode (tasks), embed (actor pool), captions.

One stream carries every input row to the sink, good or bad, so that nothing is lost
between stages: a row that fails is not dropped but marked (``stage``, ``reason``,
``detail`` set, payload null) and passed on; the sink splits the stream into ``fast/`` +
``tokens/`` (good rows) and ``rejected/`` (marked rows). Counting at the sink therefore
accounts for every input row exactly once.

Batches are ``pyarrow.Table``s end to end (``batch_format="pyarrow"``): pixels and tokens
travel as raw little-endian bytes with an explicit shape column, which keeps variable
shapes (images next to videos in a ``url`` corpus) and rejected rows (no pixels) in one
schema without Ray's tensor extension types.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from thinkfast.errors import DecodeError

logger = logging.getLogger(__name__)

# columns every stage emits; ``stage`` is null for a good row
STATUS_FIELDS = [
    pa.field("key", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
]
DECODED_SCHEMA = pa.schema(
    STATUS_FIELDS
    + [
        pa.field("pixels", pa.large_binary()),  # float32 bytes of (3,S,S) or (F,3,S,S)
        pa.field("pixel_shape", pa.list_(pa.int32())),
    ]
)
# detail strings are cut to this many characters (an exception message can be huge)
MAX_DETAIL = 500


def _detail(text: str) -> str:
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


# --------------------------------------------------------------------------- decode


def decode_batch(
    batch: pa.Table,
    *,
    columns: Any,
    image_size: int,
    num_frames: int,
    max_pixels: int | None = None,
    s3_endpoint: str | None = None,
) -> pa.Table:
    """Corpus rows -> decoded pixels, or a rejection per row (never an exception per row).

    ``columns`` is the ``CorpusColumns`` of the corpus (which media column to use). Runs
    in Ray Data tasks; a ``DecodeError`` becomes ``stage="decode"`` with its reason, any
    other exception ``reason="decode_error"`` with the exception as detail (logged, since
    it may be a bug rather than a bad file)."""
    from thinkfast.data.media import load_pixels

    kwargs: dict[str, Any] = {"s3_endpoint": s3_endpoint}
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
    keys: list[str | None] = []
    stages: list[str | None] = []
    reasons: list[str | None] = []
    details: list[str | None] = []
    pixels: list[bytes | None] = []
    shapes: list[list[int] | None] = []

    def reject(key: Any, stage: str, reason: str, detail: str) -> None:
        keys.append(key)
        stages.append(stage)
        reasons.append(reason)
        details.append(_detail(detail))
        pixels.append(None)
        shapes.append(None)

    for row in batch.to_pylist():
        key = row.get("key")
        if key is None or key == "":
            reject(None, "read", "missing_key", "row has a null or empty key")
            continue
        key = str(key)
        try:
            tensor = load_pixels(row, columns, image_size, num_frames, **kwargs)
        except DecodeError as exc:
            reject(key, "decode", exc.reason, exc.detail or str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the corpus
            logger.warning("unexpected decode failure for key %r: %r", key, exc)
            reject(key, "decode", "decode_error", f"{type(exc).__name__}: {exc}")
            continue
        array = tensor.detach().cpu().numpy().astype(np.float32, copy=False)
        keys.append(key)
        stages.append(None)
        reasons.append(None)
        details.append(None)
        pixels.append(np.ascontiguousarray(array).tobytes())
        shapes.append(list(array.shape))
    return pa.Table.from_pydict(
        {
            "key": keys,
            "stage": stages,
            "reason": reasons,
            "detail": details,
            "pixels": pixels,
            "pixel_shape": shapes,
        },
        schema=DECODED_SCHEMA,
    )


# --------------------------------------------------------------------------- embed


def _select_threads(threads: int | None, pool_size: int) -> int:
    """Torch intra-op threads for this actor: the flag, else this node's cores shared
    evenly by the pool (at least 1). Ray's CPU reservation is only a scheduling count
    (fractional so decode tasks always fit), so it is no guide to how many threads a
    model should run; decode tasks are light next to the model and share the cores."""
    if threads:
        return int(threads)
    return max(1, (os.cpu_count() or 1) // max(1, pool_size))


class EmbedActor:
    """Actor-pool UDF: loads the fast and/or slow model once, then embeds decoded batches.

    Output per row: the status columns, ``embedding`` (fixed_size_list<float32>[d], fast
    model) and ``tokens`` (float16 bytes of ``token_shape`` (T, D), slow model), null on
    rejected rows, and ``embedded_at`` (when the batch was done; never written out).
    A batch the model fails on is retried row by row so that only the
    culprit is rejected (``stage="embed"``); non-finite outputs are rejected too, because
    an index or token store must never hold NaN."""

    def __init__(
        self,
        fast_uri: str | None,
        slow_uri: str | None,
        device: str = "cpu",
        threads: int | None = None,
        pool_size: int = 1,
    ) -> None:
        import torch

        self.torch = torch
        self.num_threads = _select_threads(threads, pool_size)
        torch.set_num_threads(self.num_threads)
        self.device = torch.device(device)
        self.fast = self.slow = None
        if fast_uri:
            from thinkfast.models.fast import FastModel

            self.fast = FastModel.from_pretrained(fast_uri).to(self.device).eval()
        if slow_uri:
            from thinkfast.models.slow import SlowModel

            self.slow = SlowModel.from_pretrained(slow_uri).to(self.device).eval()
        self.dim = int(self.fast.config.embed_dim) if self.fast is not None else None
        logger.info(
            "embed actor ready (pid %d, %s, %d threads, fast=%s, slow=%s)",
            os.getpid(), self.device, self.num_threads, fast_uri, slow_uri,
        )

    def _run_models(self, pixels: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(B, ...) pixels -> (embeddings (B, d) float32, tokens (B, T, D) float16)."""
        torch = self.torch
        with torch.inference_mode():
            x = pixels.to(self.device, non_blocking=True)
            emb = self.fast.encode_image(x).float().cpu().numpy() if self.fast is not None else None
            tok = self.slow.encode_visual(x).to(torch.float16).cpu().numpy() if self.slow is not None else None
        return emb, tok

    def _embed_group(self, arrays: list[np.ndarray]) -> list[tuple[np.ndarray | None, np.ndarray | None] | str]:
        """Embed same-shape inputs; per item either (emb, tok) or an error string."""
        torch = self.torch
        try:
            emb, tok = self._run_models(torch.from_numpy(np.stack(arrays)))
            return [(None if emb is None else emb[i], None if tok is None else tok[i]) for i in range(len(arrays))]
        except Exception as exc:  # noqa: BLE001 - isolate the row that breaks the batch
            if len(arrays) == 1:
                return [f"{type(exc).__name__}: {exc}"]
            logger.warning("batch of %d failed (%r); retrying row by row", len(arrays), exc)
            return [r for a in arrays for r in self._embed_group([a])]

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = batch.column("key").to_pylist()
        stages = batch.column("stage").to_pylist()
        reasons = batch.column("reason").to_pylist()
        details = batch.column("detail").to_pylist()
        raw = batch.column("pixels").to_pylist()
        shapes = batch.column("pixel_shape").to_pylist()

        # group good rows by pixel shape: images and videos cannot share a tensor
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, stage in enumerate(stages):
            if stage is None:
                groups[tuple(shapes[i])].append(i)
        embeddings: list[np.ndarray | None] = [None] * len(keys)
        tokens: list[bytes | None] = [None] * len(keys)
        token_shapes: list[list[int] | None] = [None] * len(keys)
        for shape, rows in groups.items():
            arrays = [np.frombuffer(raw[i], dtype=np.float32).reshape(shape) for i in rows]
            for i, result in zip(rows, self._embed_group(arrays)):
                if isinstance(result, str):
                    stages[i], reasons[i], details[i] = "embed", "model_error", _detail(result)
                    continue
                emb, tok = result
                if (emb is not None and not np.isfinite(emb).all()) or (tok is not None and not np.isfinite(tok).all()):
                    stages[i], reasons[i] = "embed", "non_finite"
                    details[i] = "model output has NaN or inf (tokens may overflow float16)"
                    continue
                embeddings[i] = emb
                if tok is not None:
                    tokens[i] = np.ascontiguousarray(tok).tobytes()
                    token_shapes[i] = list(tok.shape)

        columns: dict[str, pa.Array] = {
            "key": pa.array(keys, pa.string()),
            "stage": pa.array(stages, pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "detail": pa.array(details, pa.string()),
        }
        if self.fast is not None:
            columns["embedding"] = _fixed_size_list(embeddings, self.dim)
        if self.slow is not None:
            columns["tokens"] = pa.array(tokens, pa.large_binary())
            columns["token_shape"] = pa.array(token_shapes, pa.list_(pa.int32()))
        # when this batch left the models (unix s): lets the sink measure steady throughput
        columns["embedded_at"] = pa.array(np.full(len(keys), time.time()), pa.float64())
        return pa.table(columns)


def _fixed_size_list(rows: list[np.ndarray | None], dim: int) -> pa.FixedSizeListArray:
    """Rows of (d,) float32 (None = null) -> fixed_size_list<float32>[d] with nulls."""
    valid = np.array([r is not None for r in rows], dtype=bool)
    flat = np.zeros((len(rows), dim), dtype=np.float32)  # (B, d); zeros under nulls
    for i, r in enumerate(rows):
        if r is not None:
            flat[i] = r
    mask = pa.array(~valid) if not valid.all() else None
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float32()), dim, mask=mask)


# --------------------------------------------------------------------------- captions

CAPTIONS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("caption_index", pa.int32()),
        pa.field("caption", pa.string()),
    ]
)


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


class TextEmbedActor:
    """Actor-pool UDF: ``g(y)`` for each non-blank caption with the fast text encoder.

    Output: ``key``, ``caption_index``, ``caption``, ``embedding``
    (fixed_size_list<float32>[d], null for a skipped blank caption)."""

    def __init__(self, fast_uri: str, device: str = "cpu", threads: int | None = None, pool_size: int = 1) -> None:
        import torch

        from thinkfast.models.fast import FastModel

        self.torch = torch
        torch.set_num_threads(_select_threads(threads, pool_size))
        self.device = torch.device(device)
        self.fast = FastModel.from_pretrained(fast_uri).to(self.device).eval()
        self.dim = int(self.fast.config.embed_dim)

    def __call__(self, batch: pa.Table) -> pa.Table:
        captions = batch.column("caption").to_pylist()
        rows = [i for i, c in enumerate(captions) if c is not None]
        embeddings: list[np.ndarray | None] = [None] * len(captions)
        if rows:
            enc = self.fast.tokenize([captions[i] for i in rows])
            with self.torch.inference_mode():
                out = self.fast.encode_text(
                    enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
                ).float().cpu().numpy()  # (B, d)
            for j, i in enumerate(rows):
                embeddings[i] = out[j]
        return pa.table(
            {
                "key": batch.column("key"),
                "caption_index": batch.column("caption_index"),
                "caption": batch.column("caption"),
                "embedding": _fixed_size_list(embeddings, self.dim),
            }
        )
