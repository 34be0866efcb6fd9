"""What running through a Ray cluster costs: start, per-job overhead, embed wall time.

On this machine, against a loopback two-node cluster (the same harness as
tests/test_cluster_multinode.py) and a moto S3 server:

1. cluster start (head up, worker joined) and stop;
2. the shipped working_dir: files and bytes after excludes;
3. a no-op job (`thinkfast submit -- synth --help`): the fixed cost of one job (upload,
   runtime env, driver start) as a user sees it;
4. `thinkfast embed` of the same S3 corpus run locally (its own `ray.init`) vs submitted
   to the cluster with `thinkfast submit`.

Prints a table and writes benchmarks/results/cluster_bench[_quick].json, with the load
average, since on 2 shared cores everything here moves with it.

    python benchmarks/cluster_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402
from tests.test_cluster_multinode import local_cluster  # noqa: E402

logger = logging.getLogger(__name__)
RESULTS = REPO / "benchmarks" / "results"


def _cli(*args: str, timeout: float = 900) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``thinkfast ARGS`` in a fresh process; (seconds, result). Fails loudly."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "thinkfast_pipelines.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"thinkfast {' '.join(args[:3])}... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds, proc


def _package_size() -> tuple[int, int]:
    """(files, bytes) of the zip Ray's job client builds from this checkout."""
    import zipfile

    from thinkfast_pipelines.cluster.submit import build_runtime_env
    from ray._private.runtime_env.packaging import create_package

    env = build_runtime_env(str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "pkg.zip"
        create_package(env["working_dir"], target, include_gitignore=True, excludes=env["excludes"])
        return len(zipfile.ZipFile(target).namelist()), target.stat().st_size


def _models(bucket: str, corpus: str) -> None:
    from thinkfast import FastModel, SlowModel
    from thinkfast.data.reader import read_table
    from thinkfast.data.tokenizer import WordTokenizer

    captions = [c for row in read_table(corpus, columns=["captions"]).column("captions").to_pylist() for c in row]
    tokenizer = WordTokenizer.build(captions)
    FastModel.from_preset("tiny", tokenizer=tokenizer, load_pretrained=False).save_pretrained(f"{bucket}/models/fast")
    SlowModel.from_preset("tiny", tokenizer=tokenizer, load_pretrained=False).save_pretrained(f"{bucket}/models/slow")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="96 images instead of 480")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    images = 96 if args.quick else 480

    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    s3.start()
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
    )
    rows: list[tuple[str, float, str]] = []
    try:
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
        bucket, corpus = "s3://bench", "s3://bench/corpus"
        _cli("synth", "--out", corpus, "--images", str(images), "--image-size", "64", "--seed", "0", "--workers", "2")
        _models(bucket, corpus)
        files, size = _package_size()
        rows.append(("working_dir shipped", size / 1e6, f"MB in {files} files"))
        embed = ["embed", "--corpus", corpus, "--fast", f"{bucket}/models/fast", "--slow", f"{bucket}/models/slow",
                 "--actors", "1", "--cpus-per-actor", "1", "--batch-size", "32", "--no-progress"]  # fmt: skip
        local_s, _ = _cli(*embed, "--out", f"{bucket}/emb-local")
        rows.append(("embed, local ray.init", local_s, f"s for {images} images ({images / local_s:.1f} img/s)"))

        start = time.perf_counter()
        with local_cluster() as cluster:
            rows.append(("cluster start (2 nodes)", time.perf_counter() - start, "s"))
            noop_s, _ = _cli("submit", "--address", cluster.dashboard_url, "--", "synth", "--help")
            rows.append(("no-op job via submit", noop_s, "s (upload + runtime env + driver start)"))
            job_s, _ = _cli("submit", "--address", cluster.dashboard_url, "--", *embed, "--out", f"{bucket}/emb-cluster")
            rows.append(("embed, submitted to cluster", job_s, f"s for {images} images ({images / job_s:.1f} img/s)"))
            stop_start = time.perf_counter()
        rows.append(("cluster stop", time.perf_counter() - stop_start, "s"))
    finally:
        s3.stop()

    load = os.getloadavg()
    print(f"\ncluster_bench ({'quick' if args.quick else 'full'}, {os.cpu_count()} cores, load avg {load[0]:.1f})")
    print(f"{'measure':<30} {'value':>9}  unit")
    for name, value, unit in rows:
        print(f"{name:<30} {value:>9.2f}  {unit}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"cluster_bench{'_quick' if args.quick else ''}.json"
    record = {
        "images": images,
        "cpu_count": os.cpu_count(),
        "load_average_1m": load[0],
        "rows": [{"measure": n, "value": round(v, 3), "unit": u} for n, v, u in rows],
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
