"""Training data without Ray: the corpus's small columns, decoded split rows, the data
order, and the assembly of one step's pairs.

Both trainers use these functions. Ray Data runs :func:`decode_split` as its
``map_batches`` UDF and each Ray Train rank assembles its steps with :func:`to_pairs`; the
in-process trainer (:func:`thinkfast.training.fit`) calls the same two on a split read in
one process. With ``data_order="permutation"`` (the default) both visit the rows in the
same order, :class:`ShardRows`: sorted by key, then permuted by ``(seed, epoch)``, so one
Ray worker and the in-process trainer see the same batches.

Decoded rows: ``key`` (str), ``captions`` (JSON list of str), ``pixels`` (float16
(3, S, S) or (F, 3, S, S)), ``reject`` ("" when decoded, else ``reason: detail``). With
``caption_sampling="all"`` each caption becomes its own row (captions = [that one]). A row
that fails to decode is kept with its reject reason; the step skips it and counts it.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from thinkfast.data.splits import SPLITS, splits_of
from thinkfast.errors import CorpusSchemaError, ThinkfastError

if TYPE_CHECKING:
    import torch

    from thinkfast.data.schema import CorpusColumns

logger = logging.getLogger(__name__)

# decoded pixels travel (and are cached) as float16: half the object-store memory of
# float32; normalised pixel values lose < 1e-3, far below what training notices
PIXEL_DTYPE = np.float16
ROW_FIELDS = ("key", "captions", "pixels", "reject")


@dataclass(frozen=True)
class CorpusInfo:
    """What the driver learns from the small columns before training starts."""

    uri: str  # the corpus URI as given
    files: tuple[str, ...]  # its Parquet files (full URIs), what Ray Data reads
    columns: "CorpusColumns"  # media / captions column names, has_split
    counts: dict[str, int]  # rows per split (train / val / test)
    train_captions: tuple[str, ...]  # every caption of the train split (vocabulary source)
    is_video: bool  # media column is mp4 (pixels are (F, 3, S, S))


def inspect_corpus(uri: str) -> CorpusInfo:
    """Validate the corpus (every file's schema) and read its small columns."""
    from thinkfast.data import reader
    from thinkfast.data.media import captions_of

    found = reader.inspect_corpus(uri)
    columns = found.columns
    wanted = [columns.key, columns.captions] + (["split"] if columns.has_split else [])
    table = reader.read_table(uri, columns=wanted)
    keys = [str(k) for k in table.column(columns.key).to_pylist()]
    if len(set(keys)) != len(keys):
        raise CorpusSchemaError(f"corpus {uri}: column '{columns.key}' has duplicate values")
    splits = splits_of(keys, table.column("split").to_pylist() if columns.has_split else None)
    counts = {s: 0 for s in SPLITS}
    train_captions: list[str] = []
    for split, caps in zip(splits, table.column(columns.captions).to_pylist()):
        counts[split] = counts.get(split, 0) + 1
        if split == "train":
            train_captions.extend(captions_of({columns.captions: caps}, columns))
    if counts["train"] == 0:
        raise ThinkfastError(f"corpus {uri} has no rows in the train split")
    logger.info("corpus %s: %s rows per split, %d train captions", uri, counts, len(train_captions))
    return CorpusInfo(uri=uri, files=found.files, columns=columns, counts=counts,
                      train_captions=tuple(train_captions), is_video=columns.is_video)


def decode_split(batch: pa.Table | Sequence[Mapping], columns: "CorpusColumns", split: str, image_size: int,
                 num_frames: int, explode_captions: bool) -> dict[str, np.ndarray]:
    """Keep this split's rows, decode their media (``thinkfast.data.decode``), keep rejects
    with a reason. Ray Data's decode UDF, and the in-process trainer's decode."""
    from thinkfast.data.decode import decode_rows
    from thinkfast.data.media import captions_of

    rows = batch.to_pylist() if isinstance(batch, pa.Table) else list(batch)
    values = [r.get("split") for r in rows] if columns.has_split else None
    rows = [r for r, s in zip(rows, splits_of([r.get(columns.key) for r in rows], values)) if s == split]
    shape = (num_frames, 3, image_size, image_size) if columns.is_video else (3, image_size, image_size)
    out: dict[str, list] = {name: [] for name in ROW_FIELDS}
    for row in rows:
        caps = captions_of(row, columns)
        decoded = decode_rows([row], columns, image_size, num_frames, key_column=columns.key, require_captions=True)
        array = np.zeros(shape, dtype=PIXEL_DTYPE)
        reject = ""
        if decoded.rejects:
            reject = f"{decoded.rejects[0].reason}: {decoded.rejects[0].detail}"
        else:
            # C order: decoders hand back channels-last views, Arrow (Ray Data) hands back C
            # order, and convolutions round differently on the two layouts
            array = np.ascontiguousarray(decoded.pixels[0].numpy(), dtype=PIXEL_DTYPE)
            if array.shape != shape:
                reject = f"bad_shape: decoded {tuple(array.shape)}, expected {shape}"
                array = np.zeros(shape, dtype=PIXEL_DTYPE)
        groups = [[c] for c in caps] if (explode_captions and caps and not reject) else [caps]
        for group in groups:
            out["key"].append(str(row[columns.key]))
            out["captions"].append(json.dumps(group))
            out["pixels"].append(array)
            out["reject"].append(reject)
    return {
        "key": np.array(out["key"], dtype=object),
        "captions": np.array(out["captions"], dtype=object),
        "pixels": np.stack(out["pixels"]) if out["pixels"] else np.zeros((0, *shape), dtype=PIXEL_DTYPE),
        "reject": np.array(out["reject"], dtype=object),
    }


def read_split(info: CorpusInfo, split: str, image_size: int, num_frames: int, explode_captions: bool = False,
               limit: int | None = None) -> dict[str, np.ndarray]:
    """One split decoded in this process (the in-process trainer's data; small corpora).
    ``limit``: the first ``limit`` rows of the split in corpus order (validation)."""
    from thinkfast.data import reader
    from thinkfast.data.splits import select_split

    table = select_split(reader.read_table(info.uri, columns=info.columns.read_columns()), split, info.columns.key)
    if limit is not None:
        table = table.slice(0, limit)
    return decode_split(table, info.columns, split, image_size, num_frames, explode_captions)


def decoded_bytes_per_row(is_video: bool, image_size: int, num_frames: int) -> int:
    """Bytes of one decoded row's pixels (to decide whether caching / holding fits)."""
    frames = num_frames if is_video else 1
    return frames * 3 * image_size * image_size * np.dtype(PIXEL_DTYPE).itemsize


def sample_captions(captions_json: Iterable[str], keys: Iterable[str], seed: int, epoch: int) -> list[str]:
    """One caption per row, drawn afresh each epoch but reproducibly (seed, epoch, key)."""
    out: list[str] = []
    for key, text in zip(keys, captions_json):
        caps = json.loads(text)
        rng = np.random.default_rng([seed, epoch, zlib.crc32(str(key).encode("utf-8"))])
        out.append(caps[int(rng.integers(len(caps)))])
    return out


# ---------------------------------------------------------------- data order


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of ``n`` key-sorted rows in ``epoch``: a pure function of
    (n, seed, epoch), so any process (a Ray rank, the in-process trainer, a resumed run)
    draws the same one."""
    return np.random.default_rng([seed, epoch, 0x7F4A]).permutation(n)


class ShardRows:
    """Decoded rows held in memory, sorted by (key, captions), visited per epoch in
    :func:`epoch_permutation` order: the ``permutation`` data order of both trainers (each
    Ray rank holds the whole split and takes its part of every global batch)."""

    def __init__(self, rows: Mapping[str, np.ndarray]) -> None:
        keys = [str(k) for k in rows["key"]]
        captions = [str(c) for c in rows["captions"]]
        order = sorted(range(len(keys)), key=lambda i: (keys[i], captions[i]))
        self.rows = {name: np.asarray(rows[name])[order] for name in ROW_FIELDS}

    @classmethod
    def concat(cls, batches: Iterable[Mapping[str, np.ndarray]]) -> "ShardRows":
        """From a stream of decoded batches (a Ray shard's ``iter_batches``)."""
        parts = [b for b in batches if len(b["key"])]
        if not parts:
            raise ThinkfastError("this rank's shard of the train split holds no rows")
        return cls({name: np.concatenate([np.asarray(p[name]) for p in parts]) for name in ROW_FIELDS})

    def __len__(self) -> int:
        return len(self.rows["key"])

    def batches(self, epoch: int, rows_per_step: int, seed: int, start: int = 0, rank: int = 0,
                world: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """This rank's batches of ``rows_per_step`` rows in ``epoch``, from step ``start`` on
        (a resumed epoch skips the steps it already did). Step ``s`` of the ``world`` ranks
        together takes the permutation's rows ``[s*W*B, (s+1)*W*B)``, rank ``r`` the ``r``-th
        block of ``B`` of them: the global batch one process with batch ``W*B`` would take,
        and which rank trains on which row is itself a function of (seed, epoch)."""
        perm = epoch_permutation(len(self), seed, epoch)
        span = rows_per_step * world
        for begin in range(start * span, len(perm) - span + 1, span):
            idx = perm[begin + rank * rows_per_step:begin + (rank + 1) * rows_per_step]
            yield {name: values[idx] for name, values in self.rows.items()}


# ---------------------------------------------------------------- one step's pairs


@dataclass
class PairBatch:
    """One step's pairs on one rank, rejected rows already removed."""

    keys: list[str]  # image key of each pair
    captions: list[str]  # the caption of each pair (sampled for this epoch)
    pixels: "torch.Tensor"  # (B, 3, S, S) or (B, F, 3, S, S) float32; (B, 0) when the trunk is cached
    teacher_scores: "torch.Tensor | None"  # (B, B) precomputed h(x_j, y_i), or None
    rejected: dict[str, str]  # key -> reason of rows skipped in this batch
    weight: float = 1.0  # 0.0 when every row was rejected: the step still runs (DDP's collectives) but learns nothing
    trunk: "dict[str, torch.Tensor] | None" = None  # cached frozen-trunk outputs (thinkfast.training.frozen)
    teacher_tokens: "torch.Tensor | None" = None  # (B, T, D) cached teacher phi(x) (distill with cache_frozen)


def to_pairs(batch: Mapping[str, np.ndarray], seed: int, epoch: int, rank: int = 0) -> PairBatch:
    """Numpy batch of decoded rows -> tensors; grouped rows (hard negatives / teacher-score
    blocks: ``pixels`` (G, ...) per row, JSON lists per row) are flattened to pairs.
    ``rank`` does not change the result (captions are drawn per key)."""
    import torch

    from thinkfast.training.frozen import batch_fields

    grouped = "group_size" in batch
    if grouped:
        keys = [k for row in batch["key"] for k in json.loads(row)]
        caps = [c for row in batch["captions"] for c in json.loads(row)]
        rejects = [r for row in batch["reject"] for r in json.loads(row)]
        pixels = np.concatenate(list(batch["pixels"]), axis=0)
        caps_json = [json.dumps(c) for c in caps]
    else:
        keys = [str(k) for k in batch["key"]]
        caps_json = [str(c) for c in batch["captions"]]
        rejects = [str(r) for r in batch["reject"]]
        pixels = np.asarray(batch["pixels"])
    keep = [i for i, r in enumerate(rejects) if not r]
    rejected = {keys[i]: rejects[i] for i, r in enumerate(rejects) if r}
    weight = 1.0
    if not keep:  # all rejected: keep the (zero) rows so this rank still joins the step, at weight 0
        keep, weight = list(range(len(keys))), 0.0
        caps_json = [json.dumps(["[UNK]"]) for _ in keys]
    scores = None
    if "scores" in batch:
        if len(batch["scores"]) != 1:
            raise ValueError("teacher-score blocks must be iterated one block per step")
        full = torch.as_tensor(np.asarray(batch["scores"][0], dtype=np.float32))  # (G, G)
        idx = torch.as_tensor(keep, dtype=torch.long)
        scores = full[idx][:, idx]  # (B, B)
    captions = sample_captions([caps_json[i] for i in keep], [keys[i] for i in keep], seed, epoch)
    trunk, tokens = (None, None) if grouped else batch_fields(batch, keep)
    return PairBatch(
        keys=[keys[i] for i in keep],
        captions=captions,
        pixels=torch.as_tensor(np.ascontiguousarray(pixels[keep]), dtype=torch.float32),  # C order: see decode_split
        teacher_scores=scores,
        rejected=rejected,
        weight=weight,
        trunk=trunk,
        teacher_tokens=tokens,
    )
