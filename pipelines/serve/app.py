"""The Serve application builder: ``ServeArgs`` -> the bound deployment graph.

This is the ``import_path`` of ``cluster/serve.yaml`` (``thinkfast_pipelines.serve.app:build_app``)
and what ``thinkfast serve`` calls, so ``serve run``, ``serve deploy``, a KubeRay
RayService and the CLI build the same graph from the same validated arguments.

No ``from __future__ import annotations`` here on purpose: Serve inspects the builder's
parameter annotation at runtime to validate the YAML ``args:`` into ``ServeArgs``, and a
string annotation would bypass that validation.
"""

import logging
from typing import Any

from ray.serve import Application

from thinkfast.utils.devices import gpu_ray_options
from thinkfast_pipelines.serve.args import DeploymentSize, RerankerSize, ServeArgs, ServiceLimits

logger = logging.getLogger(__name__)


def _limits(size: DeploymentSize | RerankerSize, limits: ServiceLimits) -> dict[str, Any]:
    """Options every deployment shares: a bounded queue per caller (beyond it Serve refuses
    at once: HTTP 503 with Retry-After at the proxy, ``BackPressureError`` at a handle, which
    the ingress answers the same way) and health checks frequent enough that a dead
    replica is replaced within seconds (Serve's defaults: a probe every 10 s, 30 s to answer)."""
    return {
        "max_ongoing_requests": size.max_ongoing_requests,
        "max_queued_requests": size.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": limits.retry_after_s},
        "health_check_period_s": limits.health_check_period_s,
        "health_check_timeout_s": limits.health_check_timeout_s,
        "graceful_shutdown_timeout_s": limits.graceful_shutdown_timeout_s,
        "ray_actor_options": {"num_cpus": size.num_cpus, **gpu_ray_options(size.num_gpus)},
    }


def _fixed(size: DeploymentSize, limits: ServiceLimits) -> dict[str, Any]:
    return {"num_replicas": size.num_replicas, **_limits(size, limits)}


def _autoscaled(size: RerankerSize, limits: ServiceLimits) -> dict[str, Any]:
    return {
        **_limits(size, limits),
        "autoscaling_config": {
            "min_replicas": size.min_replicas,
            "max_replicas": size.max_replicas,
            "target_ongoing_requests": size.target_ongoing_requests,
            "upscale_delay_s": size.upscale_delay_s,
            "downscale_delay_s": size.downscale_delay_s,
            "look_back_period_s": size.look_back_period_s,
        },
    }


def index_shard_count(args: ServeArgs) -> int:
    """Shards in the index (one Retriever deployment each), from its manifest alone."""
    from thinkfast.index.manifest import read_manifest

    shards = len(read_manifest(args.index, args.s3_endpoint).shards)
    if shards == 0:
        from thinkfast.errors import IndexMismatchError

        raise IndexMismatchError(f"index {args.index} has no shards")
    return shards


def resolve_beta(args: ServeArgs) -> ServeArgs:
    """``args`` with β decided: a given β stays; none given takes the slow model's
    ``rerank_config.json`` (``thinkfast eval --choose-beta``) when it was chosen for the
    models these embeddings were made with, else 0. Decided once here, so every replica
    and every answer's reported β agree."""
    if args.beta is not None:
        return args
    from thinkfast.evaluation.rerank_config import served_beta
    from thinkfast.store.layout import read_embed_manifest

    manifest = read_embed_manifest(args.embeddings, args.s3_endpoint)
    beta, why = served_beta(args.slow, manifest.fast.identity if manifest.fast else None,
                            manifest.slow.identity if manifest.slow else None, args.s3_endpoint)
    logger.info("re-ranking with %s", why)
    return args.model_copy(update={"beta": beta})


def build_app(args: ServeArgs) -> Application:
    """Bind Ingress -> TextEncoder, Retriever x shards, Reranker (autoscaled), Catalog."""
    from thinkfast_pipelines.serve.deployments import Catalog, Reranker, Retriever, TextEncoder
    from thinkfast_pipelines.serve.ingress import Ingress

    if not isinstance(args, ServeArgs):  # called directly with a dict (e.g. from a notebook)
        args = ServeArgs.model_validate(args)
    args = resolve_beta(args)
    shards = index_shard_count(args)
    logger.info("building the search app: %d retriever shard(s) over %s", shards, args.index)
    lim = args.limits
    encoder = TextEncoder.options(**_fixed(args.encoder, lim)).bind(args)
    retrievers = [
        Retriever.options(name=f"Retriever_{i}", **_fixed(args.retriever, lim)).bind(args, i) for i in range(shards)
    ]
    reranker = Reranker.options(**_autoscaled(args.reranker, lim)).bind(args)
    catalog = Catalog.options(**_fixed(args.catalog, lim)).bind(args)
    return Ingress.options(**_fixed(args.ingress, lim)).bind(args, encoder, retrievers, reranker, catalog)

