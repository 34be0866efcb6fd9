"""The Ray Data stages of ``thinkfast embed``: read, decode (tasks), embed (actor pool), captions.

Thin adapters: the decode loop is :func:`thinkfast.data.decode.decode_rows` (the one
Reject type), the model passes are :mod:`thinkfast.encode`, and the tables that travel
between stages are built and read by :mod:`thinkfast.store.stream` (see there for the
"every row reaches the sink, marked if it failed" contract). What stays here is what
only a Ray stage needs: loading models once per actor, thread counts, and isolating the
row that breaks a model batch.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from thinkfast.store.stream import (  # noqa: F401 - re-exported: the stream's schemas, by their old names
    CAPTIONS_SCHEMA,
    DECODED_SCHEMA,
    StatusColumns,
    decoded_table,
    explode_captions,
    fixed_size_list as _fixed_size_list,
    media_table,
    pixel_groups,
    texts_table,
)

if TYPE_CHECKING:
    import ray.data

    from thinkfast.data.reader import CorpusInfo
    from thinkfast.data.schema import CorpusColumns

logger = logging.getLogger(__name__)

# a model output that the index or token store must never hold
NON_FINITE_DETAIL = "model output has NaN or inf (tokens may overflow float16)"


# --------------------------------------------------------------------------- read


def read_corpus(corpus: "CorpusInfo", columns: list[str], s3_endpoint: str | None = None) -> "ray.data.Dataset":
    """The corpus rows (``columns`` only) as a Ray Dataset, whatever img2dataset wrote.

    Parquet: ``read_parquet``. Webdataset (``.tar`` shards): ``read_webdataset`` with no
    decoding (raw bytes; the decode stage decodes), each batch turned into corpus rows,
    plus the rows img2dataset failed on, which are only in the shards' metadata Parquet
    (small: read whole, so a column img2dataset did not write reads as null). Both give
    the same rows, so the media stream rejects the failed ones with img2dataset's reason
    and the caption stream embeds their captions, as for any row with bad media."""
    import ray.data

    from thinkfast.data import img2dataset
    from thinkfast.utils import fs

    filesystem, _ = fs.arrow_fs(corpus.files[0], s3_endpoint)
    if corpus.format != img2dataset.WEBDATASET_FORMAT:
        return ray.data.read_parquet([fs.strip_scheme(f) for f in corpus.files], columns=columns,
                                     filesystem=filesystem)
    media = corpus.columns.media
    ds = ray.data.read_webdataset([fs.strip_scheme(f) for f in corpus.files], filesystem=filesystem, decoder=None,
                                  suffixes=[media, "txt", "json"])
    ds = ds.map_batches(img2dataset.ray_samples_table, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"media": media, "columns": columns})
    failed = ray.data.read_parquet([fs.strip_scheme(f) for f in corpus.metadata_files], filesystem=filesystem)
    failed = failed.map_batches(img2dataset.failed_rows_batch, batch_format="pyarrow", batch_size=None,
                                fn_kwargs={"media": media, "columns": columns})
    return ds.union(failed)


# --------------------------------------------------------------------------- decode


def decode_batch(
    batch: pa.Table,
    *,
    columns: "CorpusColumns",
    image_size: int,
    num_frames: int,
    max_pixels: int | None = None,
    s3_endpoint: str | None = None,
) -> pa.Table:
    """Corpus rows -> decoded pixels, or a marked row per rejection (never an exception
    per row); a Ray Data task. Good rows come first, then the rejected ones."""
    from thinkfast.data.decode import decode_rows

    decoded = decode_rows(batch.to_pylist(), columns, image_size, num_frames,
                          max_pixels=max_pixels, s3_endpoint=s3_endpoint)
    return decoded_table(decoded)


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

    Output (:func:`thinkfast.store.stream.media_table`): the status columns,
    ``embedding`` (fast model) and ``tokens`` (slow model), null on rejected rows. A batch
    the model fails on is retried row by row so that only the culprit is rejected
    (``stage="embed"``); non-finite outputs are rejected too, because an index or token
    store must never hold NaN."""

    def __init__(
        self,
        fast_uri: str | None,
        slow_uri: str | None,
        device: str = "cpu",
        threads: int | None = None,
        pool_size: int = 1,
        amp: bool = False,
    ) -> None:
        import torch

        self.torch = torch
        self.amp = amp  # fp16 autocast for the token model (CUDA only; a no-op on CPU)
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

    def _run_models(self, arrays: list[np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Same-shape inputs -> (embeddings (B, d) float32, tokens (B, T, D) float16)."""
        from thinkfast.encode import image_vectors, visual_tokens

        from thinkfast.utils.devices import autocast, to_device

        # pinned host memory on CUDA, so the copy is asynchronous; unchanged on CPU
        x = to_device(self.torch.from_numpy(np.stack(arrays)), self.device)
        n = len(arrays)
        emb = image_vectors(self.fast, x, batch_size=n) if self.fast is not None else None
        if self.slow is not None:
            with autocast(self.device, self.amp):
                tok = visual_tokens(self.slow, x, batch_size=n)
        else:
            tok = None
        return emb, tok

    def _embed_group(self, arrays: list[np.ndarray]) -> list[tuple[np.ndarray | None, np.ndarray | None] | str]:
        """Embed same-shape inputs; per item either (emb, tok) or an error string."""
        try:
            emb, tok = self._run_models(arrays)
            return [(None if emb is None else emb[i], None if tok is None else tok[i]) for i in range(len(arrays))]
        except Exception as exc:  # noqa: BLE001 - isolate the row that breaks the batch
            if len(arrays) == 1:
                return [f"{type(exc).__name__}: {exc}"]
            logger.warning("batch of %d failed (%r); retrying row by row", len(arrays), exc)
            return [r for a in arrays for r in self._embed_group([a])]

    def __call__(self, batch: pa.Table) -> pa.Table:
        status = StatusColumns.of(batch)
        embeddings: list[np.ndarray | None] = [None] * batch.num_rows
        tokens: list[np.ndarray | None] = [None] * batch.num_rows
        for rows, arrays in pixel_groups(batch).values():
            for i, result in zip(rows, self._embed_group(arrays)):
                if isinstance(result, str):
                    status.mark(i, "embed", "model_error", result)
                    continue
                emb, tok = result
                if (emb is not None and not np.isfinite(emb).all()) or (tok is not None and not np.isfinite(tok).all()):
                    status.mark(i, "embed", "non_finite", NON_FINITE_DETAIL)
                    continue
                embeddings[i], tokens[i] = emb, tok
        return media_table(
            status,
            embeddings if self.fast is not None else None,
            self.dim,
            tokens if self.slow is not None else None,
            embedded_at=time.time(),
        )


# --------------------------------------------------------------------------- captions


class TextEmbedActor:
    """Actor-pool UDF: ``g(y)`` for each non-blank caption with the fast text encoder.

    Output: ``key``, ``caption_index``, ``caption``, ``embedding``
    (fixed_size_list<float32>[d], null for a skipped blank caption)."""

    def __init__(self, fast_uri: str, device: str = "cpu", threads: int | None = None, pool_size: int = 1) -> None:
        import torch

        from thinkfast.models.fast import FastModel

        torch.set_num_threads(_select_threads(threads, pool_size))
        self.device = torch.device(device)
        self.fast = FastModel.from_pretrained(fast_uri).to(self.device).eval()
        self.dim = int(self.fast.config.embed_dim)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from thinkfast.encode import text_vectors

        captions = batch.column("caption").to_pylist()
        rows = [i for i, c in enumerate(captions) if c is not None]
        embeddings: list[np.ndarray | None] = [None] * len(captions)
        if rows:
            out = text_vectors(self.fast, [captions[i] for i in rows], batch_size=len(rows), device=self.device)  # (B, d)
            for j, i in enumerate(rows):
                embeddings[i] = out[j]
        return texts_table(batch, embeddings, self.dim)
