"""S3 and disk faults: unreachable, missing, slow and erroring storage (issue 20, item 5).

What the system promises, and what is checked here:

* ``thinkfast index``, ``embed`` and ``train-fast`` to an unreachable endpoint (a closed
  loopback port) or a missing bucket (on the moto server) exit 2 with one line naming the
  URI and the cause (after the CLI's "logs in" line), no traceback, in seconds: the
  pre-flights (:func:`thinkfast.utils.fs.check_writable`) fail before Ray starts.
* A slow or erroring endpoint (a tiny HTTP server on loopback answering 503, or never
  answering) gets exactly ``THINKFAST_S3_MAX_ATTEMPTS`` requests per operation from every
  client (the probe, s3fs, pyarrow), with backoff, and the call ends within the
  configured bound.
* A storage failure raised inside Ray (wrapped in ``RayTaskError`` or Ray Train's
  ``ControllerError``) is recognised in the chain: one line, exit 2.

None of these start Ray: the CLI runs fail in their pre-flight, before ``init_ray``.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import free_port
from thinkfast.errors import StorageError
from thinkfast.utils import fs

# what a subprocess run may take at most: interpreter + imports (torch for train/embed)
# + the bounded retries against a refused port; a regression to unbounded retries or to a
# failure after Ray's start blows it
CLI_BOUND_S = 60.0


class FaultyS3:
    """An "S3 endpoint" on loopback that answers every request with ``status`` (an S3 XML
    error body), or after ``hang`` seconds with nothing; counts what it received."""

    def __init__(self, status: int = 503, hang: float = 0.0) -> None:
        self.status, self.hang = status, hang
        self.requests: list[tuple[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                outer.requests.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if outer.hang:
                    time.sleep(outer.hang)
                    self.close_connection = True
                    return
                body = b'<?xml version="1.0"?><Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>'
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_env(monkeypatch):
    """Credentials that sign requests (any will do for a fake endpoint), few attempts, short timeouts."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", os.environ.get("AWS_ACCESS_KEY_ID", "testing"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("THINKFAST_S3_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("THINKFAST_S3_TIMEOUT_S", "1")
    monkeypatch.setenv("THINKFAST_S3_CONNECT_TIMEOUT_S", "1")


@pytest.fixture
def erroring():
    server = FaultyS3(status=503)
    yield server
    server.close()


@pytest.fixture
def hanging():
    server = FaultyS3(hang=2.5)
    yield server
    server.close()


def _closed_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"


# --------------------------------------------------------------------------- pre-flights


def test_check_writable_on_moto_leaves_nothing_and_names_a_missing_bucket(s3_bucket, s3_server):
    import boto3

    fs.check_writable(f"{s3_bucket}/out/run1")
    client = boto3.client("s3", endpoint_url=s3_server)
    assert client.list_objects_v2(Bucket=s3_bucket[5:]).get("KeyCount", 0) == 0  # the probe is gone
    with pytest.raises(StorageError, match=r"^cannot write to s3://tf-no-such-bucket/x: bucket 'tf-no-such-bucket' does not exist$"):
        fs.check_writable("s3://tf-no-such-bucket/x")
    with pytest.raises(StorageError, match=r"cannot read s3://tf-no-such-bucket/x: bucket 'tf-no-such-bucket' does not exist"):
        fs.check_readable("s3://tf-no-such-bucket/x")
    with pytest.raises(StorageError, match="nothing there"):
        fs.check_readable(f"{s3_bucket}/absent")


def test_check_writable_refused_port_is_one_quick_line_without_credentials(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "tf-marker-secret-123")
    monkeypatch.setenv("THINKFAST_S3_MAX_ATTEMPTS", "2")
    endpoint = _closed_endpoint()
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        fs.check_writable("s3://bkt/out", endpoint)
    took = time.monotonic() - start
    message = str(info.value)
    assert message == f"cannot write to s3://bkt/out: cannot reach S3 endpoint {endpoint} (connection refused)"
    assert "tf-marker-secret-123" not in message and took < 10, took
    # userinfo in an endpoint URL is never printed
    with pytest.raises(StorageError) as info:
        fs.check_writable("s3://bkt/out", endpoint.replace("http://", "http://user:pw@"))
    assert "pw" not in str(info.value) and endpoint in str(info.value)


def test_check_writable_local(tmp_path):
    fs.check_writable(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"cannot write to .*/file/sub: a file is in the way"):
        fs.check_writable(str(tmp_path / "file" / "sub"))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(StorageError, match="permission denied"):
            fs.check_writable(str(locked / "out"))


# --------------------------------------------------------------------------- slow / erroring endpoint


def test_erroring_endpoint_gets_bounded_attempts_from_every_client(s3_env, erroring):
    """503 on everything: each client makes exactly THINKFAST_S3_MAX_ATTEMPTS requests per
    operation (with backoff between them) and then fails, within the bound."""
    attempts = 3
    # the pre-flight: a StorageError naming the URI, the endpoint and the status
    start = time.monotonic()
    with pytest.raises(StorageError, match=rf"^cannot write to s3://bkt/out: S3 endpoint {erroring.url} answered HTTP 503"):
        fs.check_writable("s3://bkt/out", erroring.url)
    assert len(erroring.requests) == attempts and time.monotonic() - start < 10
    assert all(method == "PUT" for method, _ in erroring.requests)

    # s3fs (what the index, token store and layout write through)
    erroring.requests.clear()
    start = time.monotonic()
    with pytest.raises(OSError):
        fs.write_bytes("s3://bkt/out/x.json", b"{}", erroring.url)
    assert len(erroring.requests) == attempts and time.monotonic() - start < 10, erroring.requests

    # pyarrow (what Ray Data and Ray Train write through)
    erroring.requests.clear()
    filesystem, path = fs.arrow_fs("s3://bkt/out/y.parquet", erroring.url)
    start = time.monotonic()
    with pytest.raises(OSError):
        with filesystem.open_output_stream(path) as out:
            out.write(b"x")
    assert len(erroring.requests) == attempts and time.monotonic() - start < 10, erroring.requests


def test_hanging_endpoint_times_out_within_the_bound(s3_env, hanging, monkeypatch):
    """An endpoint that accepts and never answers: per-attempt read timeout (0.5 s here),
    2 attempts, then a clear StorageError; bound = attempts x timeout + backoff (<= 1 s)."""
    monkeypatch.setenv("THINKFAST_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("THINKFAST_S3_TIMEOUT_S", "0.5")
    start = time.monotonic()
    with pytest.raises(StorageError, match=rf"cannot write to s3://bkt/out: S3 endpoint {hanging.url} did not answer within 0.5 s"):
        fs.check_writable("s3://bkt/out", hanging.url)
    took = time.monotonic() - start
    assert len(hanging.requests) == 2 and took < 2 * 0.5 + 1 + 2, (took, hanging.requests)  # +2: a busy CI machine

    hanging.requests.clear()
    start = time.monotonic()
    with pytest.raises(Exception) as info:  # s3fs: botocore's ReadTimeoutError, untranslated
        fs.fsspec_fs("s3://bkt/out", hanging.url).info("bkt/out/x")
    assert "timeout" in str(info.value).lower()
    assert len(hanging.requests) == 2 and time.monotonic() - start < 2 * 0.5 + 1 + 2


def test_settings_are_read_and_checked():
    env = {"THINKFAST_S3_MAX_ATTEMPTS": "5", "THINKFAST_S3_TIMEOUT_S": "7.5", "THINKFAST_S3_CONNECT_TIMEOUT_S": "2"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        config = fs.botocore_config_kwargs()
        assert config == {"connect_timeout": 2.0, "read_timeout": 7.5,
                          "retries": {"total_max_attempts": 5, "mode": "standard"}}
        os.environ["THINKFAST_S3_MAX_ATTEMPTS"] = "0"
        with pytest.raises(StorageError, match="THINKFAST_S3_MAX_ATTEMPTS"):
            fs.s3_max_attempts()
        os.environ["THINKFAST_S3_TIMEOUT_S"] = "soon"
        with pytest.raises(StorageError, match="not a number"):
            fs.s3_timeout_s()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert fs.s3_max_attempts() == fs.DEFAULT_S3_MAX_ATTEMPTS  # defaults when unset (CI sets none)


# --------------------------------------------------------------------------- failures inside Ray


def test_storage_failure_is_found_through_rays_wrappers():
    import botocore.exceptions as bce
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from thinkfast.errors import CheckpointError
    from thinkfast_pipelines import console

    boto = bce.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bkt/idx/manifest.json")
    wrapped = RayTaskError("build_shard", "Traceback ...\nEndpointConnectionError: ...", boto).as_instanceof_cause()
    line = console.storage_failure(wrapped)
    assert line.startswith("storage failure: cannot reach the S3 endpoint") and "http://127.0.0.1:9/bkt/idx" in line

    arrow = OSError("When testing for existence of bucket 'bkt': AWS Error NETWORK_CONNECTION during HeadBucket "
                    "operation: curlCode: 7, Could not connect to server")
    line = console.storage_failure(ControllerError(arrow))
    assert "connection refused" in line and "bucket 'bkt'" in line and "\n" not in line
    line = console.storage_failure(WorkerGroupError("worker failed", {0: PermissionError(13, "denied", "/data/x")}))
    assert "access denied" in line
    # a remote traceback only as text: its last error line
    text = "Training failed:\nTraceback (most recent call last):\n  File x\nOSError: [Errno 28] No space left on device\n"
    assert "OSError: [Errno 28] No space left on device" in console.storage_failure(RuntimeError(text))
    # a thinkfast error written for a person wins; an ordinary bug is not a storage failure
    outer = RuntimeError("outer")
    outer.__cause__ = CheckpointError("m is not a model directory")
    outer.__cause__.__cause__ = FileNotFoundError("m/config.json")
    assert console.storage_failure(outer) is None
    assert console.storage_failure(ValueError("bad shape")) is None
    assert console.storage_failure(StorageError("cannot write to s3://b/x: access denied")) == \
        "cannot write to s3://b/x: access denied"


def test_cli_turns_a_wrapped_storage_failure_into_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    """A write that fails mid-run inside Ray: the CLI's failure path, not the pre-flight."""
    import botocore.exceptions as bce
    from ray.exceptions import RayTaskError

    from thinkfast_pipelines import cli, console, index

    def failing_run(args):
        boto = bce.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bkt/idx/shard-00000.faiss")
        raise RayTaskError("build_shard", "remote traceback", boto).as_instanceof_cause()

    monkeypatch.setattr(index, "run", failing_run)
    log = tmp_path / "index.log"
    try:
        code = cli.main(["--log-file", str(log), "index", "--embeddings", "e", "--out", "s3://bkt/idx"])
    finally:
        console.setup(False, None)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if " logs in " not in line]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("thinkfast index: error: storage failure: cannot reach the S3 endpoint")
    # the URL of the object that failed is named (s3fs and botocore put it in their messages)
    assert "http://127.0.0.1:9/bkt/idx/shard-00000.faiss" in err[0]
    assert "Traceback" in log.read_text()


# --------------------------------------------------------------------------- the CLI, as an operator runs it


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """A 16-row corpus, a tiny untrained fast model and 40 fast embeddings, all local."""
    import numpy as np
    import torch

    from thinkfast.data.synth import SynthConfig, write_synth
    from thinkfast.data.tokenizer import WordTokenizer
    from thinkfast.models.fast import FastModel
    from thinkfast.store import fast_dir, write_embeddings

    root = tmp_path_factory.mktemp("storage_faults")
    corpus = str(root / "corpus")
    write_synth(corpus, SynthConfig(num_images=16, captions_per_image=1, image_size=32, image_format="png", seed=1),
                workers=1)
    torch.manual_seed(0)
    FastModel.from_preset("tiny", tokenizer=WordTokenizer.build(["a red circle"])).save_pretrained(str(root / "fast"))
    emb = str(root / "emb")
    rng = np.random.default_rng(0)
    write_embeddings(fast_dir(emb), [f"k{i}" for i in range(40)], rng.standard_normal((40, 8)).astype("float32"),
                     part="part-0")
    return {"corpus": corpus, "fast": str(root / "fast"), "emb": emb, "root": str(root)}


def _thinkfast(args: list[str], env: dict[str, str], cwd: str) -> tuple[subprocess.CompletedProcess, float]:
    full = {**os.environ, **env, "THINKFAST_S3_MAX_ATTEMPTS": "2", "THINKFAST_S3_TIMEOUT_S": "2",
            "THINKFAST_S3_CONNECT_TIMEOUT_S": "2", "XDG_STATE_HOME": os.path.join(cwd, "state")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "thinkfast_pipelines.cli", *args], env=full, cwd=cwd,
                          capture_output=True, text=True, timeout=CLI_BOUND_S + 30)
    return proc, time.monotonic() - start


def _assert_one_line(proc: subprocess.CompletedProcess, took: float, command: str, uri: str, cause: str) -> None:
    lines = proc.stderr.strip().splitlines()
    failure = [line for line in lines if " logs in " not in line]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) <= 2 and len(failure) == 1, proc.stderr[-3000:]
    assert failure[0].startswith(f"thinkfast {command}: error: cannot write to {uri}: "), failure[0]
    assert cause in failure[0], failure[0]
    assert "Traceback" not in proc.stderr and "testing" not in failure[0]
    assert took < CLI_BOUND_S, took


COMMANDS = {
    "index": lambda t, out: ["index", "--embeddings", t["emb"], "--out", out, "--local"],
    "embed": lambda t, out: ["embed", "--corpus", t["corpus"], "--fast", t["fast"], "--out", out, "--no-progress"],
    "train-fast": lambda t, out: ["train-fast", "--corpus", t["corpus"], "--out", out, "--preset", "tiny",
                                  "--epochs", "1", "--workers", "1", "--batch-size", "4"],
}


# each fault against each command would be 6 interpreter starts (~5-15 s each with torch);
# the pre-flight behind them is one function, tested above for both faults, so each command
# meets one fault here and index (the cheap one) both
@pytest.mark.parametrize("command", ["index", "train-fast"])
def test_cli_to_an_unreachable_endpoint_is_one_line_exit_2(command, tiny_inputs, s3_server, tmp_path):
    endpoint = _closed_endpoint()
    out = "s3://tf-faults/out"
    proc, took = _thinkfast(COMMANDS[command](tiny_inputs, out), {"AWS_ENDPOINT_URL": endpoint}, str(tmp_path))
    _assert_one_line(proc, took, command, out, f"cannot reach S3 endpoint {endpoint} (connection refused)")


@pytest.mark.parametrize("command", ["embed", "index"])
def test_cli_to_a_missing_bucket_is_one_line_exit_2(command, tiny_inputs, s3_server, tmp_path):
    out = "s3://tf-no-such-bucket/out"
    proc, took = _thinkfast(COMMANDS[command](tiny_inputs, out), {}, str(tmp_path))
    _assert_one_line(proc, took, command, out, "bucket 'tf-no-such-bucket' does not exist")


def test_ray_data_keeps_its_own_retries_for_throttling_only():
    """Ray Data retries matching pyarrow errors 10 x (backoff up to 32 s) on top of the
    client's attempts: a write to a refused port took 181 s to fail before this."""
    from ray.data import DataContext

    ctx = DataContext()
    assert "AWS Error NETWORK_CONNECTION" in ctx.retried_io_errors  # Ray's default
    previous = fs.bound_ray_data_retries(ctx)
    assert "AWS Error NETWORK_CONNECTION" in previous
    assert list(ctx.retried_io_errors) == ["AWS Error SLOW_DOWN"]
