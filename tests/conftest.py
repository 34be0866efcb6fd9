"""Shared fixtures: one local Ray per test session, one moto S3 server on 127.0.0.1.

Both start only when a test asks for them, and stop at the end of the session.
"""

from __future__ import annotations

import logging
import os
import tempfile
import socket

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CLI calls in tests log to a temporary state dir, never into the real home
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="thinkfast-state-")


# a Ray custom resource standing in for GPUs in the session cluster (see ray_session)
FAKE_GPU, FAKE_GPUS = "fake_gpu", 2

# the session's S3 secret: distinctive, so a test can prove it never reaches a log
SECRET_MARKER = "tf-secret-" + os.urandom(8).hex()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's server) on loopback; yields its URL.

    Sets the standard AWS variables so s3fs, pyarrow and Ray workers all reach it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET_MARKER,  # moto takes any; tests grep Ray's logs for it
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": url,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield url
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test; yields ``s3://name``."""
    import boto3

    name = "tf-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    client = boto3.client("s3", endpoint_url=s3_server)
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole session (4 logical CPUs on 2 cores, so an actor pool
    never starves the read stage). Depends on ``s3_server`` so that workers inherit the
    S3 environment. Two units of the custom resource ``fake_gpu`` let GPU placement be
    tested without a GPU (``THINKFAST_GPU_RESOURCE=fake_gpu``, tests/test_devices.py);
    nothing else asks for it."""
    import ray

    from thinkfast_pipelines.ray_utils import init_ray
    from thinkfast_pipelines.serve.run import set_serve_fast_path_env

    set_serve_fast_path_env()  # what `thinkfast serve` sets when it starts Ray: the tests serve the same way
    init_ray(num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024 * 1024,
             resources={FAKE_GPU: FAKE_GPUS})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - serve may never have started
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Untrained tiny fast + slow models over a small word vocabulary, saved once per
    session (seeded, so every module sees the same weights); returns (fast_dir, slow_dir).
    A module that needs other models defines its own ``models`` fixture."""
    import torch

    from thinkfast.data.tokenizer import WordTokenizer
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel

    root = tmp_path_factory.mktemp("tiny_models")
    words = ["a", "red", "blue", "green", "circle", "square", "triangle", "left", "of", "above", "the"]
    tokenizer = WordTokenizer.build([" ".join(words)])
    torch.manual_seed(0)
    FastModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(str(root / "fast"))
    SlowModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(str(root / "slow"))
    return str(root / "fast"), str(root / "slow")
