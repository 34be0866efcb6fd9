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

Re-runs: before any output is written, the previous run's ``manifest.json`` is deleted
first and then its ``fast/``, ``tokens/``, ``rejected/`` and ``texts/`` directories (nothing
else under ``--out`` is touched); ``manifest.json`` is written last. So a re-run never
duplicates rows, and an output directory without ``manifest.json`` is an unfinished run.
(An attempt directory + swap would need a rename, which S3 does not have: a copy of
every token shard.) Inside one run, file names are hashes of the keys they hold, so a
retried Ray task rewrites its own files.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

from thinkfast.utils.paths import user_paths
from thinkfast.errors import ThinkfastError

logger = logging.getLogger(__name__)

OUTPUT_DIRS = ("fast", "tokens", "rejected", "texts")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "thinkfast-embeddings"


class EmbedError(ThinkfastError):
    """The embed job cannot run as asked (flags, model pair) or lost rows (counts differ)."""


@dataclass(frozen=True)
class EmbedConfig:
    """How the embed job runs; none of this changes what is computed, only how fast."""

    batch_size: int = 64  # rows per model call in an actor (and per map_batches batch)
    actors: int = 1  # model replicas in the actor pool
    device: str = "cpu"  # "cpu" or "cuda"; cuda reserves gpus_per_actor GPUs per actor
    cpus_per_actor: float = 0.5  # logical CPUs Ray reserves per actor: fractional so read/decode always fit
    gpus_per_actor: float = 1.0  # GPUs per actor when device == "cuda"
    threads: int | None = None  # torch threads per actor; None = the node's cores // actors, at least 1
    decode_batch_size: int = 32  # rows per decode task call
    rows_per_write: int = 1024  # rows per output file / token shard (one write call)
    num_frames: int | None = None  # frames sampled per video; None = 8 (capped by the slow model's max_frames)
    max_pixels: int | None = None  # reject larger images; None = the data layer's default
    limit: int | None = None  # embed only the first N rows (smoke runs)
    progress: bool = True  # Ray Data progress bars
    object_store_limit_mb: int | None = None  # cap on object store memory used by the stream
    s3_endpoint: str | None = None  # S3 endpoint URL; default from AWS_ENDPOINT_URL

    def validate(self) -> None:
        if self.batch_size < 1 or self.decode_batch_size < 1 or self.rows_per_write < 1:
            raise EmbedError("batch sizes and --rows-per-write must be positive")
        if self.actors < 1:
            raise EmbedError(f"--actors must be at least 1, got {self.actors}")
        if self.device not in ("cpu", "cuda"):
            raise EmbedError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise EmbedError("--cpus-per-actor and --gpus-per-actor must be non-negative")
        if self.limit is not None and self.limit < 0:
            raise EmbedError(f"--limit must be non-negative, got {self.limit}")


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
    from thinkfast_pipelines.embed.run import run_embed

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
    d = EmbedConfig()
    parser.add_argument("--corpus", required=True, metavar="URI", help="corpus Parquet file or directory (local or s3://)")
    parser.add_argument("--out", required=True, metavar="URI", help="output directory (local or s3://)")
    parser.add_argument("--fast", metavar="DIR", help="fast model directory or URI (writes fast/)")
    parser.add_argument("--slow", metavar="DIR", help="slow model directory or URI (writes tokens/)")
    parser.add_argument("--texts", action="store_true", help="also embed every caption with g(y) into texts/")
    parser.add_argument("--no-media", dest="media", action="store_false", help="skip images/videos (with --texts)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per model call (default %(default)s)")
    parser.add_argument("--actors", type=int, default=d.actors, help="model replicas (default %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=d.device, help="model device (default %(default)s)")
    parser.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor, help="logical CPUs per actor (default %(default)s)")
    parser.add_argument("--gpus-per-actor", type=float, default=d.gpus_per_actor, help="GPUs per actor with --device cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per actor (default: cores // actors, at least 1)")
    parser.add_argument("--decode-batch-size", type=int, default=d.decode_batch_size, help="rows per decode task call")
    parser.add_argument("--rows-per-write", type=int, default=d.rows_per_write, help="rows per output file / token shard")
    parser.add_argument("--frames", dest="num_frames", type=int, default=None, help="frames sampled per video (default 8, at most the slow model's max_frames)")
    parser.add_argument("--max-pixels", type=int, default=None, help="reject images with more pixels than this")
    parser.add_argument("--limit", type=int, default=None, help="embed only the first N rows")
    parser.add_argument("--object-store-limit-mb", type=int, default=None, help="cap on object store memory the stream uses")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no Ray Data progress bars")
    parser.add_argument("--s3-endpoint", default=None, metavar="URL", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")


def config_from_args(args: argparse.Namespace) -> EmbedConfig:
    """The ``EmbedConfig`` the flags describe."""
    fields = set(EmbedConfig.__dataclass_fields__)
    return replace(EmbedConfig(), **{k: v for k, v in vars(args).items() if k in fields})


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
    print(
        f"embedded {counts.get('embedded', 0)} of {counts.get('in', 0)} rows, "
        f"rejected {counts.get('rejected', 0)}"
        + (f", {counts.get('texts', 0)} captions" if "texts" in counts else "")
        + f" -> {args.out}"
    )
    return 0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _config_dict(config: EmbedConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(config).items() if k != "s3_endpoint"}
