"""GPU placement without a GPU (issue 16, "GPU readiness").

Pure tests pin the one decision (``thinkfast.utils.devices.resolve_placement``) and what
each stage hands Ray (embed's ``map_batches`` options and pool size, Ray Train's
``ScalingConfig``, Serve's ``ray_actor_options``, index's faiss GPU refusal and GPU
k-means hook). One Ray test runs a real embed with the GPU request mapped onto the
session cluster's custom resource ``fake_gpu`` (``THINKFAST_GPU_RESOURCE``): the actors
must hold that resource, the pool must fill both units, and the output must equal the
models run in this process. CUDA itself (kernels, pinned copies, autocast, nccl, faiss
GPU) is not exercised here: see docs/OPERATIONS.md, "GPUs".
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import FAKE_GPU, FAKE_GPUS
from thinkfast.errors import ThinkfastError
from thinkfast.utils.devices import (
    GPU_RESOURCE_ENV,
    DeviceError,
    Placement,
    autocast,
    gpu_ray_options,
    gpu_resource,
    resolve_placement,
    to_device,
    visible_gpus,
)

# --------------------------------------------------------------------------- the resolver


def test_cpu_request_keeps_actors_and_never_asks_for_a_gpu():
    p = resolve_placement(False, visible=8, actors=3, amp=True)
    assert (p.device, p.actors, p.uses_gpu, p.pin_memory, p.amp) == ("cpu", 3, False, False, False)
    assert p.ray_options() == {}


def test_gpu_pool_follows_the_visible_gpus_the_count_or_actors():
    p = resolve_placement(True, visible=4)
    assert (p.device, p.actors, p.pin_memory) == ("cuda", 4, True)
    assert p.ray_options() == {"num_gpus": 1.0}
    assert resolve_placement(True, visible=4, gpus_per_actor=0.5).actors == 8  # two actors share a GPU
    assert resolve_placement(True, visible=3, gpus_per_actor=2).actors == 1
    assert resolve_placement(True, visible=4, num_gpus=2).actors == 2  # the count wins over what is visible
    assert resolve_placement(True, visible=4, num_gpus=3, gpus_per_actor=1.5).actors == 2
    assert resolve_placement(True, visible=4, actors=3).actors == 3  # an explicit pool size is kept
    # an autoscaling cluster: a given count is trusted even with no GPU up yet
    assert resolve_placement(True, visible=0, num_gpus=4).actors == 4
    assert resolve_placement(True, visible=1, amp=True).amp is True


@pytest.mark.parametrize("kwargs, match", [
    ({"visible": 0}, r"--gpu was asked for but no GPU is visible"),
    ({"visible": 0, "actors": 4}, r"no GPU is visible"),
    ({"visible": 2, "num_gpus": 0.5}, r"less than one actor"),
    ({"visible": 2, "num_gpus": 0}, r"--num-gpus must be positive"),
    ({"visible": 2, "gpus_per_actor": 0}, r"--gpus-per-actor must be positive"),
])
def test_impossible_gpu_requests_fail_in_one_line(kwargs, match):
    with pytest.raises(DeviceError, match=match) as info:
        resolve_placement(True, **kwargs)
    assert "\n" not in str(info.value) and isinstance(info.value, ThinkfastError)


def test_custom_resource_places_actors_but_keeps_models_on_cpu(monkeypatch):
    monkeypatch.setenv(GPU_RESOURCE_ENV, FAKE_GPU)
    assert gpu_resource() == FAKE_GPU
    p = resolve_placement(True, visible=2, amp=True, resource=gpu_resource())
    assert (p.device, p.actors, p.pin_memory, p.amp) == ("cpu", 2, False, False)
    assert p.ray_options() == {"resources": {FAKE_GPU: 1.0}}
    assert gpu_ray_options(0.25) == {"resources": {FAKE_GPU: 0.25}}
    monkeypatch.delenv(GPU_RESOURCE_ENV)
    assert gpu_resource() == "GPU" and gpu_ray_options(0.5) == {"num_gpus": 0.5} and gpu_ray_options(0) == {}


def test_visible_gpus_reads_the_cluster_not_this_process():
    assert visible_gpus("GPU", cluster={"CPU": 8, "GPU": 4}) == 4
    assert visible_gpus(FAKE_GPU, cluster={"CPU": 8}) == 0


def test_cpu_helpers_change_nothing():
    """The CPU path stays as it was: no copy, no autocast (the token precision is the model's)."""
    x = torch.randn(2, 3)
    assert to_device(x, "cpu") is x
    with autocast("cpu", True):
        y = torch.nn.functional.linear(x, torch.randn(4, 3))
    assert y.dtype == torch.float32


# --------------------------------------------------------------------------- the stages


def test_embed_config_gpu_flags():
    from thinkfast_pipelines.embed import EmbedConfig, EmbedError
    from thinkfast_pipelines.embed.job import _actor_resources

    assert EmbedConfig(device="cuda").uses_gpu and EmbedConfig(gpu=True).uses_gpu and not EmbedConfig().uses_gpu
    for bad, match in (({"num_gpus": 2}, "--num-gpus needs --gpu"), ({"amp": True}, "--amp needs --gpu")):
        with pytest.raises(EmbedError, match=match):
            EmbedConfig(**bad).validate()
    EmbedConfig(gpu=True, num_gpus=2, amp=True).validate()
    config = EmbedConfig(cpus_per_actor=2)
    assert _actor_resources(config, Placement()) == {"num_cpus": 2}  # CPU: exactly the old request
    gpu = resolve_placement(True, visible=1)
    assert _actor_resources(config, gpu) == {"num_cpus": 2, "num_gpus": 1.0}


def test_train_scaling_config():
    import ray.train

    from thinkfast.training.config import TrainConfig
    from thinkfast_pipelines.train.run import scaling_options

    cpu, backend = scaling_options(TrainConfig(workers=2, cpus_per_worker=1.5))
    assert backend == "gloo" and cpu == {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1.5}}
    gpu, backend = scaling_options(TrainConfig(workers=4, cpus_per_worker=6, use_gpu=True), visible=4)
    assert backend == "nccl" and gpu["use_gpu"] is True and gpu["num_workers"] == 4
    # --cpus-per-worker is kept on GPU (it used to be dropped) and Ray Train adds one GPU each
    assert ray.train.ScalingConfig(**gpu)._resources_per_worker_not_none == {"CPU": 6, "GPU": 1}
    with pytest.raises(DeviceError, match="no GPU is visible"):
        scaling_options(TrainConfig(use_gpu=True), visible=0)


def test_train_scaling_config_with_the_test_resource(monkeypatch):
    import ray.train

    from thinkfast.training.config import TrainConfig
    from thinkfast_pipelines.train.run import scaling_options

    monkeypatch.setenv(GPU_RESOURCE_ENV, FAKE_GPU)
    options, backend = scaling_options(TrainConfig(workers=2, use_gpu=True), visible=2)
    assert backend == "gloo"  # CPU tensors: nccl would need CUDA
    assert ray.train.ScalingConfig(**options)._resources_per_worker_not_none == {"CPU": 1.0, FAKE_GPU: 1.0}


def test_serve_replicas_reserve_their_gpus():
    from thinkfast_pipelines.serve.app import _autoscaled, _fixed
    from thinkfast_pipelines.serve.args import DeploymentSize, RerankerSize, ServeArgs, ServiceLimits

    limits = ServiceLimits()
    assert _fixed(DeploymentSize(), limits)["ray_actor_options"] == {"num_cpus": 0.25}  # CPU default unchanged
    assert _fixed(DeploymentSize(num_gpus=0.5), limits)["ray_actor_options"] == {"num_cpus": 0.25, "num_gpus": 0.5}
    assert _autoscaled(RerankerSize(num_gpus=1), limits)["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1.0}
    args = ServeArgs.model_validate({"fast": "f", "slow": "s", "index": "i", "embeddings": "e", "corpus": "c",
                                     "reranker": {"num_gpus": 1}, "encoder": {"num_gpus": 0.25}})
    assert (args.reranker.num_gpus, args.encoder.num_gpus, args.retriever.num_gpus) == (1.0, 0.25, 0.0)
    with pytest.raises(ValueError):
        DeploymentSize(num_gpus=-1)


def test_index_gpu_refused_without_a_gpu_faiss_build():
    import faiss

    from thinkfast.index.factory import faiss_gpus, require_faiss_gpus, train_index

    if faiss_gpus() > 0:
        pytest.skip("a GPU faiss build is installed here")
    with pytest.raises(ThinkfastError, match=r"index --gpu needs a GPU build of faiss") as info:
        train_index("IVF4,Flat", 8, np.zeros((64, 8), np.float32), gpu=True)
    assert "\n" not in str(info.value)
    assert faiss_gpus(object()) == 0  # a build without get_num_gpus at all
    with pytest.raises(ThinkfastError):
        require_faiss_gpus(faiss)


def test_index_gpu_kmeans_goes_through_index_cpu_to_all_gpus(monkeypatch):
    """With a (stand-in) GPU build, the IVF k-means runs on ``index_cpu_to_all_gpus`` of
    a flat index of the same metric, and the quantizer equals the CPU-trained one."""
    import faiss

    from thinkfast.index.factory import prepare_vectors, train_index

    x = prepare_vectors(np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32), 16)
    cpu = train_index("IVF16,Flat", 16, x, seed=1)
    calls = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: calls.append(index) or index)
    gpu = train_index("IVF16,Flat", 16, x, seed=1, gpu=True)
    assert len(calls) == 1 and isinstance(calls[0], faiss.IndexFlatIP) and calls[0].d == 16
    centroids = [faiss.extract_index_ivf(i).quantizer.reconstruct_n(0, 16) for i in (cpu, gpu)]
    np.testing.assert_array_equal(*centroids)
    assert isinstance(gpu, faiss.Index) and gpu.ntotal == 0  # still a CPU index: shards add to it as before


# --------------------------------------------------------------------------- placement on Ray


@pytest.mark.ray
def test_embed_actors_are_placed_on_the_gpu_resource(ray_session, models, tmp_path, monkeypatch):
    import ray

    from thinkfast.data.synth import SynthConfig, write_synth
    from thinkfast.models.fast import FastModel
    from thinkfast_pipelines.embed import EmbedConfig, embed
    from thinkfast_pipelines.embed.job import embed_placement

    monkeypatch.setenv(GPU_RESOURCE_ENV, FAKE_GPU)
    assert ray.cluster_resources().get(FAKE_GPU) == FAKE_GPUS
    # pool size follows the count (Ray is up: this is what the job computes)
    assert embed_placement(EmbedConfig(gpu=True)).actors == FAKE_GPUS
    assert embed_placement(EmbedConfig(gpu=True, num_gpus=1)).actors == 1
    assert embed_placement(EmbedConfig(gpu=True, gpus_per_actor=0.5)).actors == 2 * FAKE_GPUS
    assert embed_placement(EmbedConfig()).ray_options() == {}

    corpus, out = str(tmp_path / "corpus"), str(tmp_path / "emb")
    write_synth(corpus, SynthConfig(num_images=24, captions_per_image=1, image_size=32, seed=5,
                                    image_format="png"), workers=1)
    fast_dir, _ = models
    lowest, stop = [float(FAKE_GPUS)], threading.Event()

    def watch() -> None:  # the actors hold the resource while the stream runs
        while not stop.is_set():
            lowest[0] = min(lowest[0], ray.available_resources().get(FAKE_GPU, 0.0))
            stop.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        manifest = embed(corpus, out, fast=fast_dir, config=EmbedConfig(gpu=True, batch_size=4, progress=False))
    finally:
        stop.set()
        watcher.join()
    assert lowest[0] == 0.0, "the embed actors never held both fake_gpu units"
    assert manifest["counts"]["embedded"] == 24
    assert ray.available_resources().get(FAKE_GPU) == FAKE_GPUS  # released afterwards

    # placement changes where, not what: the vectors equal the model run here
    from thinkfast.data.media import load_pixels
    from thinkfast.data.schema import validate_corpus_schema

    fast = pq.read_table(os.path.join(out, "fast"))
    keys = fast.column("key").to_pylist()
    source = pq.read_table(corpus)
    columns = validate_corpus_schema(source.schema)
    rows = {r["key"]: r for r in source.select(["key", columns.media]).to_pylist()}
    pixels = torch.stack([load_pixels(rows[k], columns, 32, 1) for k in keys])
    with torch.inference_mode():
        expected = FastModel.from_pretrained(fast_dir).eval().encode_image(pixels).numpy()
    vectors = np.asarray(fast.column("embedding").combine_chunks().flatten()).reshape(len(keys), -1)
    np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)
