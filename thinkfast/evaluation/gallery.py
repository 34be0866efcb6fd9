"""The evaluated gallery (one split's images or videos with their captions) and its queries.

Rows that cannot be used are kept as :class:`thinkfast.data.decode.Reject` records (the
report lists them) instead of being dropped silently; decoding goes through the same
:func:`thinkfast.data.decode.decode_rows` loop as embed and training, so a bad file is
rejected for the same reason everywhere.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from thinkfast.data.decode import Reject
from thinkfast.data.schema import CorpusColumns
from thinkfast.evaluation.config import DEFAULT_NUM_FRAMES, EvalError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass
class Gallery:
    """The split's images (or videos) and their captions, decoded lazily per image size."""

    keys: list[str]  # gallery order; query targets index into it
    captions: list[list[str]]  # captions of each gallery item
    media: list[dict[str, Any]]  # the raw corpus rows (key + media column) to decode from
    columns: CorpusColumns  # column roles of the corpus
    num_frames: int  # frames sampled per video
    rejected: list[Reject] = field(default_factory=list)
    split_by: str | None = None  # "column" | "key_hash" (split_of_key) | None (every row)
    s3_endpoint: str | None = None  # for media behind s3:// URLs
    scenes: list[dict[str, Any]] | None = None  # parsed ``scene`` JSON per item (generated corpus only)
    _pixels: dict[int, "torch.Tensor"] = field(default_factory=dict)  # size -> (N, 3, S, S) / (N, F, 3, S, S)

    @property
    def is_video(self) -> bool:
        return bool(self.columns.is_video)

    def pixels(self, image_size: int) -> "torch.Tensor":
        """All gallery pixels at ``image_size`` (decoded once per size, cached)."""
        if image_size not in self._pixels:
            import torch

            from thinkfast.data.decode import decode_rows

            decoded = decode_rows(self.media, self.columns, image_size, self.num_frames,
                                  key_column=self.columns.key, s3_endpoint=self.s3_endpoint)
            if decoded.rejects:  # the gallery was already checked once; rows must not vanish now
                first = decoded.rejects[0]
                raise EvalError(f"{len(decoded.rejects)} gallery items do not decode at size {image_size} "
                                f"(first: {first.key}: {first.reason} {first.detail})")
            self._pixels[image_size] = torch.stack(decoded.pixels)
        return self._pixels[image_size]

    def drop(self, missing: set[str], stage: str, reason: str) -> None:
        """Remove items (e.g. absent from the embeddings), recording each as rejected."""
        if not missing:
            return
        keep = [i for i, k in enumerate(self.keys) if k not in missing]
        self.rejected.extend(Reject(k, stage, reason) for k in sorted(missing))
        self.keys = [self.keys[i] for i in keep]
        self.captions = [self.captions[i] for i in keep]
        self.media = [self.media[i] for i in keep]
        if self.scenes is not None:
            self.scenes = [self.scenes[i] for i in keep]
        self._pixels = {s: p[keep] for s, p in self._pixels.items()}


@dataclass(frozen=True)
class Queries:
    """Caption queries and the gallery index of the image each one describes."""

    texts: list[str]  # (Q,) caption text
    target: np.ndarray  # (Q,) int64 index into Gallery.keys


def _split_by(corpus: str, split: str | None, has_split_column: bool) -> str | None:
    """How ``split`` selects rows; an unknown split name fails here, not as an empty gallery."""
    if split is None:
        return None
    if has_split_column:
        return "column"
    from thinkfast.data.splits import check_split

    try:
        check_split(split)
    except ValueError as exc:
        raise EvalError(f"{corpus} has no 'split' column, so splits are assigned by key hash: {exc} "
                        "(or 'all' for every row)") from exc
    logger.info("%s has no 'split' column: split %r is the rows training holds out by key hash", corpus, split)
    return "key_hash"


def load_gallery(
    corpus: str,
    split: str | None = "test",
    num_frames: int = DEFAULT_NUM_FRAMES,
    max_images: int | None = None,
    s3_endpoint: str | None = None,
    check_decode_size: int | None = None,
) -> Gallery:
    """Read the split's rows; rows that cannot be used are recorded, not dropped silently.

    ``split``: a ``split`` column value, or for a corpus without that column the split of
    :func:`thinkfast.data.splits.split_of_key` (the rows training never saw); ``None``: every
    row. ``check_decode_size`` decodes every row once at that size so undecodable media are
    found (and removed with their reason) before any model runs."""
    from thinkfast.data.decode import decode_rows
    from thinkfast.data.media import captions_of
    from thinkfast.data.reader import inspect_corpus, read_table

    info = inspect_corpus(corpus, s3_endpoint)
    columns = info.columns
    split_by = _split_by(corpus, split, columns.has_split)
    wanted = [columns.key, columns.captions, columns.media] + (["scene"] if columns.has_scene else [])
    table = read_table(corpus, columns=wanted,
                       filter_split=split, s3_endpoint=s3_endpoint, key_column=columns.key)
    if table.num_rows == 0:
        raise EvalError(f"{corpus} has no rows in split {split!r}")
    rows = table.to_pylist()
    if max_images is not None:
        rows = rows[:max_images]
    if check_decode_size is not None:
        decoded = decode_rows(rows, columns, check_decode_size, num_frames, key_column=columns.key,
                              s3_endpoint=s3_endpoint, require_captions=True)
        usable, rejected, pixels = decoded.rows, list(decoded.rejects), decoded.pixels
    else:  # media are decoded later (or never: embeddings given); only captions are needed now
        usable, rejected, pixels = [], [], []
        for row in rows:
            if captions_of(row, columns):
                usable.append(row)
            else:
                rejected.append(Reject(str(row[columns.key]), "read", "no_captions", "row has no caption"))
    scenes = [json.loads(r["scene"]) if r.get("scene") else {} for r in usable] if columns.has_scene else None
    gallery = Gallery(keys=[str(r[columns.key]) for r in usable], captions=[captions_of(r, columns) for r in usable],
                      media=usable, columns=columns, num_frames=num_frames, rejected=rejected,
                      split_by=split_by, s3_endpoint=s3_endpoint, scenes=scenes)
    if len(set(gallery.keys)) != len(gallery.keys):
        raise EvalError(f"{corpus}: duplicate keys in split {split!r}")
    if pixels:
        import torch

        gallery._pixels[check_decode_size] = torch.stack(pixels)  # type: ignore[index]
    if not gallery.keys:
        raise EvalError(f"{corpus}: no usable rows in split {split!r} ({len(gallery.rejected)} rejected)")
    logger.info("gallery: %d items from split %r (%d rejected)", len(gallery.keys), split, len(gallery.rejected))
    return gallery


def make_queries(gallery: Gallery, max_queries: int | None = None, seed: int = 0) -> Queries:
    """One query per caption; ``max_queries`` keeps a seeded random subset (same for every method)."""
    texts = [c for caps in gallery.captions for c in caps]
    target = np.asarray([i for i, caps in enumerate(gallery.captions) for _ in caps], dtype=np.int64)
    if max_queries is not None and max_queries < len(texts):
        pick = np.sort(np.random.default_rng(seed).choice(len(texts), size=max_queries, replace=False))
        texts, target = [texts[i] for i in pick], target[pick]
    return Queries(texts=texts, target=target)
