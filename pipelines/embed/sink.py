"""The Ray Data sink of ``thinkfast embed``: one stream split into fast/, tokens/, rejected/.

Each ``write`` call receives a bundle of at least ``rows_per_write`` rows (Ray Data
coalesces blocks for us via ``min_rows_per_write``) and hands it to
:func:`thinkfast.store.outputs.write_media_bundle` (``fast/part-<hash>.parquet``, one token
shard, ``rejected/part-<hash>.parquet``) or, for the ``texts/`` output of ``--texts``
(``kind="texts"``), :func:`~thinkfast.store.outputs.write_texts_bundle`. File names are
hashes of the keys they hold, so a retried write task rewrites its own files instead of
adding copies. The counts each call returns are summed on the driver in
``on_write_complete``; the driver then indexes the token shards (``finalize_token_store``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pyarrow as pa
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink, WriteResult

from thinkfast.data.decode import REJECT_SCHEMA as REJECTED_SCHEMA  # noqa: F401 - old name
from thinkfast.store.outputs import write_media_bundle, write_texts_bundle

if TYPE_CHECKING:
    from ray.data._internal.execution.interfaces import TaskContext

logger = logging.getLogger(__name__)


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
        token_format: str = "float16",
    ) -> None:
        if kind not in ("media", "texts"):
            raise ValueError(f"kind must be 'media' or 'texts', got {kind!r}")
        self.out = str(out)
        self.kind = kind
        self.rows_per_write = int(rows_per_write)
        self.s3_endpoint = s3_endpoint
        self.token_format = token_format
        self.result: dict[str, Any] = {}
        self.first_batch: tuple[float, int] | None = None  # (unix time, rows) of the first model batch out
        self.last_write_end: float | None = None  # unix time the last write finished

    def get_name(self) -> str:
        return "WriteEmbeddings" if self.kind == "media" else "WriteTexts"

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_write

    # ------------------------------------------------------------------ workers

    def write(self, blocks: Iterable[pa.Table], ctx: "TaskContext | None") -> dict:
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
            if self.kind == "texts":
                counts = write_texts_bundle(self.out, table, self.s3_endpoint)
            else:
                counts = write_media_bundle(self.out, table, self.s3_endpoint, token_format=self.token_format)
        return {"counts": counts, "t_end": time.time(), "first_embedded": first}

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
