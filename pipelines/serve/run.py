"""``thinkfast serve``: start the two-stage search service on Ray Serve.

Either from flags (``--fast --slow --index --embeddings --corpus``) or from a Serve config
file (``--config cluster/serve.yaml``, the same file ``serve run`` / ``serve deploy`` and
a KubeRay RayService take). Both end in one validated :class:`ServeArgs` and the same
``build_app``. Inputs are checked before Ray starts, so a wrong path is one clear line,
not a replica traceback. The plain function :func:`serve` is the Python API (the demo,
tests and benchmarks call it with ``blocking=False`` and get the base URL back).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from thinkfast_pipelines.serve.args import ServeArgs
from thinkfast.errors import ThinkfastError
from thinkfast.utils import fs
from thinkfast.utils.paths import absolute_model_ref, absolute_uri

logger = logging.getLogger(__name__)

APP_IMPORT_PATH = "thinkfast_pipelines.serve.app:build_app"

# Serve's per-call overheads that matter on a few cores (issue 16): by default every
# replica runs user code on a second event loop in its own thread, so each hop crosses
# threads twice more, and each request writes its access-log line unbuffered. These are
# two of the in-process parts of Ray's own RAY_SERVE_THROUGHPUT_OPTIMIZED mode. Not its
# RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0: that makes every handle need a running event
# loop, so ``handle.remote().result()`` from a user's plain (sync) driver code raises
# "No event loop running" (tests/test_serve.py caught it). Nor its direct ingress (it
# changes the HTTP port) or gRPC handles. Serve reads these at import in every worker, so
# they must be in the environment before Ray starts: ``serve()`` sets them when it starts
# a local Ray; a cluster (``serve deploy``, KubeRay) sets them in its pods' environment.
# An explicit value in the environment wins.
SERVE_FAST_PATH_ENV: dict[str, str] = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


def set_serve_fast_path_env() -> None:
    """Put :data:`SERVE_FAST_PATH_ENV` into ``os.environ`` (values already there win);
    effective only when called before this process starts Ray."""
    for key, value in SERVE_FAST_PATH_ENV.items():
        os.environ.setdefault(key, value)
DEFAULT_APP_NAME = "thinkfast"


@dataclass(frozen=True)
class ServeConfig:
    """One application of a Serve config file, plus the HTTP options it asks for."""

    args: ServeArgs  # the application's validated ``args:``
    name: str  # Serve application name
    route_prefix: str  # where the app is mounted on the HTTP proxy
    host: str | None  # http_options.host, if the file sets it
    port: int | None  # http_options.port, if the file sets it


def load_serve_config(path: str) -> ServeConfig:
    """Read a Serve config YAML (local or ``s3://``) that deploys this project's app."""
    import yaml

    if not fs.exists(path):
        raise ThinkfastError(f"serve config {path} does not exist")
    try:
        doc = yaml.safe_load(fs.read_bytes(path).decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ThinkfastError(f"serve config {path} is not valid YAML: {exc}") from None
    apps = (doc or {}).get("applications") if isinstance(doc, dict) else None
    ours = [a for a in apps or [] if isinstance(a, dict) and a.get("import_path") == APP_IMPORT_PATH]
    if len(ours) != 1:
        raise ThinkfastError(f"serve config {path} must have exactly one application with import_path {APP_IMPORT_PATH}")
    app = ours[0]
    try:
        args = ServeArgs.model_validate(app.get("args") or {})
    except ValidationError as exc:
        raise ThinkfastError(f"serve config {path}: invalid args: {_one_line(exc)}") from None
    http = doc.get("http_options") or {}
    return ServeConfig(
        args=args,
        name=str(app.get("name", DEFAULT_APP_NAME)),
        route_prefix=str(app.get("route_prefix", "/")),
        host=http.get("host"),
        port=int(http["port"]) if "port" in http else None,
    )


def check_inputs(args: ServeArgs) -> None:
    """Fail fast, before Ray, when an artifact the replicas would load is missing, or when a
    model's config is absurd: both checkpoints' configs are read and checked here on the
    driver (every field's bounds and the parameter estimate; no weights read, no model
    built), so a bad ``config.json`` is one ``CheckpointError`` line naming the file and the
    field instead of "Failed to update the deployments ['TextEncoder']"."""
    from thinkfast.models.hf_dual import is_hf_dual_reference
    from thinkfast.models.preflight import preflight_checkpoint

    hf_fast = is_hf_dual_reference(args.fast, args.s3_endpoint)  # a CLIP/SigLIP checkpoint: transformers checks it
    hub_id = hf_fast and not fs.is_s3(args.fast) and not os.path.exists(fs.strip_scheme(args.fast))
    required = {
        **({} if hub_id else {"--fast": fs.join(args.fast, "config.json")}),
        "--slow": fs.join(args.slow, "config.json"),
        "--index": fs.join(args.index, "manifest.json"),
        "--embeddings": fs.join(args.embeddings, "tokens", "manifest.json"),
        "--corpus": args.corpus,
    }
    for flag, uri in required.items():
        if not fs.exists(uri, args.s3_endpoint):
            raise ThinkfastError(f"{flag}: {uri} does not exist")
    if not hf_fast:
        preflight_checkpoint(args.fast, "fast", s3_endpoint=args.s3_endpoint)
    preflight_checkpoint(args.slow, "slow", s3_endpoint=args.s3_endpoint)


def _http_address(requested_host: str, requested_port: int) -> tuple[str, int]:
    """Where the Serve proxy really listens: the first ``serve.start`` on a cluster fixes it."""
    try:
        from ray.serve.context import _get_global_client

        config = _get_global_client().http_config
        return str(config.host or requested_host), int(config.port)
    except Exception:  # noqa: BLE001 - private API; fall back to what was asked
        return requested_host, requested_port


def absolute_args(args: ServeArgs) -> ServeArgs:
    """``args`` with its local paths made absolute here, on the driver: Serve replicas do
    not run in the caller's working directory."""
    return args.model_copy(update={
        "fast": absolute_model_ref(args.fast), "slow": absolute_model_ref(args.slow),
        "index": absolute_uri(args.index), "embeddings": absolute_uri(args.embeddings),
        "corpus": absolute_uri(args.corpus),
        "api_token_file": os.path.abspath(os.path.expanduser(args.api_token_file)) if args.api_token_file else None,
    })


def serve(
    args: ServeArgs | dict[str, Any],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = DEFAULT_APP_NAME,
    route_prefix: str = "/",
    address: str | None = None,
    blocking: bool = False,
) -> str:
    """Deploy the search app and return its base URL (``http://host:port/prefix``).

    ``blocking=True`` keeps the process (and a local Ray) alive until Ctrl-C; otherwise
    the app keeps running in the connected Ray cluster after this returns."""
    from ray import serve as ray_serve

    from thinkfast_pipelines.ray_utils import init_ray
    from thinkfast_pipelines.serve.app import build_app

    if not isinstance(args, ServeArgs):
        try:
            args = ServeArgs.model_validate(args)
        except ValidationError as exc:
            raise ThinkfastError(f"invalid serve arguments: {_one_line(exc)}") from None
    args = absolute_args(args)
    check_inputs(args)
    import ray

    if not ray.is_initialized():
        set_serve_fast_path_env()
    init_ray(address=address)
    ray_serve.start(http_options={"host": host, "port": port})
    real_host, real_port = _http_address(host, port)
    if (real_host, real_port) != (host, port):
        logger.warning("Serve already listens on %s:%d; %s:%d ignored", real_host, real_port, host, port)
    started = time.perf_counter()
    try:
        ray_serve.run(build_app(args), name=name, route_prefix=route_prefix)
    except ThinkfastError:
        raise
    except Exception as exc:  # noqa: BLE001 - a replica failed in __init__: one line for the CLI
        raise ThinkfastError(f"the service failed to start: {_one_line(exc)}") from exc
    url = f"http://{real_host}:{real_port}{route_prefix.rstrip('/')}"
    logger.info("search service %r up in %.1f s at %s", name, time.perf_counter() - started, url)
    if blocking:
        print(f"thinkfast serve: listening on {url}/  (Ctrl-C to stop)", flush=True)
        _wait_for_stop()
        logger.info("stopping: deleting app %r", name)
        ray_serve.delete(name)
    return url


def _wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM (what Kubernetes and process managers send), so both
    take the same clean path: the app is deleted and a local Ray shuts down at exit."""
    import signal
    import threading

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(exc: BaseException) -> str:
    """The most telling single line of an exception (replica errors carry whole tracebacks)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[:500]
    return (lines[-1] if lines else type(exc).__name__)[:500]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("artifacts (or --config)")
    src.add_argument("--fast", metavar="DIR", help="fast model directory or URI")
    src.add_argument("--slow", metavar="DIR", help="slow model directory or URI")
    src.add_argument("--index", metavar="URI", help="index directory (thinkfast index --out)")
    src.add_argument("--embeddings", metavar="URI", help="thinkfast embed --out (its tokens/ are used)")
    src.add_argument("--corpus", metavar="URI", help="corpus Parquet (captions and /media)")
    src.add_argument("--config", metavar="YAML", help="a Serve config file, e.g. cluster/serve.yaml")
    parser.add_argument("--host", default=None, help="HTTP host (default 127.0.0.1, or the config's)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default 8000, or the config's)")
    parser.add_argument("--name", default=None, help=f"Serve application name (default {DEFAULT_APP_NAME})")
    parser.add_argument("--beta", type=float, default=None, help="weight of s_fast in the final score")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF probes per shard search")
    parser.add_argument("--min-replicas", type=int, default=None, help="re-ranker replicas kept warm")
    parser.add_argument("--max-replicas", type=int, default=None, help="re-ranker autoscaling ceiling")
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (else AWS_ENDPOINT_URL)")
    parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    parser.add_argument("--detach", action="store_true", help="deploy and return (the app stays up on the cluster)")


def args_from_cli(ns: argparse.Namespace) -> tuple[ServeArgs, str, int, str, str]:
    """(ServeArgs, host, port, app name, route prefix) from parsed flags and/or --config."""
    flags = {k: getattr(ns, k) for k in ("fast", "slow", "index", "embeddings", "corpus")}
    if ns.config:
        if any(flags.values()):
            raise ThinkfastError("give either --config or the artifact flags (--fast ... --corpus), not both")
        cfg = load_serve_config(ns.config)
        base: dict[str, Any] = cfg.args.model_dump()
        host, port, name, prefix = cfg.host or "127.0.0.1", cfg.port or 8000, cfg.name, cfg.route_prefix
    else:
        missing = [f"--{k}" for k, v in flags.items() if not v]
        if missing:
            raise ThinkfastError(f"missing {', '.join(missing)} (or give --config YAML)")
        base = dict(flags)
        host, port, name, prefix = "127.0.0.1", 8000, DEFAULT_APP_NAME, "/"
    for key in ("beta", "nprobe", "s3_endpoint"):
        if getattr(ns, key) is not None:
            base[key] = getattr(ns, key)
    reranker = dict(base.get("reranker") or {})
    if ns.min_replicas is not None:
        reranker["min_replicas"] = ns.min_replicas
    if ns.max_replicas is not None:
        reranker["max_replicas"] = ns.max_replicas
    if reranker:
        base["reranker"] = reranker
    try:
        args = ServeArgs.model_validate(base)
    except ValidationError as exc:
        raise ThinkfastError(f"invalid serve arguments: {_one_line(exc)}") from None
    return args, ns.host or host, ns.port or port, ns.name or name, prefix


def run(ns: argparse.Namespace) -> int:
    args, host, port, name, prefix = args_from_cli(ns)
    serve(args, host=host, port=port, name=name, route_prefix=prefix, address=ns.address, blocking=not ns.detach)
    return 0
