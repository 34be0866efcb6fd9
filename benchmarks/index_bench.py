"""Index benchmark: Flat / HNSW / IVF / IVF-PQ, one shard vs several, on clustered vectors.

For each corpus size (d=256 by default) it writes the vectors and the exact top-10 once,
then runs every (index type, shard count) in a fresh spawned process so that peak
memory is that configuration's own: build (train + add, via ``ShardedIndex.build``),
load (memory-mapped), search with the build-tuned nprobe / efSearch, recall@10 against
exact search (``faiss.contrib.evaluation.knn_intersection_measure``). The sharded run
reuses the single run's trained quantizers (training does not depend on sharding), so
its ``train_s`` is reported as shared. Results are appended to the JSON after every
configuration, so a run stopped early keeps what it measured.

    python benchmarks/index_bench.py --quick
    python benchmarks/index_bench.py --shard-compare --workdir /tmp/idxbench   # 1 vs 2 / 4 shards, 1M x 256
    nice -n 10 python benchmarks/index_bench.py --sizes 100000 1000000 --shards 4
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
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

logger = logging.getLogger("index_bench")

RESULTS = REPO / "benchmarks" / "results" / "index_bench.json"
QUICK_SIZE = 20_000


def factories(n: int, dim: int) -> dict[str, str]:
    """The four index types of the issue, sized for ``n`` vectors."""
    from thinkfast.index.factory import default_nlist, pq_subquantizers

    nlist = default_nlist(n)
    m = min(32, pq_subquantizers(dim))  # 32 bytes a vector at d=256
    return {"Flat": "Flat", "HNSW": "HNSW32", "IVF": f"IVF{nlist},Flat", "IVF-PQ": f"IVF{nlist},PQ{m}x8"}


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def reset_peak_rss() -> None:
    """Start this process's high-water mark afresh: a spawned worker otherwise inherits the
    parent's (which held the whole corpus and the ground truth)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        logger.warning("cannot reset the peak RSS (not Linux?); peak_rss_mb includes the parent's")


def peak_rss_mb() -> float:
    """VmHWM: the peak resident set since the last reset, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_config(job: dict[str, Any], queue: mp.Queue) -> None:
    """One (size, type, shards) configuration, in its own process."""
    try:
        queue.put(_run_config(job))
    except Exception as exc:  # noqa: BLE001 - reported in the table, not hidden
        queue.put({**job, "error": f"{type(exc).__name__}: {exc}"})


def _run_config(job: dict[str, Any]) -> dict[str, Any]:
    import faiss
    from faiss.contrib.evaluation import knn_intersection_measure

    from thinkfast.index.files import load_trained
    from thinkfast.index.sharded import ShardedIndex

    logging.basicConfig(level=logging.WARNING)
    reset_peak_rss()
    x = np.load(job["vectors"], mmap_mode="r")
    q = np.load(job["queries"])
    truth = np.load(job["truth"])
    keys = [str(i) for i in range(len(x))]
    trained = load_trained(job["trained_from"]) if job.get("trained_from") else None
    rss0 = rss_mb()
    start = time.perf_counter()
    built = ShardedIndex.build(
        keys, x, job["out"], shards=job["shards"], factory=job["factory"], train_sample=job["train_sample"],
        store_vectors=job["store_vectors"], trained=trained,
    )
    build_s = time.perf_counter() - start
    timings = dict(built.manifest.timings)
    defaults = dict(built.manifest.search_defaults)
    built.close()
    del built
    build_peak = peak_rss_mb()

    index = ShardedIndex.load(job["out"], mmap=True)
    index_mb = sum(p.stat().st_size for p in Path(job["out"]).glob("shard-*.faiss")) / 2**20
    rows: dict[str, Any] = {}
    variants = [("", False)] + ([("+rescore", True)] if job["store_vectors"] else [])
    for suffix, rescore in variants:
        index.search(q[:10], 10, rescore=rescore)  # warm-up: page in the mapped files
        start = time.perf_counter()
        found, _ = index.search(q, 10, rescore=rescore)
        batch_s = time.perf_counter() - start
        singles = q[: job["single_queries"]]
        lat = []
        for row in singles:
            t0 = time.perf_counter()
            index.search(row[None, :], 10, rescore=rescore)
            lat.append(time.perf_counter() - t0)
        ids = np.vectorize(lambda k: int(k) if k is not None else -1, otypes=[np.int64])(found)
        rows[suffix] = {
            "qps_batch": len(q) / batch_s,
            "latency_ms_p50": 1000 * float(np.median(lat)),
            "recall_at_10": knn_intersection_measure(ids, truth[:, :10]),
        }
    search_rss = rss_mb() - rss0
    index.close()
    faiss_threads = faiss.omp_get_max_threads()
    return {
        **job,
        "build_s": build_s,
        "train_s": timings.get("train", 0.0),
        "add_s": timings.get("add", 0.0),
        "peak_rss_mb": build_peak,
        "index_mb": index_mb,
        "search_rss_mb": search_rss,
        "search_defaults": defaults,
        "omp_threads": faiss_threads,
        "results": rows,
    }


def prepare_size(n: int, dim: int, n_queries: int, work: Path) -> dict[str, str]:
    """Vectors, queries and exact top-10 for one size, as .npy files for the workers."""
    import faiss

    from thinkfast.index.synthetic import clustered_vectors, noisy_queries

    x, _ = clustered_vectors(n, dim, clusters=max(100, n // 1000), seed=0)
    q = noisy_queries(x, n_queries, seed=1)
    exact = faiss.IndexFlatIP(dim)
    exact.add(x)
    start = time.perf_counter()
    _, truth = exact.search(q, 10)
    logger.info("n=%d: exact ground truth in %.1f s", n, time.perf_counter() - start)
    paths = {name: str(work / f"{name}-{n}.npy") for name in ("vectors", "queries", "truth")}
    np.save(paths["vectors"], x)
    np.save(paths["queries"], q)
    np.save(paths["truth"], truth)
    return paths


def run_job(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=run_config, args=(job, queue))
    proc.start()
    try:
        result = queue.get(timeout=timeout_s)
    except Exception:  # noqa: BLE001 - queue.Empty on timeout, or the worker died
        result = {**job, "error": f"no result within {timeout_s:.0f} s (exit code {proc.exitcode})"}
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
    return result


def table(records: list[dict[str, Any]]) -> str:
    head = (
        f"{'n':>9} {'type':<7} {'shards':>6} {'variant':<9} {'build s':>8} {'train s':>8} {'peak MB':>8} "
        f"{'index MB':>8} {'QPS':>9} {'p50 ms':>7} {'R@10':>6}  params"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        if "error" in r:
            lines.append(f"{r['n']:>9} {r['kind']:<7} {r['shards']:>6} ERROR {r['error']}")
            continue
        train = f"{r['train_s']:.1f}" + ("*" if r.get("trained_from") else "")
        params = {k: v for k, v in r["search_defaults"].items() if k in ("nprobe", "efSearch")}
        for variant, m in r["results"].items():
            lines.append(
                f"{r['n']:>9} {r['kind']:<7} {r['shards']:>6} {variant or '-':<9} {r['build_s']:>8.1f} {train:>8} "
                f"{r['peak_rss_mb']:>8.0f} {r['index_mb']:>8.1f} {m['qps_batch']:>9.0f} {m['latency_ms_p50']:>7.2f} "
                f"{m['recall_at_10']:>6.3f}  {params}"
            )
    lines.append("train s: quantizer training plus the build-time tuning of nprobe / efSearch (part of build s)")
    lines.append("* trained quantizers reused from the 1-shard build (training is independent of sharding)")
    return "\n".join(lines)


SHARD_RESULTS = REPO / "benchmarks" / "results" / "index_shards.json"


def shard_compare(args: argparse.Namespace) -> int:
    """One index vs S shards over the same vectors, in one process and one run.

    Builds (or reuses, from ``--workdir``) a 1-shard and an S-shard ``ShardedIndex`` of each
    kind over the same vectors -- the sharded builds reuse the single build's trained
    quantizer, as ``add`` and the Ray build do -- then times ``search`` at each query batch
    size, interleaving the configurations round by round so that a change in machine load
    hits them alike. Reports QPS, the sharded / single ratio, whether the sharded keys equal
    the single index's, and the load average at start and end."""
    from thinkfast.index.factory import choose_factory
    from thinkfast.index.files import load_trained
    from thinkfast.index.sharded import ShardedIndex
    from thinkfast.index.synthetic import clustered_vectors, noisy_queries

    work = Path(args.workdir or "/tmp/idxbench")
    work.mkdir(parents=True, exist_ok=True)
    n, dim = args.sizes[0] if not args.quick else QUICK_SIZE, args.dim
    load_start = os.getloadavg()
    if load_start[0] >= 2:
        logger.warning("load average %.2f >= 2 at start: figures are flagged as loaded", load_start[0])
    vec_path, q_path = work / f"vectors-{n}-{dim}.npy", work / f"queries-{n}-{dim}.npy"
    if not vec_path.exists():
        x, _ = clustered_vectors(n, dim, clusters=max(100, n // 1000), seed=0)
        np.save(q_path, noisy_queries(x, max(args.batches) * 4, seed=1))
        np.save(vec_path, x)
        del x
    x = np.load(vec_path, mmap_mode="r")
    q = np.load(q_path)
    keys = [str(i) for i in range(n)]
    kinds = {"Flat": "Flat", "IVF": choose_factory(n, dim)}
    kinds = {k: v for k, v in kinds.items() if k in args.kinds} or kinds
    counts = [1] + [s for s in args.shard_counts if s > 1]
    indexes: dict[tuple[str, int], ShardedIndex] = {}
    for kind, factory in kinds.items():
        for s in counts:
            out = work / f"{kind}-{n}-{dim}-{s}"
            if not (out / "manifest.json").exists():
                shutil.rmtree(out, ignore_errors=True)
                trained = load_trained(str(work / f"{kind}-{n}-{dim}-1")) if s > 1 and kind != "Flat" else None
                logger.info("building %s (%s) with %d shard(s) in %s", kind, factory, s, out)
                ShardedIndex.build(keys, x, str(out), shards=s, factory=factory, store_vectors=False,
                                   trained=trained).close()
            indexes[kind, s] = ShardedIndex.load(str(out), mmap=True)
    del x
    records: list[dict[str, Any]] = []
    for kind in kinds:
        for batch in args.batches:
            qb = q[: batch * max(1, args.min_batches)]
            blocks = [qb[i : i + batch] for i in range(0, len(qb), batch)]
            qps: dict[int, list[float]] = {s: [] for s in counts}
            for s in counts:  # warm-up: page in the mapped files, start the pools
                indexes[kind, s].search(blocks[0], args.k)
            for _ in range(args.rounds):
                for s in counts:
                    index, done, start = indexes[kind, s], 0, time.perf_counter()
                    while True:  # cycle over the batches, at least one, for min_time seconds
                        index.search(blocks[(done // batch) % len(blocks)], args.k)
                        done += batch
                        if time.perf_counter() - start >= args.min_time:
                            break
                    qps[s].append(done / (time.perf_counter() - start))
            ref_keys, ref_scores = indexes[kind, 1].search(blocks[0], args.k)
            for s in counts:
                got_keys, got_scores = indexes[kind, s].search(blocks[0], args.k)
                best = max(qps[s])
                records.append({
                    "kind": kind, "factory": kinds[kind], "shards": s, "batch": batch, "k": args.k,
                    "qps": best, "qps_rounds": qps[s], "ratio": best / max(qps[1]),
                    "same_keys": bool((got_keys == ref_keys).all()),
                    "max_score_diff": float(np.max(np.abs(got_scores - ref_scores))),
                })
                logger.info("%s batch=%d shards=%d: %.0f QPS (%.2fx)", kind, batch, s, best, records[-1]["ratio"])
    for index in indexes.values():
        index.close()
    load_end = os.getloadavg()
    report = {
        "benchmark": "index_bench --shard-compare",
        "argv": sys.argv[1:],
        "label": args.label,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_start": load_start, "load_avg_end": load_end, "loaded": load_start[0] >= 2},
        "env": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "n": n, "dim": dim, "records": records,
    }
    out_path = Path(args.out if args.out != str(RESULTS) else SHARD_RESULTS)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out_path.read_text()).get("runs", []) if out_path.exists() else []
    out_path.write_text(json.dumps({"runs": runs + [report]}, indent=2, default=float))
    head = f"{'type':<5} {'batch':>5} {'shards':>6} {'QPS':>9} {'ratio':>6} {'same':>5}"
    print(head + "\n" + "-" * len(head))
    for r in records:
        print(f"{r['kind']:<5} {r['batch']:>5} {r['shards']:>6} {r['qps']:>9.0f} {r['ratio']:>6.2f} {str(r['same_keys']):>5}")
    print(f"load average start {load_start[0]:.2f}, end {load_end[0]:.2f}" + ("  (LOADED)" if load_start[0] >= 2 else ""))
    print(f"wrote {out_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="corpus sizes")
    parser.add_argument("--quick", action="store_true", help=f"one small size ({QUICK_SIZE}) for a smoke run")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--shards", type=int, default=4, help="shard count of the sharded runs")
    parser.add_argument("--kinds", nargs="+", default=["Flat", "HNSW", "IVF", "IVF-PQ"])
    parser.add_argument("--queries", type=int, default=1000, help="batch queries (recall and QPS)")
    parser.add_argument("--single-queries", type=int, default=50, help="one-at-a-time queries (latency)")
    parser.add_argument("--train-sample", type=int, default=None, help="default: 40 per IVF list, >= 10k for PQ")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY for the workers")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--workdir", default=None, help="scratch dir (default: a temp dir, deleted)")
    parser.add_argument(
        "--keep-existing", action="store_true",
        help="keep the records already in --out for configurations this run does not repeat (a long run in parts)",
    )
    parser.add_argument("--shard-compare", action="store_true",
                        help="one index vs --shard-counts shards, same vectors, one process (index_shards.json)")
    parser.add_argument("--shard-counts", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256], help="--shard-compare batch sizes")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="--shard-compare: interleaved rounds (best kept)")
    parser.add_argument("--min-time", type=float, default=1.0, help="--shard-compare: seconds a timing lasts")
    parser.add_argument("--min-batches", type=int, default=4, help="--shard-compare: distinct query batches")
    parser.add_argument("--label", default="", help="--shard-compare: tag of this run (e.g. before / after)")
    args = parser.parse_args(argv)
    if args.shard_compare:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
        if args.sizes == [100_000, 1_000_000]:
            args.sizes = [1_000_000]
        return shard_compare(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sizes = [QUICK_SIZE] if args.quick else args.sizes
    # spawned workers inherit this: OpenMP threads that spin while waiting fight every other
    # process on a shared machine (PQ training measured 331 s spinning vs 9 s passive here)
    os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="index_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "index_bench",
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_start": os.getloadavg()},
        "env": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "dim": args.dim,
        "records": [],
    }
    if args.keep_existing and out.exists():
        previous = json.loads(out.read_text())
        report["records"] = [
            r for r in previous.get("records", []) if not (r["n"] in sizes and r["kind"] in args.kinds)
        ]
        # the earlier runs' machine / argv, so every kept record still has its context
        report["previous_runs"] = previous.get("previous_runs", []) + [
            {k: v for k, v in previous.items() if k not in ("records", "previous_runs")}
        ]
    try:
        for n in sizes:
            paths = prepare_size(n, args.dim, args.queries, work)
            for kind in args.kinds:
                factory = factories(n, args.dim)[kind]
                single_dir = str(work / f"{kind}-{n}-1")
                for shards in (1, args.shards):
                    job = {
                        "n": n, "dim": args.dim, "kind": kind, "factory": factory, "shards": shards,
                        "out": str(work / f"{kind}-{n}-{shards}"), **paths,
                        "train_sample": args.train_sample or _train_size(factory, n),
                        "store_vectors": kind == "IVF-PQ",  # only lossy codes need exact re-scoring
                        "single_queries": args.single_queries,
                        "trained_from": single_dir if shards > 1 and kind != "Flat" else None,
                    }
                    logger.info("running %s n=%d shards=%d (%s)", kind, n, shards, factory)
                    result = run_job(job, args.timeout)
                    for key in ("vectors", "queries", "truth", "out"):
                        result.pop(key, None)
                    report["records"].append(result)
                    report["machine"]["load_avg_end"] = os.getloadavg()
                    out.write_text(json.dumps(report, indent=2, default=float))
                    if "error" in result:
                        logger.error("%s n=%d shards=%d failed: %s", kind, n, shards, result["error"])
                if kind != "Flat":
                    for shards in (1, args.shards):
                        shutil.rmtree(work / f"{kind}-{n}-{shards}", ignore_errors=True)
            for p in paths.values():
                os.remove(p)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(report["records"]))
    print(f"wrote {out}")
    return 1 if any("error" in r for r in report["records"]) else 0


def _train_size(factory: str, n: int) -> int:
    """40 vectors per IVF list (FAISS asks for 39), at least 10k for PQ codebooks."""
    nlist = int(factory[3:].split(",")[0]) if factory.startswith("IVF") else 0
    size = 40 * nlist
    if "PQ" in factory:
        size = max(size, 10_000)
    return min(n, max(size, 1))


if __name__ == "__main__":
    sys.exit(main())
