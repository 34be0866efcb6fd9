"""A real two-node Ray cluster on this machine, driven through ``thinkfast submit``.

The test starts its own head (127.0.0.3) and worker (127.0.0.2, with a ``worker_node``
resource) with ``ray start --block`` in their own temp dir and process groups, so that
stopping them never touches the session Ray other tests use: ``ray stop`` would kill
every Ray process on the machine, so it is never called. The nodes hold their own S3
credentials, as an instance role or a credentials file would on a real cluster; the S3
endpoint reaches the jobs only through ``thinkfast submit``, which forwards settings but
never credentials (Ray writes runtime envs into its logs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RAY_BIN = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 120.0  # generous: 2 shared cores under load start a node in ~30 s
# Not 127.0.0.1: Ray rewrites "localhost" addresses to the machine's routable one
# (ray._private.services.resolve_ip_for_localhost), which takes traffic off loopback.
# Any other 127.x address is kept as given, so both nodes stay on loopback.
HEAD_IP = "127.0.0.3"
START_ATTEMPTS = 2
WORKER_IP = "127.0.0.2"


@dataclass
class LocalCluster:
    """Handles to the two ``ray start --block`` processes and the dashboard URL."""

    dashboard_url: str
    gcs_address: str
    temp_dir: str
    processes: list[subprocess.Popen]


# what a node of a real cluster has of its own: credentials and region, not the endpoint
NODE_AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")


def _cluster_env() -> dict[str, str]:
    """The cluster's own environment: node credentials, but no endpoint (jobs get it from submit)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k in NODE_AWS}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    env.pop("RAY_ADDRESS", None)
    # jobs run `python -m thinkfast_pipelines.cli`: make that this venv's python even when the
    # suite was started as .venv/bin/python without activating the venv
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _start_node(args: list[str], log_path: str) -> subprocess.Popen:
    """``ray start --block`` in its own session: SIGTERM to it stops what it started."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [RAY_BIN, "start", "--block", "--disable-usage-stats", *args],
            env=_cluster_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _alive_nodes(dashboard_url: str) -> list[dict]:
    with urllib.request.urlopen(f"{dashboard_url}/nodes?view=summary", timeout=2) as response:
        summary = json.load(response)["data"]["summary"]
    return [node for node in summary if node["raylet"]["state"] == "ALIVE"]


def _wait(predicate, what: str, processes: list[subprocess.Popen], temp_dir: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for proc in processes:
            if proc.poll() is not None:
                logs = "\n".join(p.read_text()[-2000:] for p in Path(temp_dir).glob("*.out"))
                raise RuntimeError(f"ray start exited with {proc.returncode} while waiting for {what}:\n{logs}")
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no {what} after {START_TIMEOUT_S:.0f} s")


def _stop(cluster: LocalCluster) -> None:
    """SIGTERM each ``ray start --block`` (it kills the node's processes), then SIGKILL
    whatever of *this* cluster is left: processes whose command line names its temp dir."""
    import psutil

    for proc in reversed(cluster.processes):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in cluster.processes:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if cluster.temp_dir in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        except psutil.Error:
            pass
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def _bring_up(head_cpus: int, worker_cpus: int) -> LocalCluster:
    """Start head then worker and wait for both; on failure stop what started and raise."""
    temp_dir = tempfile.mkdtemp(prefix="tfc", dir="/tmp")  # short: Ray's socket paths are length-limited
    gcs_port, dash_port = free_port(), free_port()
    head = _start_node(
        [
            "--head",
            f"--node-ip-address={HEAD_IP}",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            "--include-dashboard=true",
            f"--num-cpus={head_cpus}",
            f"--temp-dir={temp_dir}/h",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--object-store-memory={256 * 1024 * 1024}",
        ],
        os.path.join(temp_dir, "head.out"),
    )
    cluster = LocalCluster(f"http://127.0.0.1:{dash_port}", f"{HEAD_IP}:{gcs_port}", temp_dir, [head])
    try:
        _wait(lambda: len(_alive_nodes(cluster.dashboard_url)) >= 1, "head node", cluster.processes, temp_dir)
        worker = _start_node(
            [
                f"--address={cluster.gcs_address}",
                f"--node-ip-address={WORKER_IP}",
                f"--num-cpus={worker_cpus}",
                '--resources={"worker_node": 1}',
                # its own temp dir: by default a node joins the head's session dir, and two
                # nodes on one machine then share runtime_resources/, where each node's agent
                # unpacks and garbage-collects job working dirs under the other's feet
                f"--temp-dir={temp_dir}/w",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--object-store-memory={256 * 1024 * 1024}",
            ],
            os.path.join(temp_dir, "worker.out"),
        )
        cluster.processes.append(worker)
        _wait(lambda: len(_alive_nodes(cluster.dashboard_url)) >= 2, "worker node", cluster.processes, temp_dir)
    except BaseException:
        _stop(cluster)
        raise
    return cluster


@contextlib.contextmanager
def local_cluster(head_cpus: int = 2, worker_cpus: int = 2) -> Iterator[LocalCluster]:
    """Head on 127.0.0.3 (dashboard on 127.0.0.1) + worker on 127.0.0.2 with a
    ``worker_node`` resource; stopped (only these processes) on exit.

    ``ray start`` gives a node a fixed 30 s to register with the GCS; on a saturated
    machine it can miss that and exit, so a failed start is retried once, from scratch."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            cluster = _bring_up(head_cpus, worker_cpus)
            break
        except (RuntimeError, TimeoutError) as exc:
            if attempt == START_ATTEMPTS:
                raise
            logging.getLogger(__name__).warning("cluster start failed (attempt %d), retrying: %s", attempt, str(exc)[:300])
    try:
        yield cluster
    finally:
        _stop(cluster)


@pytest.fixture(scope="module")
def two_node_cluster(s3_server):
    """The module's cluster: 2 + 2 CPUs, the second node tagged ``worker_node``; started
    after the S3 server so that its nodes hold the (test) credentials."""
    with local_cluster() as cluster:
        yield cluster


def _thinkfast(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real ``thinkfast`` command line, as a user runs it (exit code included)."""
    return subprocess.run(
        [sys.executable, "-m", "thinkfast_pipelines.cli", *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cluster_has_two_nodes_with_their_resources(two_node_cluster):
    nodes = _alive_nodes(two_node_cluster.dashboard_url)
    ips = sorted(node["raylet"]["nodeManagerAddress"] for node in nodes)
    assert ips == sorted([HEAD_IP, WORKER_IP])


# ------------------------------------------------------------------ embed on S3, 2 nodes

N_IMAGES = 24


def _job_id(stderr: str) -> str:
    match = [w for w in stderr.split() if w.startswith("raysubmit_")]
    assert match, stderr
    return match[-1]


def _worker_node_id(dashboard_url: str) -> str:
    return next(n["raylet"]["nodeId"] for n in _alive_nodes(dashboard_url) if n["raylet"]["nodeManagerAddress"] == WORKER_IP)


@pytest.fixture(scope="module")
def s3_corpus(two_node_cluster, s3_server):
    """A generated corpus written *by a job* (``thinkfast submit -- synth``) to a moto
    bucket, one extra file with an undecodable row, and tiny untrained model dirs."""
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    from thinkfast import FastModel, SlowModel
    from thinkfast.data.reader import read_table
    from thinkfast.data.tokenizer import WordTokenizer
    from thinkfast.utils import fs

    bucket = "s3://tf-cluster-embed"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket[5:])
    corpus = f"{bucket}/corpus"
    proc = _thinkfast(
        "submit", "--address", two_node_cluster.dashboard_url, "--",
        "synth", "--out", corpus, "--images", str(N_IMAGES), "--image-size", "32", "--seed", "3", "--workers", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    synth_job = proc
    table = read_table(corpus)
    assert table.num_rows == N_IMAGES
    # one row whose image is not an image: embed must reject it with a reason, not drop it
    bad = table.slice(0, 1)
    bad = bad.set_column(bad.schema.get_field_index("key"), "key", pa.array(["corrupt-0"]))
    bad = bad.set_column(bad.schema.get_field_index("jpg"), "jpg", pa.array([b"not an image"], type=table.schema.field("jpg").type))
    filesystem, path = fs.arrow_fs(f"{corpus}/zz-corrupt.parquet")
    pq.write_table(bad, path, filesystem=filesystem)

    captions = [c for row in table.column("captions").to_pylist() for c in row]
    tokenizer = WordTokenizer.build(captions)
    FastModel.from_preset("tiny", tokenizer=tokenizer, load_pretrained=False).save_pretrained(f"{bucket}/models/fast")
    SlowModel.from_preset("tiny", tokenizer=tokenizer, load_pretrained=False).save_pretrained(f"{bucket}/models/slow")
    return bucket, set(table.column("key").to_pylist()), synth_job


def test_submit_streams_the_jobs_logs_and_reports_success(s3_corpus):
    _, _, synth_job = s3_corpus  # `thinkfast submit -- synth` wrote the corpus the other tests use
    assert f"Running entrypoint for job {_job_id(synth_job.stderr)}" in synth_job.stdout  # streamed
    assert "python -m thinkfast_pipelines.cli synth --out s3://tf-cluster-embed/corpus" in synth_job.stdout
    assert synth_job.stderr.strip().splitlines()[-1].endswith("SUCCEEDED")


@pytest.fixture(scope="module")
def embed_job(two_node_cluster, s3_corpus) -> tuple[str, subprocess.CompletedProcess]:
    """``thinkfast submit -- embed`` with the driver placed on the second node."""
    bucket, _, _ = s3_corpus
    out = f"{bucket}/emb"
    proc = _thinkfast(
        "submit", "--address", two_node_cluster.dashboard_url,
        "--entrypoint-resource", "worker_node=1",  # the driver runs on the second node
        "--", "embed", "--corpus", f"{bucket}/corpus", "--fast", f"{bucket}/models/fast",
        "--slow", f"{bucket}/models/slow", "--out", out,
        "--actors", "1", "--cpus-per-actor", "1", "--batch-size", "8", "--no-progress",
    )  # fmt: skip
    return out, proc


def test_submit_embed_on_s3_across_two_nodes_is_complete(two_node_cluster, s3_corpus, embed_job):
    from ray.job_submission import JobSubmissionClient

    from thinkfast.data.reader import read_table
    from thinkfast.store import TokenStore, read_embeddings
    from thinkfast.utils import fs

    _, good_keys, _ = s3_corpus
    out, proc = embed_job
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = JobSubmissionClient(two_node_cluster.dashboard_url).get_job_info(_job_id(proc.stderr))
    assert info.driver_node_id == _worker_node_id(two_node_cluster.dashboard_url)

    keys, vectors = read_embeddings(f"{out}/fast")
    rejected = read_table(f"{out}/rejected").to_pylist()
    tokens = TokenStore.open(f"{out}/tokens")
    assert set(keys) == good_keys and len(keys) == len(good_keys)  # every good row, once
    assert [(r["key"], r["stage"]) for r in rejected] == [("corrupt-0", "decode")]
    assert rejected[0]["reason"]
    assert set(tokens.keys()) == good_keys
    assert vectors.shape[0] == len(keys) and tokens.get(sorted(good_keys)[:2]).shape[0] == 2
    counts = fs.read_json(f"{out}/manifest.json")["counts"]  # written last: the run finished
    assert (counts["in"], counts["embedded"], counts["rejected"]) == (N_IMAGES + 1, N_IMAGES, 1)


def test_submit_index_from_the_embeddings_on_s3(two_node_cluster, s3_corpus, embed_job):
    """The next stage reads what the previous job wrote to S3, on the same cluster."""
    from thinkfast import ShardedIndex
    from thinkfast.store import read_embeddings

    bucket, good_keys, _ = s3_corpus
    emb, _ = embed_job
    out = f"{bucket}/index"
    proc = _thinkfast("submit", "--address", two_node_cluster.dashboard_url, "--", "index", "--embeddings", emb, "--out", out, "--shards", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys, vectors = read_embeddings(f"{emb}/fast")
    index = ShardedIndex.load(out)
    assert len(index) == len(good_keys)
    found, scores = index.search(vectors[:4], len(good_keys))
    for key, row, row_scores in zip(keys[:4], found, scores):
        assert set(row) == good_keys  # every embedded key is in the index
        ties = {k for k, sc in zip(row, row_scores) if sc >= row_scores[0] - 1e-5}
        assert key in ties and abs(row_scores[0] - 1.0) < 1e-4  # a unit vector finds itself first


def test_plain_ray_job_submit_as_in_the_readme(two_node_cluster, s3_corpus, embed_job):
    """The README's `ray job submit` form: S3 settings travel in the job's env_vars, which
    the stage's own init_ray must not collide with (no merge override here)."""
    from thinkfast import ShardedIndex

    bucket, good_keys, _ = s3_corpus
    emb, _ = embed_job
    runtime_env = {
        "excludes": [".venv", ".git", "tests/data", "benchmarks/results"],
        # settings only: the nodes hold their own credentials (Ray logs runtime envs)
        "env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_") and k not in NODE_AWS[:2]},
    }
    proc = subprocess.run(
        [RAY_BIN, "job", "submit", "--address", two_node_cluster.dashboard_url, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "-m", "thinkfast_pipelines.cli", "index", "--embeddings", emb, "--out", f"{bucket}/index-plain"],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert len(ShardedIndex.load(f"{bucket}/index-plain")) == len(good_keys)


def test_failing_job_makes_submit_exit_nonzero_with_the_jobs_error(two_node_cluster, s3_corpus):
    bucket, _, _ = s3_corpus
    proc = _thinkfast(
        "submit", "--address", two_node_cluster.dashboard_url, "--",
        "embed", "--corpus", f"{bucket}/no-such-corpus", "--fast", f"{bucket}/models/fast",
        "--slow", f"{bucket}/models/slow", "--out", f"{bucket}/emb-missing",
    )  # fmt: skip
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("thinkfast submit: error: job raysubmit_") and "FAILED" in last
    assert "thinkfast embed: error:" in last and "no-such-corpus" in last  # the job's own error line
