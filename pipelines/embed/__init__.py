"""``thinkfast embed``: a corpus in, fast embeddings + slow tokens + rejected rows out.

    thinkfast embed --corpus s3://b/corpus --fast models/fast --slow models/slow --out s3://b/emb

The pipeline is one Ray Data stream::

    read_parquet(key, media) ─► decode_batch (tasks) ─► EmbedActor (actor pool) ─► EmbeddingSink
                                  rows fail here ─┘        or here ─┘                ├ fast/*.parquet
                                  as marked rows, never dropped                     ├ tokens/ shards
                                                                                    └ rejected/*.parquet

Memory is bounded by the stream, not by the corpus: Ray Data's streaming executor keeps
a few blocks per operator in flight and applies backpressure when an operator's output
queue or the object store budget fills. The job sets Ray Data's block target to one
model batch of decoded rows (``batch_size`` × 4·3·S² bytes, S = image size, ×F frames for
video; at least 1 MiB), so what is alive at once is about: per running read/decode task
one Parquet row group of encoded media plus one block of decoded rows; ``actors`` ×
(``max_tasks_in_flight_per_actor`` = 2) batches queued at the actors; one
``rows_per_write`` bundle per write task (tokens: 2·T·D bytes a row). The number of
concurrent read/decode tasks is bounded by the CPUs Ray has, and
``--object-store-limit-mb`` caps the object store memory the whole stream may use.

Outputs under ``--out`` (local or ``s3://``): ``fast/`` (``key``, ``embedding``), ``tokens/``
(a :class:`thinkfast.store.TokenStore`), ``rejected/`` (``key``, ``stage``, ``reason``,
``detail``), ``texts/`` with ``--texts`` (``key``, ``caption_index``, ``caption``,
``embedding`` = g(y)), and ``manifest.json`` (counts, model identities, dims, timings).

Repeated keys: before any work, the key column of every corpus file is read (a few bytes
a row) and a key found twice stops the job with one line naming the first few
(``--on-duplicate error``, the default). ``--on-duplicate first`` keeps the first occurrence
(file path order, then row order) and rejects the others, ``reject`` rejects every row of
such a key; either way with reason ``duplicate_key`` in ``rejected/``, counted so that
``embedded + rejected == in``, and no output holds a key twice (the rows of repeated keys
are dropped from the stream by key, the kept copy is read back by position and added).

Growing a directory: ``--incremental`` embeds only the keys ``--out`` does not hold yet
(same models, else one line refuses), skips and counts the rest (``embedded + rejected +
skipped == in``), reports keys whose media changed and re-embeds them only with
``--reembed-changed``; keys listed in ``<out>/removed.parquet`` (``thinkfast index
--remove-keys --embeddings``) are never embedded again, by any run. See ``incremental.py``.

Re-runs (without ``--incremental``): before any output is written, the previous run's ``manifest.json`` is deleted
first and then its ``fast/``, ``tokens/``, ``rejected/`` and ``texts/`` directories (nothing
else under ``--out`` is touched); ``manifest.json`` is written last. So a re-run never
duplicates rows, and an output directory without ``manifest.json`` is an unfinished run.
(An attempt directory + swap would need a rename, which S3 does not have: a copy of
every token shard.) Inside one run, file names are hashes of the keys they hold, so a
retried Ray task rewrites its own files.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from thinkfast.store.layout import EMBED_FORMAT, EMBED_MANIFEST, EMBED_OUTPUT_DIRS
from thinkfast.utils.paths import user_paths
from thinkfast_pipelines.embed.config import EmbedConfig, EmbedError, add_config_flags, config_from_args

logger = logging.getLogger(__name__)

# old names of the layout constants (thinkfast.store.layout defines them)
OUTPUT_DIRS = EMBED_OUTPUT_DIRS
MANIFEST = EMBED_MANIFEST
MANIFEST_FORMAT = EMBED_FORMAT


@user_paths("corpus", "out", models=("fast", "slow"))
def embed(
    corpus: str,
    out: str,
    fast: str | None = None,
    slow: str | None = None,
    *,
    texts: bool = False,
    media: bool = True,
    config: EmbedConfig | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Embed ``corpus`` into ``out``; returns the manifest (also written to ``out/manifest.json``).

    ``fast`` / ``slow`` are model directories or URIs; either may be omitted. ``texts``
    also writes ``texts/`` (needs ``fast``); ``media=False`` skips the images/videos (a
    texts-only run). Bad input (schema, flags, checkpoints) raises a ``ThinkfastError``
    before any Ray work or any deletion under ``out``."""
    # the driver lives in job.py: a submodule named ``run`` would replace this package's
    # ``run`` (the CLI entry point) as an attribute once imported
    from thinkfast_pipelines.embed.job import run_embed

    config = config or EmbedConfig()
    config.validate()
    if not (fast or slow):
        raise EmbedError("give --fast, --slow or both")
    if texts and not fast:
        raise EmbedError("--texts needs --fast (captions are embedded with its text encoder g(y))")
    if not (media or texts):
        raise EmbedError("nothing to do: --no-media without --texts")
    return run_embed(corpus, out, fast, slow, texts=texts, media=media, config=config, address=address)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, metavar="URI", help="corpus Parquet file or directory (local or s3://)")
    parser.add_argument("--out", required=True, metavar="URI", help="output directory (local or s3://)")
    parser.add_argument("--fast", metavar="DIR", help="fast model directory or URI (writes fast/)")
    parser.add_argument("--slow", metavar="DIR", help="slow model directory or URI (writes tokens/)")
    parser.add_argument("--texts", action="store_true", help="also embed every caption with g(y) into texts/")
    parser.add_argument("--no-media", dest="media", action="store_false", help="skip images/videos (with --texts)")
    add_config_flags(parser)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")


def run(args: argparse.Namespace) -> int:
    manifest = embed(
        args.corpus,
        args.out,
        fast=args.fast,
        slow=args.slow,
        texts=args.texts,
        media=args.media,
        config=config_from_args(args),
        address=args.address,
    )
    counts = manifest["counts"]
    inc = manifest.get("incremental") or {}
    print(
        f"embedded {counts.get('embedded', 0)} of {counts.get('in', 0)} rows, "
        f"rejected {counts.get('rejected', 0)}"
        + (f", skipped {counts['skipped']}" if counts.get("skipped") else "")
        + (f", {counts.get('texts', 0)} captions" if "texts" in counts else "")
        + f" -> {args.out}"
    )
    if inc.get("mode") == "incremental":
        print(f"skipped {inc.get('skipped_unchanged', 0)} already embedded, {inc.get('skipped_removed', 0)} removed; "
              f"{inc.get('total_embedded', 0)} keys in {args.out} now")
    if inc.get("changed"):
        what = ("re-embedded" if inc.get("changed_reembedded")
                else "left as embedded (--reembed-changed re-embeds them)")
        print(f"{inc['changed']} key(s) with new media {what}, e.g. {inc.get('changed_examples')}")
    return 0


__all__ = ["EmbedConfig", "EmbedError", "add_arguments", "config_from_args", "embed", "run"]
