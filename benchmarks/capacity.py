"""Capacity: memory, disk, shards and nodes for 10^6 / 10^8 / 10^9 items, from measured costs.

Bytes per item are exact arithmetic over each preset's shapes (the FAISS code size of the
factory ``thinkfast index`` picks, the fast embedding Parquet, the token store record of
each token format) and are checked against the index sizes ``benchmarks/index_bench.py``
measured. Time per query is measured here, on this machine, per preset:

* query encoding: ``encode_text`` of one long caption (``benchmarks/model_cost.py``);
* stage 1: FAISS scan cost per stored vector (Flat / IVF lists) and per PQ code (IVF-PQ),
  from searches over 100k random vectors of the preset's width (1 thread: a retriever
  replica's own core);
* stage 2: slow re-ranking CPU seconds per candidate at K = 10 and 50.

A query's CPU cost is then ``encode + scanned vectors x scan cost + K x slow cost``, with
IVF scanning ``nprobe / nlist`` of the items (``nprobe`` fixed by ``--nprobe``: the build
tunes it for recall, which this table cannot know). Nodes for a target QPS divide the CPU
seconds per second it needs by ``--node-cores x --utilization``; nodes for memory hold the
index shards (``--shard-memory-gb`` each, ``--node-memory-gb`` a node, the token store on
local disk or S3, not RAM). Weights are random: cost does not depend on their values.

    python benchmarks/capacity.py                # tiny + small, full repeats
    python benchmarks/capacity.py --quick        # fewer repeats (a minute or two)

Prints the tables, writes ``benchmarks/results/capacity.json`` with the load average at
start and end (a run started at load >= 2 is flagged).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for path in (str(REPO), str(REPO / "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

RESULTS = REPO / "benchmarks" / "results"
SIZES = (10**6, 10**8, 10**9)
TOKEN_FORMATS = ("float16", "int8")
ID_BYTES = 8  # faiss IVF lists store an int64 id per vector
KEY_BYTES = 24  # a key string in Parquet (embeddings / token key table), typical


def index_bytes_per_item(factory: str, dim: int) -> float:
    """Stored bytes of one vector in a FAISS index built from ``factory`` (codes + ids)."""
    if factory == "Flat":
        return 4.0 * dim
    if factory.endswith(",Flat"):
        return 4.0 * dim + ID_BYTES
    if ",PQ" in factory:
        m = int(factory.split(",PQ")[1].split("x")[0])
        return float(m + ID_BYTES)
    raise ValueError(f"no size rule for factory {factory!r}")


def coarse_bytes(factory: str, dim: int) -> float:
    """Centroids (and PQ codebooks): a fixed cost per index, not per item."""
    if not factory.startswith("IVF"):
        return 0.0
    nlist = int(factory[3:].split(",")[0].split("_")[0])
    extra = 256 * dim * 4 if ",PQ" in factory else 0
    return float(nlist * dim * 4 + extra)


def check_against_index_bench() -> list[dict[str, Any]]:
    """Formula vs the sizes index_bench.py measured (its rows at d = 256)."""
    path = RESULTS / "index_bench.json"
    if not path.exists():
        return []
    rows = []
    for r in json.loads(path.read_text()).get("records", []):
        if r.get("shards") != 1 or "index_mb" not in r:
            continue
        factory = r["factory"]
        try:
            formula = index_bytes_per_item(factory, r["dim"]) * r["n"] + coarse_bytes(factory, r["dim"])
        except ValueError:
            continue
        measured = r["index_mb"] * 2**20
        rows.append({"n": r["n"], "factory": factory, "formula_mb": formula / 2**20, "measured_mb": r["index_mb"],
                     "ratio": measured / formula})
    return rows


def measure_scan(dim: int, n: int = 100_000, repeats: int = 5) -> dict[str, float]:
    """Seconds per stored vector scanned (Flat) and per PQ code scanned (IVF-PQ), 1 thread."""
    import faiss

    from thinkfast.index.factory import pq_subquantizers

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:64] + 0.01
    flat = faiss.IndexFlatIP(dim)
    flat.add(x)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        flat.search(q, 10)
        best = min(best, time.perf_counter() - t)
    flat_s = best / len(q) / n
    nlist, nprobe = 256, 32
    m = pq_subquantizers(dim)
    ivfpq = faiss.index_factory(dim, f"IVF{nlist},PQ{m}x8", faiss.METRIC_INNER_PRODUCT)
    ivfpq.train(x[: 256 * 64])
    ivfpq.add(x)
    ivfpq.nprobe = nprobe
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        ivfpq.search(q, 10)
        best = min(best, time.perf_counter() - t)
    scanned = n * nprobe / nlist
    return {"flat_s_per_vector": flat_s, "pq_s_per_code": best / len(q) / scanned, "scan_n": n, "pq_m": m}


def slow_shape(preset: str) -> tuple[int, int, int]:
    """(fast embed dim, T, D) of a preset at its own image size."""
    from thinkfast.models.config import fast_preset, slow_preset
    from thinkfast.models.vision import feature_map_side

    fast, slow = fast_preset(preset), slow_preset(preset)
    t = sum(feature_map_side(slow.image_size, s) ** 2 for s in slow.levels)
    return fast.embed_dim, t, slow.width


def plan(preset: str, n: int, token_format: str, costs: dict[str, Any] | None, args: argparse.Namespace,
         rerank: int) -> dict[str, Any]:
    from thinkfast.index.factory import choose_factory, default_nlist
    from thinkfast.store.tokens import TokenShape

    dim, t, d = slow_shape(preset)
    factory = choose_factory(n, dim)
    index_b = index_bytes_per_item(factory, dim) * n + coarse_bytes(factory, dim)
    shard_budget = args.shard_memory_gb * 2**30
    shards = max(1, math.ceil(index_b / shard_budget))
    token_b = (TokenShape(t, d, token_format).record_bytes + KEY_BYTES) * n
    emb_b = (4 * dim + KEY_BYTES) * n
    row: dict[str, Any] = {
        "preset": preset, "items": n, "token_format": token_format, "factory": factory,
        "index_gb": index_b / 2**30, "shards": shards, "token_store_gb": token_b / 2**30,
        "embeddings_gb": emb_b / 2**30, "disk_gb": (index_b + token_b + emb_b) / 2**30,
        "memory_nodes": math.ceil(shards * args.shard_memory_gb / args.node_memory_gb) if shards > 1 else 1,
        "rerank": rerank,
    }
    if costs is None:
        return row
    if factory == "Flat" or factory.endswith(",Flat"):
        frac = 1.0 if factory == "Flat" else min(1.0, args.nprobe / default_nlist(n))
        search_s = n * frac * costs["flat_s_per_vector"] * (dim / costs["scan_dim"])
    else:
        frac = min(1.0, args.nprobe / default_nlist(n))
        search_s = n * frac * costs["pq_s_per_code"] * (dim / costs["scan_dim"])
    slow_s = rerank * costs["slow_cpu_s_per_pair"].get(str(rerank), min(costs["slow_cpu_s_per_pair"].values()))
    per_query = costs["encode_text_s"] + search_s + slow_s
    row.update({
        "cpu_ms_per_query": per_query * 1e3, "encode_ms": costs["encode_text_s"] * 1e3,
        "search_ms": search_s * 1e3, "rerank_ms": slow_s * 1e3,
        "qps_per_node": args.node_cores * args.utilization / per_query,
    })
    for qps in args.target_qps:
        row[f"nodes_for_{qps}_qps"] = max(row["memory_nodes"], math.ceil(qps * per_query /
                                                                        (args.node_cores * args.utilization)))
    return row


def measure_preset(preset: str, repeats: int) -> dict[str, Any]:
    import torch

    from model_cost import measure  # noqa: E402 - benchmarks/ is a folder of scripts

    torch.set_num_threads(1)  # a replica's core: the table scales per core
    m = measure(preset, 20_000, [10, 50], repeats, batch=8)
    return {"encode_text_s": m["fast_encode_text_s_per_query"],
            "slow_cpu_s_per_pair": {str(r["K"]): r["cpu_s_per_pair"] for r in m["slow_score"]},
            "slow_wall_s_per_pair": {str(r["K"]): r["s_per_pair"] for r in m["slow_score"]},
            "embed_dim": m["embed_dim"], "T": m["visual_tokens_T"], "D": m["token_width_D"]}


def print_tables(rows: list[dict[str, Any]], targets: list[int]) -> None:
    print(f"{'preset':<7} {'items':>6} {'tokens':<8} {'factory':<22} {'index GB':>9} {'shards':>6} "
          f"{'tokens GB':>10} {'disk GB':>9} {'K':>3} {'cpu ms/q':>9} {'QPS/node':>9} "
          + " ".join(f"{'n@' + str(q):>7}" for q in targets))
    for r in rows:
        cost = (f"{r['cpu_ms_per_query']:>9.1f} {r['qps_per_node']:>9.1f} "
                + " ".join(f"{r[f'nodes_for_{q}_qps']:>7}" for q in targets)) if "cpu_ms_per_query" in r else "-"
        items = f"1e{round(math.log10(r['items']))}"
        print(f"{r['preset']:<7} {items:>6} {r['token_format']:<8} {r['factory']:<22} "
              f"{r['index_gb']:>9.2f} {r['shards']:>6} {r['token_store_gb']:>10.1f} {r['disk_gb']:>9.1f} "
              f"{r['rerank']:>3} {cost}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats")
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"],
                        help="presets whose costs are measured (shapes of every preset are tabled)")
    parser.add_argument("--rerank", nargs="+", type=int, default=[10, 50], choices=[10, 50])
    parser.add_argument("--nprobe", type=int, default=64, help="IVF lists scanned per query")
    parser.add_argument("--shard-memory-gb", type=float, default=16.0, help="index memory per retriever shard")
    parser.add_argument("--node-memory-gb", type=float, default=64.0)
    parser.add_argument("--node-cores", type=int, default=16)
    parser.add_argument("--utilization", type=float, default=0.7, help="share of a node's cores queries may use")
    parser.add_argument("--target-qps", nargs="+", type=int, default=[100, 1000])
    parser.add_argument("--out", default=str(RESULTS / "capacity.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_start = os.getloadavg()
    if load_start[0] >= 2:
        print(f"warning: load average {load_start[0]:.2f} >= 2 at start: timings are flagged as loaded")
    repeats = 2 if args.quick else 5
    from thinkfast.models.config import PRESETS

    costs: dict[str, dict[str, Any]] = {}
    scans: dict[int, dict[str, float]] = {}
    for preset in args.presets:
        print(f"measuring {preset} ...", flush=True)
        c = measure_preset(preset, repeats)
        dim = c["embed_dim"]
        if dim not in scans:
            scans[dim] = measure_scan(dim, repeats=repeats)
        costs[preset] = {**c, **scans[dim], "scan_dim": dim}
    rows = [plan(p, n, fmt, costs.get(p), args, k) for p in PRESETS for n in SIZES for fmt in TOKEN_FORMATS
            for k in (args.rerank if p in costs else args.rerank[:1])]
    check = check_against_index_bench()
    load_end = os.getloadavg()
    print_tables(rows, args.target_qps)
    if check:
        print("\nindex size formula vs benchmarks/results/index_bench.json (measured / formula):")
        for c in check:
            print(f"  n={c['n']:>8} {c['factory']:<16} formula {c['formula_mb']:8.1f} MB  measured "
                  f"{c['measured_mb']:8.1f} MB  ratio {c['ratio']:.3f}")
    result = {
        "benchmark": "capacity", "argv": sys.argv[1:] if argv is None else argv,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_start": load_start,
                    "load_avg_end": load_end, "loaded": load_start[0] >= 2},
        "assumptions": {k: getattr(args, k) for k in ("nprobe", "shard_memory_gb", "node_memory_gb", "node_cores",
                                                      "utilization", "target_qps")},
        "measured_costs": costs, "index_size_check": check, "rows": rows,
        "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} (load {load_start[0]:.2f} -> {load_end[0]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
