"""A secret never reaches a log, Ray's included. Ray writes every runtime-env variable
into ``runtime_env_agent.log``; the CLI used to forward ``AWS_SECRET_ACCESS_KEY`` that way
(40 copies in one S3 run). Now workers inherit it from the local raylet, and nothing
thinkfast passes to Ray carries it."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from conftest import SECRET_MARKER


def _files_with(marker: str, folder: str) -> list[str]:
    hits = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    if marker.encode() in f.read():
                        hits.append(path)
            except OSError:
                continue
    return hits


@pytest.mark.ray
def test_an_s3_run_leaves_no_secret_in_any_log(ray_session, s3_bucket, tmp_path):
    import ray
    import ray.data

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET_MARKER
    src, dst = f"{s3_bucket}/in", f"{s3_bucket}/out"
    table = pa.table({"key": [f"k{i}" for i in range(64)], "x": np.arange(64, dtype=np.float32)})
    ray.data.from_arrow(table).write_parquet(src)  # workers reach S3 with inherited credentials
    ds = ray.data.read_parquet(src).map_batches(lambda b: {"key": b["key"], "y": b["x"] * 2}, batch_format="numpy")
    ds.write_parquet(dst)
    assert ray.data.read_parquet(dst).count() == 64

    from ray._private import worker

    session_dir = worker._global_node.get_session_dir_path()
    assert os.path.isdir(os.path.join(session_dir, "logs"))
    assert _files_with(SECRET_MARKER, session_dir) == []
