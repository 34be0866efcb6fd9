"""Batch-job faults, the longer variant of ``tests/test_batch_faults.py``: a ``thinkfast
embed`` CLI run SIGKILLed at several points of its output, each followed by a re-run into
the same ``--out``, on a bigger corpus; every re-run is checked for exactly-once output
(every corpus key once in ``fast/`` and the token store, no other key) and a sample of its
vectors against the fast model on the same pixels.

Each killed run is its own process group joined to one local Ray that this script starts
(as a driver on a cluster would be), so a kill reaches the driver only; Ray reclaims the
dead driver's actors and tasks. Reported per kill point: seconds from start to the kill,
rows already in ``fast/`` at the kill, the re-run's seconds, and whether it was exactly
once.

    python benchmarks/batch_faults.py                 # 1200 images, kills at 25/50/75 % of fast/
    python benchmarks/batch_faults.py --quick         # 320 images, one kill at 50 %
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32


def _models(root: str) -> tuple[str, str]:
    import torch

    from thinkfast.data.tokenizer import WordTokenizer
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel

    words = ["a", "red", "blue", "green", "circle", "square", "triangle", "left", "of", "above", "the"]
    tokenizer = WordTokenizer.build([" ".join(words)])
    torch.manual_seed(0)
    fast, slow = os.path.join(root, "fast"), os.path.join(root, "slow")
    FastModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(fast)
    SlowModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(slow)
    return fast, slow


def _fast_rows(out: str) -> int:
    import pyarrow.parquet as pq

    d = os.path.join(out, "fast")
    if not os.path.isdir(d):
        return 0
    total = 0
    for f in os.listdir(d):
        if f.endswith(".parquet"):
            try:
                total += pq.read_metadata(os.path.join(d, f)).num_rows
            except Exception:  # noqa: BLE001 - a file being written
                pass
    return total


def _check(out: str, corpus_rows: list[dict], fast_dir: str) -> dict:
    import numpy as np
    import pyarrow as pa
    import torch

    from thinkfast.data.media import load_pixels
    from thinkfast.data.schema import validate_corpus_schema
    from thinkfast.models.fast import FastModel
    from thinkfast.store import TokenStore, read_embeddings

    keys, vectors = read_embeddings(out)
    token_keys = list(TokenStore.open(out).keys())
    want = sorted(r["key"] for r in corpus_rows)
    exactly_once = (len(keys) == len(set(keys)) and len(token_keys) == len(set(token_keys))
                    and sorted(keys) == sorted(token_keys) == want)
    columns = validate_corpus_schema(pa.Table.from_pylist(corpus_rows[:1]).schema)
    by_key = {r["key"]: r for r in corpus_rows}
    pick = np.random.default_rng(0).choice(len(keys), size=min(32, len(keys)), replace=False)
    pixels = torch.stack([load_pixels(by_key[keys[i]], columns, IMAGE_SIZE, 1) for i in pick])
    with torch.inference_mode():
        expected = FastModel.from_pretrained(fast_dir).eval().encode_image(pixels).numpy()
    max_err = float(np.abs(vectors[pick] - expected).max())
    return {"exactly_once": bool(exactly_once), "rows": len(keys), "sample_max_abs_err": max_err}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--kill-at", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                        help="fractions of the corpus in fast/ at which to SIGKILL")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "batch_faults.json"))
    args = parser.parse_args()
    if args.quick:
        args.images, args.kill_at = 320, [0.5]

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from thinkfast.data.synth import SynthConfig, write_synth
    from thinkfast_pipelines.embed import EmbedConfig, embed
    from thinkfast_pipelines.ray_utils import init_ray

    work = tempfile.mkdtemp(prefix="batch-faults-")
    corpus = os.path.join(work, "corpus")
    write_synth(corpus, SynthConfig(num_images=args.images, captions_per_image=1, image_size=IMAGE_SIZE, seed=11,
                                    image_format="png", shard_size=200), workers=1)
    files = sorted(os.path.join(corpus, f) for f in os.listdir(corpus) if f.endswith(".parquet"))
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
    fast_dir, slow_dir = _models(work)
    init_ray(num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024 * 1024)
    address = ray.get_runtime_context().gcs_address
    config = EmbedConfig(batch_size=8, decode_batch_size=8, rows_per_write=32, progress=False)
    results = []
    for fraction in args.kill_at:
        out = os.path.join(work, f"emb-{int(fraction * 100)}")
        cmd = [sys.executable, "-m", "thinkfast_pipelines.cli", "embed", "--corpus", corpus, "--out", out,
               "--fast", fast_dir, "--slow", slow_dir, "--batch-size", "8", "--decode-batch-size", "8",
               "--rows-per-write", "32", "--no-progress", "--address", address]
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        target = int(fraction * len(rows))
        while proc.poll() is None and _fast_rows(out) < target:
            time.sleep(0.05)
        finished_first = proc.poll() is not None
        if not finished_first:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_s = time.monotonic() - started
        at_kill = _fast_rows(out)
        t0 = time.monotonic()
        embed(corpus, out, fast=fast_dir, slow=slow_dir, config=config)
        rerun_s = time.monotonic() - t0
        check = _check(out, rows, fast_dir)
        results.append({"kill_at_fraction": fraction, "killed_after_s": round(killed_s, 2),
                        "rows_in_fast_at_kill": at_kill, "run_finished_before_kill": finished_first,
                        "rerun_s": round(rerun_s, 2), **check})
        print(json.dumps(results[-1]))
    ray.shutdown()
    report = {"images": len(rows), "cpus": os.cpu_count(), "results": results,
              "all_exactly_once": all(r["exactly_once"] for r in results)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if report["all_exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
