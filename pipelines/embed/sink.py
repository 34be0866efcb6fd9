"""The Ray Data sink of ``thinkfast embed``: split one stream into fast/, tokens/, rejected/.

Each ``write`` call receives a bundle of at least ``rows_per_write`` rows (Ray Data
coalesces blocks for us via ``min_rows_per_write``), splits it on the ``stage`` column and
writes, for that bundle:

* ``fast/part-<hash>.parquet`` with ``thinkfast.store.write_embeddings``;
* one token shard with ``thinkfast.store.TokenStoreWriter`` (``tokens/shard-<hash>.*``);
* ``rejected/part-<hash>.parquet`` (``key``, ``stage``, ``reason``, ``detail``).

File names are hashes of the keys they hold, so a retried write task rewrites its own
files instead of adding copies. The counts each call returns are summed on the driver in
``on_write_complete``; the driver then indexes the token shards (``finalize_token_store``).
The same class writes the ``texts/`` output of ``--texts`` (``kind="texts"``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink, WriteResult

from thinkfast.utils import fs

logger = logging.getLogger(__name__)

REJECTED_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
    ]
)


def _digest(keys: list[Any], salt: str = "") -> str:
    h = hashlib.sha1(salt.encode())
    for k in keys:
        h.update(str(k).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _write_parquet(table: pa.Table, uri: str, s3_endpoint: str | None) -> None:
    filesystem, path = fs.arrow_fs(uri, s3_endpoint)
    if not fs.is_s3(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, filesystem=filesystem)


class EmbeddingSink(Datasink[dict]):
    """Writes the embed stream (``kind="media"``) or the caption stream (``kind="texts"``).

    Every write returns its counts; after ``write_datasink`` returns, ``self.result``
    holds their sum and :meth:`steady_rows_per_s` the throughput once flowing. The token
    store is indexed afterwards by the driver (``finalize_token_store``)."""

    def __init__(
        self,
        out: str,
        *,
        kind: str = "media",
        rows_per_write: int = 1024,
        s3_endpoint: str | None = None,
    ) -> None:
        if kind not in ("media", "texts"):
            raise ValueError(f"kind must be 'media' or 'texts', got {kind!r}")
        self.out = str(out)
        self.kind = kind
        self.rows_per_write = int(rows_per_write)
        self.s3_endpoint = s3_endpoint
        self.result: dict[str, Any] = {}
        self.first_batch: tuple[float, int] | None = None  # (unix time, rows) of the first model batch out
        self.last_write_end: float | None = None  # unix time the last write finished

    def get_name(self) -> str:
        return "WriteEmbeddings" if self.kind == "media" else "WriteTexts"

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_write

    # ------------------------------------------------------------------ workers

    def write(self, blocks: Iterable[pa.Table], ctx: Any) -> dict:
        """One bundle: returns ``{"counts": {...}, "t_end": unix time, "first_embedded":
        (earliest ``embedded_at``, rows carrying it) or None}``."""
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        counts: dict = {}
        first = None
        if tables:
            table = pa.concat_tables(tables, promote_options="permissive")
            if "embedded_at" in table.column_names:
                stamps = np.asarray(table.column("embedded_at"))
                first = (float(stamps.min()), int((stamps == stamps.min()).sum()))
            counts = self._write_texts(table) if self.kind == "texts" else self._write_media(table)
        return {"counts": counts, "t_end": time.time(), "first_embedded": first}

    def _write_media(self, table: pa.Table) -> dict:
        from thinkfast.store import TokenStoreWriter, write_embeddings

        counts: Counter = Counter(rows=table.num_rows)
        good = table.filter(pc.is_null(table.column("stage")))
        bad = table.filter(pc.is_valid(table.column("stage")))
        keys = good.column("key").to_pylist()
        if good.num_rows and "embedding" in good.column_names:
            column = good.column("embedding").combine_chunks()
            vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(good.num_rows, column.type.list_size)
            write_embeddings(fs.join(self.out, "fast"), keys, vectors, s3_endpoint=self.s3_endpoint)
        if good.num_rows and "tokens" in good.column_names:
            shapes = {tuple(s) for s in good.column("token_shape").to_pylist()}
            if len(shapes) != 1:
                raise ValueError(f"one write bundle holds token shapes {sorted(shapes)}; mixed media lengths")
            (t, d), = shapes
            blob = b"".join(good.column("tokens").to_pylist())
            tokens = np.frombuffer(blob, dtype=np.float16).reshape(good.num_rows, t, d)  # (B, T, D)
            TokenStoreWriter(fs.join(self.out, "tokens"), self.s3_endpoint).write(keys, tokens)
        counts["embedded"] = good.num_rows
        if bad.num_rows:
            rejected = bad.select(REJECTED_SCHEMA.names).cast(REJECTED_SCHEMA)
            name = f"part-{_digest(rejected.column('key').to_pylist(), 'rejected')}.parquet"
            _write_parquet(rejected, fs.join(self.out, "rejected", name), self.s3_endpoint)
            for stage, reason in zip(bad.column("stage").to_pylist(), bad.column("reason").to_pylist()):
                counts[f"rejected:{stage}:{reason}"] += 1
        counts["rejected"] = bad.num_rows
        return dict(counts)

    def _write_texts(self, table: pa.Table) -> dict:
        table = table.select(["key", "caption_index", "caption", "embedding"])
        good = table.filter(pc.is_valid(table.column("caption")))
        if good.num_rows:
            ids = [f"{k}\x1f{i}" for k, i in zip(good.column("key").to_pylist(), good.column("caption_index").to_pylist())]
            name = f"part-{_digest(ids, 'texts')}.parquet"
            _write_parquet(good, fs.join(self.out, "texts", name), self.s3_endpoint)
        return {"rows": table.num_rows, "texts": good.num_rows, "texts_skipped_blank": table.num_rows - good.num_rows}

    # ------------------------------------------------------------------ driver

    def on_write_complete(self, write_result: WriteResult[dict]) -> None:
        total: Counter = Counter()
        for ret in write_result.write_returns:
            total.update(ret["counts"])
        self.result = dict(total)
        firsts = [ret["first_embedded"] for ret in write_result.write_returns if ret["first_embedded"]]
        if firsts:
            t0 = min(t for t, _ in firsts)
            self.first_batch = (t0, sum(n for t, n in firsts if t == t0))
        ends = [ret["t_end"] for ret in write_result.write_returns if ret["counts"]]
        self.last_write_end = max(ends) if ends else None
        logger.info("%s: %s", self.get_name(), self.result)

    def steady_rows_per_s(self) -> float | None:
        """Rows per second once the stream is flowing: the rows after the first model
        batch, over the time from that batch leaving the actors to the last write ending.
        Leaves out start-up (actor launch, model loading, the first blocks read and
        decoded), a fixed cost that a long run amortises; None if nothing was embedded
        after the first batch."""
        if self.first_batch is None or self.last_write_end is None:
            return None
        t0, first_rows = self.first_batch
        rows = int(self.result.get("rows", 0)) - first_rows
        elapsed = self.last_write_end - t0
        return rows / elapsed if rows > 0 and elapsed > 0 else None
