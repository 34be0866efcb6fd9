"""Fault injection for the batch jobs (issue 20): what a killed or cut-off run leaves, and
that a re-run repairs it.

* embed SIGKILLed midway (a ``thinkfast embed`` subprocess, killed once its first output
  files exist), then re-run: every corpus key exactly once in ``fast/`` and the token
  store, vectors equal to the model's on the same pixels (an uninterrupted run's values,
  see ``tests/test_embed.py``);
* the S3 endpoint of embed's ``--out`` stopped midway (a private moto server, so the
  session's one is untouched): the run fails within a bounded time with one line and exit
  2; a fresh server (moto keeps its objects in memory only: a restart is an empty
  endpoint), the bucket made again and a re-run give exactly-once output;
* a Ray Train worker SIGKILLed after the first checkpoint: the run restarts from that
  checkpoint and finishes with the full step count.

The killed embed drivers join the session's Ray (``--address``), as a driver on a
cluster would; Ray reclaims a dead driver's actors and tasks itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

IMAGE_SIZE = 32
KILL_WAIT_S = 120.0  # the killed run must have written its first files by then
S3_FAIL_WITHIN_S = 60.0
RAY_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] ")  # endpoint gone -> the CLI has exited (attempts x timeouts + Ray's reporting)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    from thinkfast.data.synth import SynthConfig, write_synth

    out = str(tmp_path_factory.mktemp("fault_corpus") / "corpus")
    write_synth(out, SynthConfig(num_images=160, captions_per_image=1, image_size=IMAGE_SIZE, seed=11,
                                 image_format="png", shard_size=40), workers=1)
    return out


def _corpus_rows(corpus: str) -> list[dict]:
    files = sorted(os.path.join(corpus, f) for f in os.listdir(corpus) if f.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def _embed_cli(corpus: str, out: str, models, address: str, *extra: str) -> subprocess.Popen:
    """``thinkfast embed`` as its own process group (so the kill reaches only it)."""
    args = [sys.executable, "-m", "thinkfast_pipelines.cli", "embed", "--corpus", corpus, "--out", out,
            "--fast", models[0], "--slow", models[1], "--batch-size", "4", "--decode-batch-size", "4",
            "--rows-per-write", "8", "--no-progress", "--address", address, *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}: {err[-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def check_exactly_once(out_keys: list[str], token_keys: list[str], corpus_keys: list[str]) -> None:
    assert len(out_keys) == len(set(out_keys)), "fast/ holds a key twice"
    assert len(token_keys) == len(set(token_keys)), "the token store holds a key twice"
    assert sorted(out_keys) == sorted(token_keys) == sorted(corpus_keys)


def check_sample_vectors(fast_dir: str, rows: list[dict], keys: list[str], vectors: np.ndarray, n: int = 12) -> None:
    """A sample of the vectors equals the fast model on the same decoded pixels."""
    from thinkfast.data.media import load_pixels
    from thinkfast.data.schema import validate_corpus_schema
    from thinkfast.models.fast import FastModel

    columns = validate_corpus_schema(pa.Table.from_pylist(rows[:1]).schema)
    by_key = {r["key"]: r for r in rows}
    pick = np.random.default_rng(0).choice(len(keys), size=min(n, len(keys)), replace=False)
    pixels = torch.stack([load_pixels(by_key[keys[i]], columns, IMAGE_SIZE, 1) for i in pick])
    with torch.inference_mode():
        expected = FastModel.from_pretrained(fast_dir).eval().encode_image(pixels).numpy()
    np.testing.assert_allclose(vectors[pick], expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- embed SIGKILL


@pytest.mark.ray
def test_embed_sigkilled_midway_then_rerun_is_exactly_once(ray_session, models, corpus, tmp_path):
    from thinkfast.store import TokenStore, read_embeddings
    from thinkfast_pipelines.embed import EmbedConfig, embed

    rows = _corpus_rows(corpus)
    out = str(tmp_path / "emb")
    fast_out = os.path.join(out, "fast")
    address = ray_session.get_runtime_context().gcs_address
    started = time.monotonic()
    proc = _embed_cli(corpus, out, models, address)
    _wait_for(lambda: os.path.isdir(fast_out) and any(f.endswith(".parquet") for f in os.listdir(fast_out)),
              KILL_WAIT_S, proc, "the first fast/ file")
    _kill_group(proc)
    killed_after = time.monotonic() - started
    assert proc.returncode == -signal.SIGKILL
    partial = [f for f in os.listdir(fast_out) if f.endswith(".parquet")]
    # killed midway: some output, no manifest (an unfinished run says so)
    assert not os.path.exists(os.path.join(out, "manifest.json")), "the run finished before the kill"
    written = sum(pq.read_metadata(os.path.join(fast_out, f)).num_rows for f in partial)
    assert 0 < written < len(rows), written

    config = EmbedConfig(batch_size=4, decode_batch_size=4, rows_per_write=8, progress=False)
    manifest = embed(corpus, out, fast=models[0], slow=models[1], config=config)
    assert "fast" in manifest["replaced_previous"] and "tokens" in manifest["replaced_previous"]
    assert manifest["counts"] == {"in": len(rows), "embedded": len(rows), "rejected": 0, "rejected_by_reason": {},
                                  "skipped": 0}
    keys, vectors = read_embeddings(out)
    token_keys = list(TokenStore.open(out).keys())
    shard_keys = [k for f in sorted(os.listdir(os.path.join(out, "tokens"))) if f.endswith(".keys.parquet")
                  and f.startswith("shard-") for k in pq.read_table(os.path.join(out, "tokens", f)).column("key")
                  .to_pylist()]
    check_exactly_once(keys, token_keys, [r["key"] for r in rows])
    check_exactly_once(keys, shard_keys, [r["key"] for r in rows])
    check_sample_vectors(models[0], rows, keys, vectors)
    print(f"\nembed SIGKILL: killed after {killed_after:.1f} s with {written}/{len(rows)} rows in fast/")


# --------------------------------------------------------------------------- S3 endpoint stopped


def _moto(port: int):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.ray
def test_s3_endpoint_stopped_midway_fails_fast_then_rerun_is_exactly_once(ray_session, models, corpus, tmp_path):
    import boto3

    from thinkfast.store import TokenStore, read_embeddings
    from thinkfast_pipelines.embed import EmbedConfig, embed

    rows = _corpus_rows(corpus)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    bucket, out = "faults", "s3://faults/emb"
    server = _moto(port)
    try:
        client = boto3.client("s3", endpoint_url=url)
        client.create_bucket(Bucket=bucket)

        def fast_objects() -> int:
            return client.list_objects_v2(Bucket=bucket, Prefix="emb/fast/").get("KeyCount", 0)

        proc = _embed_cli(corpus, out, models, ray_session.get_runtime_context().gcs_address, "--s3-endpoint", url)
        try:
            _wait_for(lambda: fast_objects() > 0, KILL_WAIT_S, proc, "the first fast/ object on S3")
            server.stop()
            stopped = time.monotonic()
            _, err = proc.communicate(timeout=S3_FAIL_WITHIN_S)
            failed_after = time.monotonic() - stopped
        finally:
            if proc.poll() is None:
                _kill_group(proc)
        # the failure is one line; what else a driver prints is the CLI's "logs in" line
        # and Ray's own C++ log lines ("[2026-... E 123 123] core_worker.cc: ..."), never a traceback
        lines = [line for line in err.strip().splitlines() if " logs in " not in line and not RAY_LOG_LINE.match(line)]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, (proc.returncode, lines)
        assert lines[0].startswith("thinkfast embed: error: ") and f"127.0.0.1:{port}" in lines[0], lines[0]
        assert failed_after < S3_FAIL_WITHIN_S

        # moto keeps objects in memory only: the restarted endpoint is empty, as a
        # replaced bucket would be; make the bucket again and re-run
        server = _moto(port)
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
        config = EmbedConfig(batch_size=4, decode_batch_size=4, rows_per_write=8, progress=False, s3_endpoint=url)
        manifest = embed(corpus, out, fast=models[0], slow=models[1], config=config)
        assert manifest["counts"]["embedded"] == len(rows) and manifest["counts"]["rejected"] == 0
        keys, vectors = read_embeddings(out, s3_endpoint=url)
        check_exactly_once(keys, list(TokenStore.open(out, s3_endpoint=url).keys()), [r["key"] for r in rows])
        check_sample_vectors(models[0], rows, keys, vectors)
        print(f"\nS3 stopped midway: the CLI exited 2 after {failed_after:.1f} s: {lines[0]}")
    finally:
        server.stop()


def test_unwritable_s3_out_fails_before_ray_and_clean_up(s3_server, models, corpus, monkeypatch):
    """The storage pre-flight: a missing bucket is one line before any Ray work."""
    import thinkfast_pipelines.embed.job as job
    from thinkfast.errors import StorageError
    from thinkfast_pipelines.embed import EmbedConfig, embed

    def forbidden(*args, **kwargs):
        raise AssertionError("embed reached Ray / the clean-up before checking --out")

    monkeypatch.setattr("thinkfast_pipelines.ray_utils.init_ray", forbidden)
    monkeypatch.setattr(job, "clear_outputs", forbidden)
    started = time.monotonic()
    with pytest.raises(StorageError, match="no-such-bucket") as err:
        embed(corpus, "s3://no-such-bucket/emb", fast=models[0], config=EmbedConfig(progress=False))
    assert "\n" not in str(err.value) and "does not exist" in str(err.value)
    assert time.monotonic() - started < 30


# --------------------------------------------------------------------------- Train worker SIGKILL


def _train_worker_pids(ray) -> list[int]:
    """Pids of the live Ray Train worker actors (the GCS actor table: no dashboard needed)."""
    from ray._private import state

    table = state.actors()
    return [int(a["Pid"]) for a in table.values()
            if a.get("ActorClassName") == "RayTrainWorker" and a.get("State") == "ALIVE" and a.get("Pid")]


@pytest.mark.ray
def test_train_worker_sigkilled_resumes_from_checkpoint(ray_session, tmp_path):
    from thinkfast.data.synth import SynthConfig, write_synth
    from thinkfast_pipelines.train import train_fast

    corpus = str(tmp_path / "corpus")
    write_synth(corpus, SynthConfig(num_images=64, captions_per_image=2, image_size=IMAGE_SIZE, seed=4,
                                    image_format="png", val_fraction=0.15, test_fraction=0.1), workers=1)
    storage = str(tmp_path / "ckpt")
    epochs = 10
    result: dict = {}

    def train() -> None:
        try:
            result["value"] = train_fast(corpus, str(tmp_path / "model"), storage=storage, epochs=epochs,
                                         preset="tiny", batch_size=8, workers=1, lr=3e-3, warmup_steps=1,
                                         val_images=16, val_pool=8, seed=0, max_failures=2)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            result["error"] = exc

    def registered_steps() -> list[int]:
        """Steps of the checkpoints Ray Train's controller has registered (its snapshot
        file). A checkpoint directory a worker wrote but the controller had not yet taken
        is not one to resume from: a kill then restarts from the previous one (measured:
        from step 0, with the unregistered directory left behind)."""
        for root, _, files in os.walk(storage):
            if "checkpoint_manager_snapshot.json" in files:
                try:
                    with open(os.path.join(root, "checkpoint_manager_snapshot.json")) as f:
                        snapshot = json.load(f)
                except (OSError, ValueError):  # being rewritten
                    return []
                return [int(r["metrics"]["step"]) for r in snapshot.get("checkpoint_results", [])]
        return []

    thread = threading.Thread(target=train, daemon=True)
    started = time.monotonic()
    thread.start()
    _wait_for(lambda: registered_steps() or "error" in result or "value" in result, 240,
              what="the first registered checkpoint")
    assert "error" not in result and "value" not in result, result
    pids = _train_worker_pids(ray_session)
    assert len(pids) == 1, pids
    seen = registered_steps()
    os.kill(pids[0], signal.SIGKILL)
    killed_after = registered_steps() or seen  # [] only while the controller rewrites the file
    thread.join(timeout=300)
    assert not thread.is_alive(), "training did not finish after the kill"
    if "error" in result:
        raise result["error"]
    run = result["value"]
    steps_per_epoch = run.history[0]["step"]
    assert killed_after and max(killed_after) < epochs * steps_per_epoch, "the run had finished before the kill"
    # one restart, from a registered checkpoint (an epoch end at or after the one seen
    # before the kill), and the full length
    assert len(run.starts) == 2 and run.starts[0] == 0, run.starts
    assert run.starts[1] >= max(killed_after) and run.starts[1] % steps_per_epoch == 0, (run.starts, killed_after)
    assert run.steps == epochs * steps_per_epoch
    assert [h["epoch"] for h in run.history] == list(range(1, epochs + 1))
    print(f"\ntrain SIGKILL: worker killed after the checkpoint of step {max(killed_after)}; restarted from step "
          f"{run.starts[1]}; "
          f"{time.monotonic() - started:.1f} s in all")
