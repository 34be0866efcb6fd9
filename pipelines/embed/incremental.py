"""``thinkfast embed --incremental``: new corpus shards into an existing embeddings directory.

Only keys not embedded yet are embedded; the rest are *skipped* and counted, so that
``embedded + rejected + skipped == in`` still holds for the run. What decides:

* **digests** (``<emb>/digests.parquet``, :mod:`thinkfast.store.incremental`): every run
  (incremental or not) hashes each input row's media cell in a Ray Data pre-pass (key and
  media columns only) and records the digest of every key it embedded;
* a known key whose digest differs (same key, new bytes) is **changed**: reported (count
  and a few keys) and left as it is, unless ``--reembed-changed``, which drops its old
  rows from fast/, tokens/, texts/ first and embeds it again (nothing is held twice);
* a key in ``<emb>/removed.parquet`` (``thinkfast index --remove-keys --embeddings``) is
  skipped by every run, incremental or full: a delete sticks until that file is deleted;
* a key rejected before is tried again (its old ``rejected/`` rows go first).

The models must be the ones that embedded the directory (identities in the manifest),
with the same outputs (``--texts`` or not); otherwise one line refuses before any work.
Crash safety: the previous manifest moves to ``incremental_in_progress.json`` while the
run writes (the directory reads as unfinished), and ``digests.parquet`` is the commit
point for keys: a key in fast/ or tokens/ that the digests do not list is the leftover
of a crashed run and is dropped by the next ``--incremental`` run before it starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from thinkfast.store.incremental import (
    digest_table,
    drop_keys_everywhere,
    drop_keys_from_parquet_dir,
    parquet_keys,
    read_digests,
    read_removed,
)
from thinkfast.store.layout import (
    EMBED_MANIFEST,
    INCREMENTAL_MARKER,
    EmbedManifest,
    fast_dir,
    find_embed_manifest,
    rejected_dir,
    tokens_dir,
)
from thinkfast.utils import fs
from thinkfast_pipelines.embed.config import EmbedConfig, EmbedError

if TYPE_CHECKING:
    from thinkfast.data.reader import CorpusInfo
    from thinkfast_pipelines.embed.duplicates import DuplicatePlan
    from thinkfast_pipelines.embed.models import ModelInfo

logger = logging.getLogger(__name__)

CHANGED_EXAMPLES = 5
DRIVER_DIGEST_ROWS = 20_000  # corpora up to this many rows are hashed on the driver, larger ones by Ray Data


def previous_manifest(out: str, s3_endpoint: str | None) -> EmbedManifest | None:
    """The manifest of the directory an incremental run grows: ``manifest.json``, or the
    copy a crashed incremental run left in the marker; None for an empty ``--out``.
    A directory with outputs but neither is an unfinished full run: refused."""
    manifest = find_embed_manifest(out, s3_endpoint)
    if manifest is not None:
        return manifest
    marker = fs.join(out, INCREMENTAL_MARKER)
    if fs.exists(marker, s3_endpoint):
        return EmbedManifest.from_json(fs.read_json(marker, s3_endpoint), source=marker)
    if fs.exists(fast_dir(out), s3_endpoint) or fs.exists(tokens_dir(out), s3_endpoint):
        raise EmbedError(f"{out} holds an unfinished embed run (no {EMBED_MANIFEST}); "
                         "run without --incremental to replace it")
    return None


def check_same_models(previous: EmbedManifest, models: "ModelInfo", *, texts: bool, out: str,
                      token_format: str = "float16") -> None:
    """Refuse (one line) to grow a directory with other models or other outputs."""
    old_format = previous.config.get("token_format", "float16")
    if previous.outputs.tokens is not None and old_format != token_format:
        raise EmbedError(f"{out} stores {old_format} tokens, this run writes {token_format}; --incremental needs "
                         f"--token-format {old_format} (one store holds one format)")
    for name, old, new in (("fast", previous.fast, models.fast), ("slow", previous.slow, models.slow)):
        old_id = old.identity if old is not None else None
        new_id = new.identity if new is not None else None
        if old_id != new_id:
            raise EmbedError(f"{out} was embedded with {name} model {old_id or 'none'}, this run has "
                             f"{new_id or 'none'}; --incremental needs the same models (run without it to re-embed all)")
    if previous.image_size != models.image_size:
        raise EmbedError(f"{out} was embedded at image size {previous.image_size}, this run uses {models.image_size}")
    if (previous.outputs.texts is not None) != texts:
        raise EmbedError(f"{out} {'has' if previous.outputs.texts else 'has no'} texts/; --incremental needs "
                         f"{'--texts' if previous.outputs.texts else 'no --texts'} as before")


def _digest_batch(batch: pa.Table, *, media_column: str) -> pa.Table:
    """A Ray Data map: corpus rows -> (key, digest)."""
    return digest_table(batch.column("key").to_pylist(), batch.column(media_column).to_pylist())


def _driver_digests(corpus: "CorpusInfo", media: str, s3_endpoint: str | None) -> list[pa.Table]:
    """The digests computed on the driver, streaming one Parquet batch at a time."""
    import pyarrow.parquet as pq

    if corpus.format == "webdataset":  # img2dataset's .tar shards: the rows as embed reads them
        from thinkfast.data.img2dataset import iter_webdataset_tables

        return [_digest_batch(t, media_column=media) for t in iter_webdataset_tables(corpus.files, media, s3_endpoint)]
    tables = []
    for f in corpus.files:
        filesystem, path = fs.arrow_fs(f, s3_endpoint)
        for batch in pq.ParquetFile(path, filesystem=filesystem).iter_batches(batch_size=1024, columns=["key", media]):
            tables.append(_digest_batch(pa.Table.from_batches([batch]), media_column=media))
    return tables


def corpus_digests(corpus: "CorpusInfo", config: EmbedConfig, duplicates: "DuplicatePlan | None") -> dict[str, str]:
    """key -> media digest of every input key (repeated keys: the copy ``--on-duplicate
    first`` keeps; ``reject`` keeps none). A Ray Data pass over the key and media columns,
    or, for a corpus of at most :data:`DRIVER_DIGEST_ROWS` rows, a pass on the driver (a
    Ray Data job costs seconds of start-up; hashing a few thousand rows costs less)."""
    from thinkfast_pipelines.embed.duplicates import kept_rows

    media = corpus.columns.media
    if corpus.num_rows <= DRIVER_DIGEST_ROWS:
        tables = _driver_digests(corpus, media, config.s3_endpoint)
    else:
        import ray
        import ray.data

        from thinkfast_pipelines.embed.stages import read_corpus

        ds = read_corpus(corpus, ["key", media], config.s3_endpoint)  # Parquet or img2dataset webdataset
        ds = ds.map_batches(_digest_batch, batch_format="pyarrow", fn_kwargs={"media_column": media})
        tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    drop = duplicates.drop if duplicates is not None else frozenset()
    out: dict[str, str] = {}
    for t in tables:
        for k, d in zip(t.column("key").to_pylist(), t.column("digest").to_pylist()):
            if k is not None and k not in drop:
                out[k] = d
    if duplicates is not None and duplicates.keep:
        kept = kept_rows(duplicates, ["key", media], config.s3_endpoint)
        out.update(zip(kept.column("key").to_pylist(), _digest_batch(kept, media_column=media)
                       .column("digest").to_pylist()))
    return out


@dataclass
class IncrementalPlan:
    """What this run embeds and what it skips, decided on the driver before the streams."""

    skip: frozenset[str]  # keys the read stage drops (already embedded, removed, changed-but-kept)
    skipped_rows: int  # input rows those keys account for (counted as skipped)
    embed: dict[str, str]  # key -> digest of every key this run embeds
    previous: dict[str, str]  # the directory's committed key -> digest before the run
    stats: dict[str, Any] = field(default_factory=dict)  # the manifest's "incremental" record


def plan_run(out: str, digests: dict[str, str], config: EmbedConfig, duplicates: "DuplicatePlan | None",
             *, incremental: bool) -> IncrementalPlan:
    """Compare the input's digests with the directory's; drop what must go before the run
    (a crashed run's leftovers, changed keys' old rows with --reembed-changed, old
    rejects of keys tried again). A full run only honours removed keys."""
    endpoint = config.s3_endpoint
    removed = read_removed(out, endpoint)
    known = read_digests(out, endpoint) if incremental else None
    stats: dict[str, Any] = {"mode": "incremental" if incremental else "full"}
    if incremental and known is None:  # written before digests: fast/ keys count as embedded, unchanged
        committed = set(parquet_keys(fast_dir(out), endpoint)) or set(parquet_keys(tokens_dir(out), endpoint))
        known = {k: "" for k in committed}
        stats["no_digest"] = len(committed)
    known = known or {}
    if incremental:
        present = set(parquet_keys(fast_dir(out), endpoint)) | set(parquet_keys(tokens_dir(out), endpoint))
        leftovers = present - known.keys()
        if leftovers:
            logger.warning("%d key(s) under %s are not committed (a crashed run's leftovers); dropping them",
                           len(leftovers), out)
            drop_keys_everywhere(out, leftovers, endpoint, rejected=False)
        stats["leftovers_dropped"] = len(leftovers)
    skip_removed = {k for k in digests if k in removed}
    unchanged = {k for k, d in digests.items() if k in known and k not in removed and (not known[k] or known[k] == d)}
    changed = sorted(k for k, d in digests.items() if k in known and k not in removed and known[k] and known[k] != d)
    embed = {k: d for k, d in digests.items() if k not in known and k not in removed}
    if config.reembed_changed and changed:
        drop_keys_everywhere(out, set(changed), endpoint)
        embed.update({k: digests[k] for k in changed})
        for k in changed:
            known.pop(k, None)
    if incremental and embed:
        drop_keys_from_parquet_dir(rejected_dir(out), set(embed), endpoint)  # tried again: the new verdict counts
    skip = frozenset(unchanged | skip_removed | (set() if config.reembed_changed else set(changed)))
    kept_once = len(skip & duplicates.drop) if duplicates is not None and config.on_duplicate == "first" else 0
    stats.update(skipped_unchanged=len(unchanged), skipped_removed=len(skip_removed), changed=len(changed),
                 changed_examples=changed[:CHANGED_EXAMPLES], changed_reembedded=len(changed) if config.reembed_changed
                 else 0)
    if changed and not config.reembed_changed:
        logger.warning("%d key(s) have new media (e.g. %s); left as embedded (--reembed-changed re-embeds them)",
                       len(changed), changed[:CHANGED_EXAMPLES])
    repeated = duplicates.drop if duplicates is not None else frozenset()
    rows = sum(1 for k in skip if k not in repeated) + kept_once
    return IncrementalPlan(skip=skip, skipped_rows=rows, embed=embed, previous=known, stats=stats)


def committed_digests(out: str, plan: IncrementalPlan, s3_endpoint: str | None) -> dict[str, str]:
    """The digests after the run: the previous ones plus every key of ``plan.embed`` that
    was embedded (a key of this run found in rejected/ was rejected by it)."""
    rejected = set(parquet_keys(rejected_dir(out), s3_endpoint))
    return {**plan.previous, **{k: d for k, d in plan.embed.items() if k not in rejected}}
