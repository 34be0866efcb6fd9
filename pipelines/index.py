"""``thinkfast index``: build a sharded FAISS index from fast-embedding Parquet with Ray.

The driver sizes the corpus from Parquet footers, trains the quantizers once on a
sample, then fans the shards out as Ray tasks: each reads its own row range straight
from the Parquet files (local or S3), adds it to a clone of the trained index and
writes its files to ``--out``. The manifest is written last, after a check that keys are
unique over all shards, so a directory with a manifest is always a complete index.
``--append`` adds the keys of an embeddings directory that the index does not hold yet as
new shards (no retraining; known keys are skipped and counted, changed vectors reported or,
with ``--replace-changed``, replaced) and says whether the quantizer has drifted enough that
a rebuild is due (:mod:`thinkfast.index.drift`); ``--remove-keys`` tombstones keys, and with
``--embeddings`` also removes them from the embeddings directory (fast/, tokens/, texts/,
digests) and records them in its ``removed.parquet``, which the serving catalog and
``embed --incremental`` honour. Every change rewrites the manifest.
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
from thinkfast.utils.paths import absolute_model_ref, user_paths

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--embeddings", default=None,
        help="embed output (its fast/ inside), a Parquet dir or a clip-retrieval dir (img_emb/ + metadata/), URI; "
             "with --remove-keys: also remove the keys there"
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
    parser.add_argument("--model-identity-from", default=None, metavar="FAST",
                        help="record this fast model's identity (directory or hub id; e.g. for clip-retrieval input)")
    parser.add_argument("--no-store-vectors", action="store_true", help="do not keep raw vectors (no exact re-scoring)")
    parser.add_argument("--append", action="store_true",
                        help="add the keys of --embeddings that the index at --out does not hold yet (others skipped)")
    parser.add_argument("--replace-changed", action="store_true",
                        help="with --append: replace indexed keys whose vector in --embeddings differs")
    parser.add_argument("--drift", action="store_true", help="only report whether the index's quantizer drifted")
    parser.add_argument("--remove-keys", default=None, help="file of keys (one per line) to remove from --out")
    parser.add_argument("--local", action="store_true", help="build shards in local threads instead of Ray tasks")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local Ray or RAY_ADDRESS)")
    parser.add_argument("--cpus-per-task", type=float, default=1.0, help="Ray CPUs per shard task")
    parser.add_argument("--gpu", action="store_true",
                        help="train the IVF quantizer on all GPUs (faiss.index_cpu_to_all_gpus; needs a GPU faiss build)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and k-means seed")
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")


def run(args: argparse.Namespace) -> int:
    from thinkfast.index.append import describe_change

    if args.drift:
        from thinkfast.index.sharded import ShardedIndex

        print(ShardedIndex.load(args.out, s3_endpoint=args.s3_endpoint).drift().describe())
        return 0
    if args.remove_keys:
        keys = _read_key_file(args.remove_keys)
        if args.embeddings:
            counts = remove_everywhere(args.out, args.embeddings, keys, s3_endpoint=args.s3_endpoint)
            print(f"removed {counts['index']} key(s) from {args.out}; from {args.embeddings}: "
                  f"{counts['fast']} fast, {counts['tokens']} token, {counts['texts']} caption row(s); "
                  f"{len(keys)} recorded as removed")
            return 0
        count = remove_keys(args.out, keys, s3_endpoint=args.s3_endpoint)
        print(f"removed {count} key(s) from {args.out}")
        return 0
    if not args.embeddings:
        raise ThinkfastError("--embeddings is required to build or append")
    identity = args.model_identity
    if args.model_identity_from:  # loads the model: its identity is a hash of the weights
        from thinkfast.models.fast import FastModel

        identity = FastModel.from_pretrained(absolute_model_ref(args.model_identity_from)).identity
    if args.append:
        manifest = append_to_index(args.embeddings, args.out, s3_endpoint=args.s3_endpoint,
                                   replace_changed=args.replace_changed)
        print(f"append {args.embeddings} -> {args.out}: {describe_change(manifest.last_change)}")
        from thinkfast.index.drift import DriftReport

        drift = manifest.last_change.get("drift") or {}
        if drift.get("applicable"):
            print(DriftReport(**drift).describe())
    else:
        manifest = build_index(
            args.embeddings,
            args.out,
            shards=args.shards,
            factory=args.factory,
            train_sample=args.train_sample,
            model_identity=identity,
            store_vectors=not args.no_store_vectors,
            exact_below=args.exact_below,
            seed=args.seed,
            use_ray=not args.local,
            address=args.address,
            cpus_per_task=args.cpus_per_task,
            s3_endpoint=args.s3_endpoint,
            gpu=args.gpu,
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
    gpu: bool = False,
) -> IndexManifest:
    """Build the index at ``out`` from the fast embeddings at ``embeddings``; returns the manifest.
    ``gpu``: the quantizer's k-means on all GPUs of this process (a GPU faiss build).

    The shards are Ray tasks (``use_ray``, the default) or local threads; everything else
    is :func:`thinkfast.index.build.build_from_embeddings`."""
    if mapper is None:
        mapper = _ray_mapper(address, cpus_per_task) if use_ray else B.thread_mapper
    from thinkfast.store.clip_retrieval import staged_for_index  # clip-retrieval input: a Parquet copy first

    with staged_for_index(embeddings, out, s3_endpoint) as (source, recorded_identity):
        return B.build_from_embeddings(
            source, out, shards=shards, factory=factory, train_sample=train_sample,
            model_identity=model_identity or recorded_identity, store_vectors=store_vectors,
            exact_below=exact_below, seed=seed, s3_endpoint=s3_endpoint, mapper=mapper, gpu=gpu,
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
    embeddings: str, index_uri: str, shard_size: int | None = None, s3_endpoint: str | None = None,
    replace_changed: bool = False,
) -> IndexManifest:
    """Add the keys of ``embeddings`` that the index lacks as new shards of about
    ``shard_size`` vectors (default: the existing mean shard size); no retraining. The
    returned manifest's ``last_change`` counts added / skipped / changed / replaced keys
    and holds the drift verdict."""
    return B.append_embeddings(embeddings, index_uri, shard_size, s3_endpoint, replace_changed=replace_changed)


@user_paths("index_uri")
def remove_keys(index_uri: str, keys: Sequence[str], s3_endpoint: str | None = None) -> int:
    """Tombstone ``keys`` in the index at ``index_uri`` (unknown keys are an error)."""
    from thinkfast.index.sharded import ShardedIndex

    return ShardedIndex.load(index_uri, s3_endpoint=s3_endpoint).remove(keys)


@user_paths("index_uri", "embeddings")
def remove_everywhere(index_uri: str, embeddings: str, keys: Sequence[str],
                      s3_endpoint: str | None = None) -> dict[str, int]:
    """Remove ``keys`` from the index and from the embeddings directory: index first (a
    service reloading it stops returning them), then fast/, tokens/, texts/ and the digests,
    then ``removed.parquet`` (the catalog hides them; ``embed --incremental`` skips them).
    Keys the index does not hold are fine here: a takedown list may name keys of shards
    not indexed yet. Returns ``{"index": n, "fast": n, "tokens": n, "texts": n, ...}``."""
    from thinkfast.index.sharded import ShardedIndex
    from thinkfast.store.incremental import remove_from_embeddings

    index = ShardedIndex.load(index_uri, s3_endpoint=s3_endpoint)
    removed = index.remove(keys, missing_ok=True)
    index.record_change({"kind": "remove", "asked": len(keys), "removed": removed})
    counts = remove_from_embeddings(embeddings, keys, s3_endpoint)
    return {"index": removed, **counts}


def _read_key_file(path: str) -> list[str]:
    try:
        text = fs.read_bytes(path).decode("utf-8")
    except FileNotFoundError as exc:
        raise ThinkfastError(f"no such key file: {path}") from exc
    keys = [line.strip() for line in text.splitlines() if line.strip()]
    if not keys:
        raise ThinkfastError(f"{path} lists no keys")
    return keys


__all__ = ["add_arguments", "run", "build_index", "append_to_index", "remove_keys", "remove_everywhere"]
