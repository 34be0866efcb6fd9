"""Incremental index benchmark: seconds per 10k appended vectors, recall after many
appends against a rebuild, and the drift verdict (issue 17, "A corpus that grows").

Clustered 256-d vectors (``thinkfast.index.synthetic``). The index is built on the first
``n - appends * batch`` vectors with the factory ``thinkfast index`` would choose for
``n``, then ``appends`` batches of ``batch`` vectors from the same distribution are
appended one by one with ``ShardedIndex.add`` (a new shard each, no retraining), each
timed. Recall@10 against exact search over all ``n`` is measured for the appended index
and for a rebuild from scratch (trained on all ``n``), both at the build-tuned nprobe.
Finally one batch from *new* clusters is appended and the drift report read: the
residual ratio of ``thinkfast.index.drift`` should stay near 1 for the same-distribution
appends and exceed the limit after the shifted one.

    python benchmarks/incremental_index.py --quick          # 200k vectors, 10 x 10k appends
    nice -n 10 python benchmarks/incremental_index.py --n 1000000 --appends 20

Writes ``benchmarks/results/incremental_index[_quick].json`` with the load average at
start and end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("incremental_index")


def recall_at(found: np.ndarray, truth: np.ndarray, keys: np.ndarray) -> float:
    """Mean |found ∩ exact top-k| / k over queries (keys compared as strings)."""
    k = truth.shape[1]
    hits = [len(set(f.tolist()) & set(keys[t].tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k)


def run(n: int, dim: int, batch: int, appends: int, n_queries: int, seed: int, work: Path,
        factory: str | None = None) -> dict[str, Any]:
    import faiss

    from thinkfast.index.factory import choose_factory
    from thinkfast.index.sharded import ShardedIndex
    from thinkfast.index.synthetic import clustered_vectors, noisy_queries

    base_n = n - appends * batch
    if base_n < batch:
        raise SystemExit(f"--n {n} is too small for {appends} appends of {batch}")
    t0 = time.perf_counter()
    x, _ = clustered_vectors(n, dim, clusters=max(100, n // 2000), seed=seed)
    keys = np.asarray([f"v{i:08d}" for i in range(n)], dtype=object)
    queries = noisy_queries(x, n_queries, seed=seed + 1)
    exact = faiss.IndexFlatIP(dim)
    exact.add(x)
    _, truth = exact.search(queries, 10)
    setup_s = time.perf_counter() - t0
    factory = factory or choose_factory(n, dim)

    t0 = time.perf_counter()
    index = ShardedIndex.build(list(keys[:base_n]), x[:base_n], str(work / "appended"), factory=factory, seed=seed)
    build_s = time.perf_counter() - t0
    per_append = []
    for i in range(appends):
        lo = base_n + i * batch
        t0 = time.perf_counter()
        index.add(list(keys[lo : lo + batch]), x[lo : lo + batch])
        per_append.append(time.perf_counter() - t0)
    drift_same = index.drift().to_json()
    nprobe = index.manifest.search_defaults.get("nprobe")
    found, _ = index.search(queries, 10)
    recall_appended = recall_at(found, truth, keys)
    t0 = time.perf_counter()
    found_q = index.search(queries, 10)
    qps_appended = n_queries / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    rebuilt = ShardedIndex.build(list(keys), x, str(work / "rebuilt"), factory=factory, seed=seed)
    rebuild_s = time.perf_counter() - t0
    found, _ = rebuilt.search(queries, 10, nprobe=nprobe)
    recall_rebuilt = recall_at(found, truth, keys)
    del found_q

    shifted, _ = clustered_vectors(batch, dim, clusters=10, spread=0.9, seed=seed + 99)
    index.add([f"s{i:08d}" for i in range(batch)], shifted)
    drift_shifted = index.drift().to_json()
    per_10k = [t * 10_000 / batch for t in per_append]
    return {
        "n": n, "dim": dim, "factory": factory, "base_n": base_n, "batch": batch, "appends": appends,
        "nprobe": nprobe, "setup_s": round(setup_s, 1), "build_s": round(build_s, 1),
        "append_s_per_10k_mean": round(float(np.mean(per_10k)), 3),
        "append_s_per_10k_max": round(float(np.max(per_10k)), 3),
        "append_s_per_10k_first_last": [round(per_10k[0], 3), round(per_10k[-1], 3)],
        "rebuild_s": round(rebuild_s, 1), "recall10_appended": round(recall_appended, 4),
        "recall10_rebuilt": round(recall_rebuilt, 4), "qps_appended": round(qps_appended, 1),
        "drift_after_same_distribution": drift_same, "drift_after_shifted_batch": drift_shifted,
        "shards_after_appends": index.num_shards,
    }


def table(r: dict[str, Any]) -> str:
    rows = [
        ("vectors (base + appended)", f"{r['base_n']:,} + {r['appends']} x {r['batch']:,}"),
        ("factory / nprobe", f"{r['factory']} / {r['nprobe']}"),
        ("build of the base (s)", r["build_s"]),
        ("append, s per 10k (mean / max)", f"{r['append_s_per_10k_mean']} / {r['append_s_per_10k_max']}"),
        ("rebuild of all n (s)", r["rebuild_s"]),
        ("recall@10 after appends / rebuilt", f"{r['recall10_appended']} / {r['recall10_rebuilt']}"),
        ("residual ratio, same distribution", r["drift_after_same_distribution"].get("residual_ratio")),
        ("residual ratio, + one shifted batch", r["drift_after_shifted_batch"].get("residual_ratio")),
        ("rebuild due (same / shifted)", f"{r['drift_after_same_distribution'].get('rebuild_due')} / "
                                         f"{r['drift_after_shifted_batch'].get('rebuild_due')}"),
    ]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"| {a:<{width}} | {b} |" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the end (base + appended)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=10_000, help="vectors per append")
    parser.add_argument("--appends", type=int, default=20)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--factory", default=None, help="FAISS factory (default: what thinkfast index picks for --n)")
    parser.add_argument("--quick", action="store_true", help="200k vectors, 10 appends")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.n, args.appends = 200_000, 10
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="incremental-index-"))
    try:
        result = run(args.n, args.dim, args.batch, args.appends, args.queries, args.seed, work, args.factory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(load_average_start=[round(v, 2) for v in load_start],
                  load_average_end=[round(v, 2) for v in os.getloadavg()],
                  machine=f"{platform.machine()}, {os.cpu_count()} cores", quick=args.quick)
    print(table(result))
    out = REPO / "benchmarks" / "results" / ("incremental_index_quick.json" if args.quick else "incremental_index.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
