"""``thinkfast index``: build a sharded FAISS index from fast-embedding Parquet with Ray.

The driver sizes the corpus from Parquet footers, trains the quantizers once on a
sample, then fans the shards out as Ray tasks: each reads its own row range straight
from the Parquet files (local or S3), adds it to a clone of the trained index and
writes its files to ``--out``. The manifest is written last, after a check that keys are
unique over all shards, so a directory with a manifest is always a complete index.
``--append`` adds a new batch of embeddings to an existing index as new shards (no
retraining); ``--remove-keys`` tombstones keys. Both rewrite the manifest.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Sequence

from thinkfast.errors import ThinkfastError
from thinkfast.index import build as B
from thinkfast.index.build import ShardMapper, identity_from_embeddings  # noqa: F401 - identity_from_embeddings: old home
from thinkfast.index.manifest import IndexManifest, ShardRecord
from thinkfast.utils import fs
from thinkfast.utils.paths import user_paths

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--embeddings", default=None, help="embed output (its fast/ inside) or a Parquet dir, URI (not with --remove-keys)"
    )
    parser.add_argument("--out", required=True, help="index directory, local path or s3://")
    parser.add_argument("--shards", type=int, default=1, help="number of shards, built in parallel Ray tasks")
    parser.add_argument(
        "--factory",
        default=None,
        help="faiss.index_factory string (default: Flat below --exact-below vectors, else IVF-HNSW / IVF-PQ)",
    )
    parser.add_argument("--train-sample", type=int, default=None, help="vectors to train quantizers on")
    parser.add_argument("--exact-below", type=int, default=B.EXACT_BELOW, help="corpus size below which Flat is used")
    parser.add_argument("--model-identity", default=None, help="override the fast model identity from the embed manifest")
    parser.add_argument("--no-store-vectors", action="store_true", help="do not keep raw vectors (no exact re-scoring)")
    parser.add_argument("--append", action="store_true", help="add --embeddings to the existing index at --out")
    parser.add_argument("--remove-keys", default=None, help="file of keys (one per line) to remove from --out")
    parser.add_argument("--local", action="store_true", help="build shards in local threads instead of Ray tasks")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local Ray or RAY_ADDRESS)")
    parser.add_argument("--cpus-per-task", type=float, default=1.0, help="Ray CPUs per shard task")
    parser.add_argument("--seed", type=int, default=0, help="sampling and k-means seed")
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")


def run(args: argparse.Namespace) -> int:
    if args.remove_keys:
        count = remove_keys(args.out, _read_key_file(args.remove_keys), s3_endpoint=args.s3_endpoint)
        print(f"removed {count} key(s) from {args.out}")
        return 0
    if not args.embeddings:
        raise ThinkfastError("--embeddings is required to build or append")
    if args.append:
        manifest = append_to_index(args.embeddings, args.out, s3_endpoint=args.s3_endpoint)
    else:
        manifest = build_index(
            args.embeddings,
            args.out,
            shards=args.shards,
            factory=args.factory,
            train_sample=args.train_sample,
            model_identity=args.model_identity,
            store_vectors=not args.no_store_vectors,
            exact_below=args.exact_below,
            seed=args.seed,
            use_ray=not args.local,
            address=args.address,
            cpus_per_task=args.cpus_per_task,
            s3_endpoint=args.s3_endpoint,
        )
    print(
        f"index {args.out}: {manifest.count} vectors, {manifest.num_shards} shard(s), {manifest.factory}, "
        f"dim {manifest.dim}, search defaults {manifest.search_defaults}"
    )
    return 0


@user_paths("embeddings", "out")
def build_index(
    embeddings: str,
    out: str,
    *,
    shards: int = 1,
    factory: str | None = None,
    train_sample: int | None = None,
    model_identity: str | None = None,
    store_vectors: bool = True,
    exact_below: int = B.EXACT_BELOW,
    seed: int = 0,
    use_ray: bool = True,
    address: str | None = None,
    cpus_per_task: float = 1.0,
    s3_endpoint: str | None = None,
    mapper: ShardMapper | None = None,
) -> IndexManifest:
    """Build the index at ``out`` from the fast embeddings at ``embeddings``; returns the manifest.

    The shards are Ray tasks (``use_ray``, the default) or local threads; everything else
    is :func:`thinkfast.index.build.build_from_embeddings`."""
    if mapper is None:
        mapper = _ray_mapper(address, cpus_per_task) if use_ray else B.thread_mapper
    return B.build_from_embeddings(
        embeddings, out, shards=shards, factory=factory, train_sample=train_sample, model_identity=model_identity,
        store_vectors=store_vectors, exact_below=exact_below, seed=seed, s3_endpoint=s3_endpoint, mapper=mapper,
    )


def _ray_mapper(address: str | None, cpus_per_task: float) -> ShardMapper:
    def mapper(plan: B.BuildPlan, trained: bytes) -> list[ShardRecord]:
        import ray

        from thinkfast_pipelines.ray_utils import init_ray

        init_ray(address=address)
        task = ray.remote(num_cpus=cpus_per_task, max_retries=2)(B.build_shard)
        trained_ref = ray.put(trained)
        refs = [task.remote(plan, i, trained_ref) for i in range(len(plan.ranges))]
        order = {ref: i for i, ref in enumerate(refs)}
        records: dict[int, ShardRecord] = {}
        pending, start = list(refs), time.perf_counter()
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i = order[done[0]]
                records[i] = ray.get(done[0])
                logger.info(
                    "shard %d/%d done (%d vectors), %.1f s", len(records), len(refs), records[i].total,
                    time.perf_counter() - start,
                )
        except ray.exceptions.RayTaskError as exc:
            for ref in pending:
                ray.cancel(ref)
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ThinkfastError):
                raise cause from None
            raise
        return [records[i] for i in range(len(refs))]

    return mapper


@user_paths("embeddings", "index_uri")
def append_to_index(
    embeddings: str, index_uri: str, shard_size: int | None = None, s3_endpoint: str | None = None
) -> IndexManifest:
    """Add the embeddings at ``embeddings`` to the existing index as new shards of about
    ``shard_size`` vectors (default: the existing mean shard size); no retraining."""
    return B.append_embeddings(embeddings, index_uri, shard_size, s3_endpoint)


@user_paths("index_uri")
def remove_keys(index_uri: str, keys: Sequence[str], s3_endpoint: str | None = None) -> int:
    """Tombstone ``keys`` in the index at ``index_uri`` (unknown keys are an error)."""
    from thinkfast.index.sharded import ShardedIndex

    return ShardedIndex.load(index_uri, s3_endpoint=s3_endpoint).remove(keys)


def _read_key_file(path: str) -> list[str]:
    try:
        text = fs.read_bytes(path).decode("utf-8")
    except FileNotFoundError as exc:
        raise ThinkfastError(f"no such key file: {path}") from exc
    keys = [line.strip() for line in text.splitlines() if line.strip()]
    if not keys:
        raise ThinkfastError(f"{path} lists no keys")
    return keys


__all__ = ["add_arguments", "run", "build_index", "append_to_index", "remove_keys"]
