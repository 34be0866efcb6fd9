"""Connecting to Ray the same way from every pipeline stage.

Locally ``ray.init()`` starts a private cluster; with ``--address`` or ``RAY_ADDRESS`` the
same code joins a real cluster (inside a Ray job, ``ray.init()`` connects to it). The AWS
settings that point S3 clients at an endpoint travel to workers in the runtime env;
credentials never do (Ray logs runtime envs verbatim).
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from thinkfast.utils.devices import Placement

logger = logging.getLogger(__name__)

# forwarded to Ray workers and jobs so s3fs / pyarrow there reach the same S3 endpoint as
# the driver. Only settings, never credentials: Ray writes every runtime-env variable into
# runtime_env_agent.log. A local Ray started here inherits this process's environment
# (credentials included) through its raylet; on a real cluster each node uses its own
# credentials (instance role, IRSA, a mounted credentials file).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EC2_METADATA_DISABLED",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)
# never put into a runtime env, whatever the caller passes by accident
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


# the auth mode of a private local Ray that thinkfast starts (an explicit choice: Ray's
# default writes ~/.ray/auth_token, which then turns token auth on for every later
# `ray start` on the machine)
LOCAL_AUTH_MODE = "disabled"


def worker_env() -> dict[str, str]:
    """The forwarded variables present here, minus those a Ray job's runtime env already
    sets: inside a job driver Ray refuses to merge a ray.init runtime env whose env_vars
    overlap the job's (even with equal values), and the job's values are the ones to keep."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config:
        try:
            job_env = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):
            job_env = {}
        env = {k: v for k, v in env.items() if k not in job_env}
    return env


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> None:
    """Start or join Ray unless already connected (tests and ``demo`` connect once).

    A local Ray started here chooses its auth mode explicitly (``RAY_AUTH_MODE``, default
    ``disabled`` for this private, single-machine cluster), so that it neither writes
    ``~/.ray/auth_token`` nor changes how later ``ray start`` / ``ray job submit`` behave on
    the machine. (Ray 2.60's GCS, raylet and worker gRPC servers listen on every interface
    whatever ``_node_ip_address`` says: measured, see docs/OPERATIONS.md.) Worker output
    reaches this terminal only with ``-v`` (it is always in Ray's session logs)."""
    from thinkfast_pipelines import console

    import ray

    console.quiet_libraries()
    if ray.is_initialized():
        return
    console.route_ray_driver_messages()
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = kwargs.pop("runtime_env", None) or {}
    env_vars = {k: v for k, v in {**worker_env(), **runtime_env.get("env_vars", {})}.items() if k not in SECRET_ENV}
    if env_vars:
        runtime_env = {**runtime_env, "env_vars": env_vars}
    include_dashboard = kwargs.pop("include_dashboard", False)  # popped before kwargs are forwarded
    init_kwargs: dict[str, Any] = {"runtime_env": runtime_env or None, "log_to_driver": console.is_verbose(), **kwargs}
    if address:
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, **init_kwargs)
    else:
        if "RAY_AUTH_MODE" not in os.environ:
            os.environ["RAY_AUTH_MODE"] = LOCAL_AUTH_MODE
        logger.info("starting local Ray (num_cpus=%s, auth mode %s)", num_cpus, os.environ["RAY_AUTH_MODE"])
        ray.init(num_cpus=num_cpus, include_dashboard=include_dashboard, **init_kwargs)
    console.quiet_libraries()


def cluster_gpus(resource: str | None = None) -> float:
    """GPUs (or the test's custom resource) the running Ray cluster has, else this
    process's CUDA devices: what :func:`thinkfast.utils.devices.resolve_placement` sees."""
    import ray

    from thinkfast.utils.devices import visible_gpus

    return visible_gpus(resource, cluster=ray.cluster_resources() if ray.is_initialized() else None)


def placement_for(gpu: bool, *, num_gpus: float | None = None, gpus_per_actor: float = 1.0, actors: int = 1,
                  amp: bool = False) -> "Placement":
    """:func:`thinkfast.utils.devices.resolve_placement` with what the cluster has now
    (after Ray is up)."""
    from thinkfast.utils.devices import gpu_resource, resolve_placement

    resource = gpu_resource()
    visible = cluster_gpus(resource) if gpu else 0.0
    placement = resolve_placement(gpu, visible=visible, num_gpus=num_gpus, gpus_per_actor=gpus_per_actor,
                                  actors=actors, amp=amp, resource=resource)
    if gpu:
        logger.info("GPU placement: %d actor(s) x %g %s, device %s, amp %s (visible %g)", placement.actors,
                    placement.gpus_per_actor, resource, placement.device, placement.amp, visible)
    return placement
