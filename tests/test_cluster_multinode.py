"""A real two-node Ray cluster on this machine, driven through ``thinkfast submit``.

The test starts its own head (127.0.0.3) and worker (127.0.0.2, with a ``worker_node``
resource) with ``ray start --block`` in their own temp dir and process groups, so that
stopping them never touches the session Ray other tests use: ``ray stop`` would kill
every Ray process on the machine, so it is never called. The jobs reach S3 only through
the moto server and the AWS variables that ``thinkfast submit`` forwards (the cluster
processes themselves are started without them).
"""

from __future__ import annotations

import json
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

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RAY_BIN = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 60.0
# Not 127.0.0.1: Ray rewrites "localhost" addresses to the machine's routable one
# (ray._private.services.resolve_ip_for_localhost), which takes traffic off loopback.
# Any other 127.x address is kept as given, so both nodes stay on loopback.
HEAD_IP = "127.0.0.3"
WORKER_IP = "127.0.0.2"


@dataclass
class LocalCluster:
    """Handles to the two ``ray start --block`` processes and the dashboard URL."""

    dashboard_url: str
    gcs_address: str
    temp_dir: str
    processes: list[subprocess.Popen]


def _cluster_env() -> dict[str, str]:
    """The cluster's own environment: no AWS variables (jobs must get them from submit)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    env.pop("RAY_ADDRESS", None)
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
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if cluster.temp_dir in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        except psutil.Error:
            pass
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def two_node_cluster():
    """Head on 127.0.0.3 (2 CPUs, dashboard) + worker on 127.0.0.2 (2 CPUs, ``worker_node``)."""
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
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
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
                "--num-cpus=2",
                '--resources={"worker_node": 1}',
                f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--object-store-memory={256 * 1024 * 1024}",
            ],
            os.path.join(temp_dir, "worker.out"),
        )
        cluster.processes.append(worker)
        _wait(lambda: len(_alive_nodes(cluster.dashboard_url)) >= 2, "worker node", cluster.processes, temp_dir)
        yield cluster
    finally:
        _stop(cluster)


def _thinkfast(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real ``thinkfast`` command line, as a user runs it (exit code included)."""
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
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


def test_submit_runs_a_job_on_the_cluster(two_node_cluster):
    proc = _thinkfast("submit", "--address", two_node_cluster.dashboard_url, "--", "embed", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--corpus" in proc.stdout  # the job's output came back through the log stream
    assert "SUCCEEDED" in proc.stderr
