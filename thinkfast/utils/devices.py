"""Where a stage's models run: one pure decision shared by embed, train, serve and index.

``--gpu`` (or a GPU count) becomes a :class:`Placement`: the torch device each actor
moves its model to, the Ray resources each actor or worker reserves, how many actors the
pool has, whether host batches are pinned, and whether the token model runs under fp16
autocast. The decision is a pure function of the request and of what is visible
(:func:`resolve_placement`), so it is tested without a GPU; only
:func:`visible_gpus` looks at torch; the Ray layer passes in what the cluster has.

Testing placement without a GPU: ``THINKFAST_GPU_RESOURCE=<name>`` (tests only) makes the
GPU request a Ray *custom* resource of that name (``ray.init(resources={name: 2})``)
instead of Ray's ``GPU``, and keeps the model on the CPU. Scheduling, pool sizing and the
options every stage passes to Ray are then exercised for real; CUDA kernels, pinned
copies and autocast are not.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, ContextManager, Mapping

from thinkfast.errors import ThinkfastError

logger = logging.getLogger(__name__)

GPU_RESOURCE_ENV = "THINKFAST_GPU_RESOURCE"
RAY_GPU = "GPU"


class DeviceError(ThinkfastError):
    """A GPU was asked for but none can be used (no CUDA, no GPU in the Ray cluster, or a
    count that does not fit)."""


def gpu_resource() -> str:
    """The Ray resource a GPU request reserves: ``GPU``, or the test override's name."""
    return os.environ.get(GPU_RESOURCE_ENV, "").strip() or RAY_GPU


def gpu_ray_options(num_gpus: float, resource: str | None = None) -> dict[str, Any]:
    """Ray options (``remote`` / ``map_batches`` / ``ray_actor_options``) reserving
    ``num_gpus`` GPUs: ``{"num_gpus": n}``, or ``{"resources": {name: n}}`` under the test
    override; ``{}`` for zero (a CPU actor must not ask for a GPU at all)."""
    resource = resource or gpu_resource()
    if num_gpus <= 0:
        return {}
    if resource == RAY_GPU:
        return {"num_gpus": float(num_gpus)}
    return {"resources": {resource: float(num_gpus)}}


@dataclass(frozen=True)
class Placement:
    """How one stage's actors (or Ray Train workers) are placed.

    ``device``: the torch device models move to (``cpu`` / ``cuda``). ``gpus_per_actor``: GPUs
    each actor reserves (0 on CPU). ``actors``: pool size. ``resource``: the Ray resource
    name GPUs are reserved under. ``amp``: the token model runs under fp16 autocast."""

    device: str = "cpu"
    gpus_per_actor: float = 0.0
    actors: int = 1
    resource: str = RAY_GPU
    amp: bool = False

    @property
    def uses_gpu(self) -> bool:
        """Whether actors reserve a GPU (real or, in tests, the custom resource)."""
        return self.gpus_per_actor > 0

    @property
    def pin_memory(self) -> bool:
        """Pin host batches before copying them to the device (only worth it for CUDA)."""
        return self.device == "cuda"

    def ray_options(self) -> dict[str, Any]:
        """The GPU part of an actor's Ray options (``{}`` on CPU)."""
        return gpu_ray_options(self.gpus_per_actor, self.resource) if self.uses_gpu else {}


def require_gpus(visible: float, resource: str = RAY_GPU) -> None:
    """Raise the one-line :class:`DeviceError` when ``--gpu`` meets a machine or cluster
    without GPUs (rather than Ray waiting forever for a resource nobody has)."""
    if visible <= 0:
        raise DeviceError(
            f"--gpu was asked for but no GPU is visible (torch.cuda.is_available() is False and Ray reports 0 "
            f"{resource}); run without --gpu, or pass --num-gpus N for an autoscaling cluster")


def resolve_placement(
    gpu: bool,
    *,
    visible: float,
    num_gpus: float | None = None,
    gpus_per_actor: float = 1.0,
    actors: int = 1,
    amp: bool = False,
    resource: str = RAY_GPU,
) -> Placement:
    """The placement a request asks for (pure: no Ray, no torch).

    ``gpu``: whether GPUs were asked for. ``visible``: GPUs Ray (or CUDA) reports.
    Pool size on GPU: ``num_gpus // gpus_per_actor`` when a count is given (trusted even
    above ``visible``: an autoscaling cluster adds GPU nodes on demand), else ``actors`` when
    more than one was asked for, else every visible GPU. A CPU request keeps ``actors`` and
    never reserves a GPU. Raises :class:`DeviceError` (one line) when nothing can be placed."""
    if not gpu:
        return Placement(device="cpu", gpus_per_actor=0.0, actors=max(1, int(actors)), resource=resource, amp=False)
    if gpus_per_actor <= 0:
        raise DeviceError(f"--gpus-per-actor must be positive with --gpu, got {gpus_per_actor}")
    if num_gpus is not None:
        if num_gpus <= 0:
            raise DeviceError(f"--num-gpus must be positive, got {num_gpus}")
        pool = math.floor(num_gpus / gpus_per_actor + 1e-9)
        if pool < 1:
            raise DeviceError(f"--num-gpus {num_gpus} is less than one actor's --gpus-per-actor {gpus_per_actor}")
    elif actors > 1:
        require_gpus(visible, resource)
        pool = int(actors)
    else:
        require_gpus(visible, resource)
        pool = max(1, math.floor(visible / gpus_per_actor + 1e-9))
    device = "cuda" if resource == RAY_GPU else "cpu"  # the test resource places actors, models stay on CPU
    return Placement(device=device, gpus_per_actor=float(gpus_per_actor), actors=pool, resource=resource,
                     amp=bool(amp) and device == "cuda")


def visible_gpus(resource: str | None = None, cluster: Mapping[str, float] | None = None) -> float:
    """GPUs this job can use: ``cluster``'s count of ``resource`` when given (the Ray layer
    passes ``ray.cluster_resources()``, so a driver on a CPU head node still sees the
    workers' GPUs), else this process's CUDA devices (real ``GPU`` only). The library never
    asks Ray itself: ``thinkfast_pipelines.ray_utils.placement_for`` does."""
    resource = resource or gpu_resource()
    if cluster is not None:
        return float(cluster.get(resource, 0.0))
    if resource != RAY_GPU:
        return 0.0
    try:
        import torch

        return float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    except ImportError:  # pragma: no cover
        return 0.0


def to_device(tensor: Any, device: Any, pin_memory: bool | None = None) -> Any:
    """``tensor`` on ``device``; a CPU tensor bound for CUDA is pinned first so the copy is
    asynchronous (``non_blocking``). On CPU it is returned as is (no copy)."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return tensor if tensor.device.type == "cpu" else tensor.cpu()
    pin = device.type == "cuda" if pin_memory is None else pin_memory
    if pin and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=pin)


def autocast(device: Any, enabled: bool) -> ContextManager[Any]:
    """fp16 autocast on CUDA when ``enabled`` (the token model, whose output is stored as
    float16 anyway); a no-op elsewhere, so CPU results never change."""
    import torch

    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


__all__ = ["DeviceError", "GPU_RESOURCE_ENV", "Placement", "autocast", "gpu_ray_options", "gpu_resource",
           "require_gpus", "resolve_placement", "to_device", "visible_gpus"]
