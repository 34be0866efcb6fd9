"""The four throughput ratios of issue 16, measured side by side in one run.

* **embed**: ``thinkfast_pipelines.embed.embed`` (Ray Data, 1 actor) vs the bare full loop
  (``embed_bench.bare_full_loop``: one process reading the corpus Parquet, decoding,
  running both models, writing fast/ and the token store with the pipeline's own stage
  functions). The model-only ceiling (``embed_bench.bare_loop``: decoded up front) is
  reported next to them. 64 px ``small`` preset, and a 224 px run with the pretrained
  EfficientNet ``photo`` preset at a smaller count.
* **train**: 1 Ray Train worker (``train_bench.ray_row``, last epoch, decoded split cached)
  vs the bare loop (``train_bench.bare_loop``: same model, batch, optimizer, data order).
* **shards**: S shards in one process vs one index over the same vectors (IVF; the
  sharded build reuses the single build's trained quantizer), query batches 1 and 256.
* **serve**: HTTP p50 next to the p50 sum of the server's stage times (concurrency 1,
  K = 10 re-ranked, and fast-only), and fast-only QPS at concurrency 8 (tiny preset).

Each ratio is pipeline / bare throughput (1.0 = no overhead). The load average is
recorded at start and end; a run started at load >= 2 is flagged ``loaded`` (not a
result). Sections run one after another so they do not compete for the cores.

    python benchmarks/throughput.py --quick    # a few minutes -> results/throughput_quick.json
    python benchmarks/throughput.py            # full sizes (estimated ~20 min on 2 cores, not yet run) -> results/throughput.json
    python benchmarks/throughput.py --quick --only embed   # one section (profiling)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

logger = logging.getLogger("throughput")
RESULTS = REPO / "benchmarks" / "results"
LOADED_AT = 2.0  # 1-min load average at start from which the run is flagged as loaded
SECTIONS = ("shards", "embed", "train", "serve")
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           "RAY_DEDUP_LOGS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass(frozen=True)
class Sizes:
    """How much work each section does (quick vs full)."""

    embed_images: int  # 64 px small preset
    photo_images: int  # 224 px photo preset (0: skip)
    train_images: int
    train_preset: str
    train_batch: int
    shard_n: int
    shard_dim: int
    shard_count: int
    serve_images: int
    serve_seconds: float


QUICK = Sizes(embed_images=2048, photo_images=128, train_images=300, train_preset="tiny", train_batch=16,
              shard_n=100_000, shard_dim=256, shard_count=4, serve_images=1000, serve_seconds=4.0)
FULL = Sizes(embed_images=20_000, photo_images=500, train_images=2000, train_preset="small", train_batch=64,
             shard_n=1_000_000, shard_dim=256, shard_count=4, serve_images=10_000, serve_seconds=10.0)


# --------------------------------------------------------------------------- pure assembly


def ratio(pipeline: float | None, bare: float | None) -> float | None:
    """pipeline / bare throughput, rounded; None when either side is missing or bare is 0."""
    if pipeline is None or bare is None or bare <= 0:
        return None
    return round(pipeline / bare, 3)


def assemble(sections: dict[str, dict[str, Any]], load_start: tuple[float, ...], load_end: tuple[float, ...],
             argv: list[str], machine: dict[str, Any]) -> dict[str, Any]:
    """The headline JSON from the per-section records (each a dict with the figures it
    measured, or ``{"error": ...}``): the issue's five figures on top, details below."""
    embed = sections.get("embed", {})
    train = sections.get("train", {})
    shards = sections.get("shards", {})
    serve = sections.get("serve", {})
    return {
        "benchmark": "throughput",
        "argv": argv,
        "machine": machine,
        "load_avg_start": list(load_start),
        "load_avg_end": list(load_end),
        "loaded": load_start[0] >= LOADED_AT,
        "ratios": {
            "embed": ratio(embed.get("pipeline_images_per_s"), embed.get("bare_images_per_s")),
            "train": ratio(train.get("ray_pairs_per_s"), train.get("bare_pairs_per_s")),
            "shards": ratio(shards.get("sharded_qps"), shards.get("single_qps")),
        },
        "serve_overhead_ms": serve.get("overhead_p50_ms_k10"),
        "serve_qps_c8": serve.get("qps_c8_fast_only"),
        "embed_peak_mb": embed.get("pipeline_peak_mb"),
        "bare_peak_mb": embed.get("bare_peak_mb"),
        "sections": sections,
    }


def print_table(result: dict[str, Any]) -> None:
    """The ratio table, then the serve figures, the memory and the load."""
    s = result["sections"]
    rows = [
        ("embed 64 px", s.get("embed", {}), "pipeline_images_per_s", "bare_images_per_s", "img/s"),
        ("embed 224 px photo", s.get("embed", {}).get("photo", {}), "pipeline_images_per_s", "bare_images_per_s",
         "img/s"),
        ("train 1 worker", s.get("train", {}), "ray_pairs_per_s", "bare_pairs_per_s", "pairs/s"),
        (f"shards ({s.get('shards', {}).get('shards', '?')} vs 1)", s.get("shards", {}), "sharded_qps", "single_qps",
         "QPS"),
    ]
    print(f"\n{'ratio':22} {'pipeline':>10} {'bare':>10} {'unit':>8} {'ratio':>7} {'target':>7}")
    targets = {"embed 64 px": 0.9, "embed 224 px photo": 0.9, "train 1 worker": 0.9}
    for name, rec, p, b, unit in rows:
        if "error" in rec:
            print(f"{name:22} ERROR {rec['error']}")
            continue
        pv, bv = rec.get(p), rec.get(b)
        r = ratio(pv, bv)
        fmt = (lambda v: f"{v:10.1f}" if isinstance(v, (int, float)) else f"{'-':>10}")
        print(f"{name:22} {fmt(pv)} {fmt(bv)} {unit:>8} {('-' if r is None else f'{r:.3f}'):>7} "
              f"{targets.get(name, 0.8):>7.2f}")
    embed = s.get("embed", {})
    if "model_only_images_per_s" in embed:
        print(f"embed model-only ceiling: {embed['model_only_images_per_s']:.1f} img/s; pipeline steady "
              f"{embed.get('pipeline_steady_images_per_s') or 0:.1f} img/s; bare full loop / model-only "
              f"{ratio(embed.get('bare_images_per_s'), embed['model_only_images_per_s'])}")
    serve = s.get("serve", {})
    if "error" in serve:
        print(f"serve ERROR {serve['error']}")
    elif serve:
        print(f"serve c=1 K=10: p50 HTTP {serve['p50_ms_k10']:.1f} ms, p50 stage sum {serve['stage_sum_p50_ms_k10']:.1f}"
              f" ms -> overhead {serve['overhead_p50_ms_k10']:.1f} ms (target <= 5); fast-only c=1 overhead "
              f"{serve['overhead_p50_ms_fast']:.1f} ms; fast-only c=8 {serve['qps_c8_fast_only']:.1f} QPS (target >= 200)")
    print(f"embed peak: pipeline {result['embed_peak_mb']} MB, bare {result['bare_peak_mb']} MB, "
          f"idle Ray {embed.get('idle_ray_mb')} MB")
    flag = "  LOADED: not a result" if result["loaded"] else ""
    print(f"load average (1 min): {result['load_avg_start'][0]:.2f} at start, {result['load_avg_end'][0]:.2f} at end"
          f"{flag}")


def top_functions(raw_path: str | Path, n: int = 15) -> dict[str, Any]:
    """Summarise a ``py-spy record --format raw`` file (collapsed stacks, ``a;b;c count``)
    into the top ``n`` functions by self time (leaf frame) and by total time (anywhere on
    the stack, counted once per sample), and (with ``--subprocesses``) the processes, as
    % of all samples: what the profile says in a few lines, for the report."""
    self_counts: Counter = Counter()
    total_counts: Counter = Counter()
    process_counts: Counter = Counter()
    samples = 0
    for line in Path(raw_path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = stack.split(";")
        samples += c
        self_counts[_frame_name(frames[-1])] += c
        if frames[0].startswith("process "):  # py-spy --subprocesses: 'process PID:"cmdline"' first
            process_counts[frames[0].partition(":")[2].strip('"')[:80]] += c
        for name in {_frame_name(f) for f in frames}:
            total_counts[name] += c

    def pct(counter: Counter) -> list[tuple[str, float]]:
        return [(name, round(100.0 * c / samples, 1)) for name, c in counter.most_common(n)] if samples else []

    return {"samples": samples, "self": pct(self_counts), "total": pct(total_counts),
            "processes": pct(process_counts)}


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``: lines merged, so a function's
    samples add up across its lines; process/thread frames are kept as they are."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    file = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({os.path.basename(file)})"


# --------------------------------------------------------------------------- sections


def _start_ray(num_cpus: int) -> None:
    from embed_bench import _start_ray as start

    start(num_cpus)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def _stop_ray() -> None:
    import ray

    ray.shutdown()


def embed_section(work: Path, images: int, preset: str, batch: int, rows_per_write: int, seed: int) -> dict[str, Any]:
    """Pipeline (1 actor, all cores) vs the bare full loop vs the model-only ceiling on
    the same generated corpus and untrained models, Ray idle during the bare runs."""
    import embed_bench as eb

    from thinkfast.models.config import fast_preset

    cores = os.cpu_count() or 1
    size = fast_preset(preset).image_size
    root = work / f"embed-{preset}-{images}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    corpus, fast_dir, slow_dir = eb.make_assets(str(root), images, preset, size, seed)
    _start_ray(cores)
    try:
        with eb.MemorySampler() as idle:
            pass
        bare = eb.bare_full_loop(corpus, fast_dir, slow_dir, str(root / "bare_out"), batch, cores, rows_per_write)
        model_only = eb.bare_loop(corpus, fast_dir, slow_dir, batch, cores)
        rows, manifest = eb.pipeline(corpus, fast_dir, slow_dir, str(root / "pipe_out"), 1, batch, cores,
                                     rows_per_write)
    finally:
        _stop_ray()
    timings = manifest.get("timings_s", {})
    n = manifest["counts"]["embedded"]
    # end to end = what the bare full loop times: the media stream and the token-store index
    e2e_s = float(timings.get("embed_media", 0.0)) + float(timings.get("finalize_tokens", 0.0))
    steady = manifest.get("media_steady_rows_per_s")
    shutil.rmtree(root, ignore_errors=True)
    return {
        "images": images, "preset": preset, "image_size": size, "batch_size": batch, "rows_per_write": rows_per_write,
        "bare_images_per_s": round(bare.images_per_s, 2), "bare_s": round(bare.seconds, 2),
        "model_only_images_per_s": round(model_only.images_per_s, 2), "model_only_s": round(model_only.seconds, 2),
        "pipeline_images_per_s": round(n / e2e_s, 2) if e2e_s > 0 else None, "pipeline_s": round(e2e_s, 2),
        "pipeline_steady_images_per_s": steady, "pipeline_timings_s": timings,
        "ratio_steady": ratio(steady, bare.images_per_s),
        "ratio_bare_to_model_only": ratio(bare.images_per_s, model_only.images_per_s),
        "pipeline_peak_mb": round(rows[0].peak_mem_mib, 1), "bare_peak_mb": round(bare.peak_mem_mib, 1),
        "model_only_peak_mb": round(model_only.peak_mem_mib, 1), "idle_ray_mb": round(idle.peak / 2**20, 1),
        "rows": [asdict(r) for r in [bare, model_only, *rows]],
    }


def train_section(work: Path, images: int, preset: str, batch: int, seed: int) -> dict[str, Any]:
    """1 Ray Train worker (last of 2 epochs: the decoded split is cached by then) vs the
    bare loop with the same model, objective, optimizer, batch and data order."""
    import train_bench as tb

    from thinkfast.data.synth import SynthConfig, write_synth
    from thinkfast.models.config import fast_preset

    root = work / f"train-{preset}-{images}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    corpus = str(root / "corpus")
    size = fast_preset(preset).image_size
    write_synth(corpus, SynthConfig(num_images=images, captions_per_image=3, image_size=max(size, 32), seed=seed),
                overwrite=True)
    _start_ray(max(4, os.cpu_count() or 1))  # as train_bench: the trainer and a worker need CPU slots
    try:
        ray1 = tb.ray_row(corpus, str(root), preset, batch, 1, 2, seed)
    finally:
        _stop_ray()
    bare = tb.bare_loop(corpus, preset, batch, max(ray1.steps, 10), seed)
    shutil.rmtree(root, ignore_errors=True)
    return {"images": images, "preset": preset, "batch_size": batch,
            "bare_pairs_per_s": bare.pairs_per_s, "bare_steps_per_s": bare.steps_per_s, "bare_steps": bare.steps,
            "ray_pairs_per_s": ray1.pairs_per_s, "ray_steps_per_s": ray1.steps_per_s, "ray_steps": ray1.steps,
            "ray_wall_s": ray1.wall_s}


def shards_section(work: Path, n: int, dim: int, shards: int, batches: tuple[int, ...] = (1, 256),
                   k: int = 10, rounds: int = 3, min_time: float = 1.0) -> dict[str, Any]:
    """One IVF index vs ``shards`` shards over the same vectors, in this process; the
    configurations are interleaved round by round and the best round kept. Headline:
    the largest batch (throughput); every batch is in ``by_batch``. Built indexes are
    kept under ``work`` so a rerun reuses them."""
    import numpy as np

    from thinkfast.index.factory import choose_factory
    from thinkfast.index.files import load_trained
    from thinkfast.index.sharded import ShardedIndex
    from thinkfast.index.synthetic import clustered_vectors, noisy_queries

    root = work / f"shards-{n}-{dim}"
    root.mkdir(parents=True, exist_ok=True)
    factory = choose_factory(n, dim)
    vec_path, q_path = root / "vectors.npy", root / "queries.npy"
    if not vec_path.exists():
        x, _ = clustered_vectors(n, dim, clusters=max(100, n // 1000), seed=0)
        np.save(q_path, noisy_queries(x, max(batches) * 4, seed=1))
        np.save(vec_path, x)
        del x
    x = np.load(vec_path, mmap_mode="r")
    q = np.load(q_path)
    keys = [str(i) for i in range(n)]
    build_s: dict[int, float] = {}
    indexes = {}
    for s in (1, shards):
        out = root / f"ivf-{s}"
        if not (out / "manifest.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            trained = load_trained(str(root / "ivf-1")) if s > 1 else None
            t = time.perf_counter()
            ShardedIndex.build(keys, x, str(out), shards=s, factory=factory, store_vectors=False,
                               trained=trained).close()
            build_s[s] = round(time.perf_counter() - t, 1)
        indexes[s] = ShardedIndex.load(str(out), mmap=True)
    del x
    by_batch = []
    for batch in batches:
        blocks = [q[i : i + batch] for i in range(0, batch * 4, batch)]
        qps: dict[int, list[float]] = {s: [] for s in indexes}
        for s, index in indexes.items():  # warm-up: page in the mapped files
            index.search(blocks[0], k)
        for _ in range(rounds):
            for s, index in indexes.items():
                done, start = 0, time.perf_counter()
                while True:
                    index.search(blocks[(done // batch) % len(blocks)], k)
                    done += batch
                    if time.perf_counter() - start >= min_time:
                        break
                qps[s].append(done / (time.perf_counter() - start))
        ref, _ = indexes[1].search(blocks[0], k)
        got, _ = indexes[shards].search(blocks[0], k)
        by_batch.append({"batch": batch, "single_qps": round(max(qps[1]), 1), "sharded_qps": round(max(qps[shards]), 1),
                         "ratio": ratio(max(qps[shards]), max(qps[1])), "same_keys": bool((got == ref).all())})
    for index in indexes.values():
        index.close()
    head = by_batch[-1]
    return {"n": n, "dim": dim, "factory": factory, "shards": shards, "k": k, "batch": head["batch"],
            "single_qps": head["single_qps"], "sharded_qps": head["sharded_qps"], "by_batch": by_batch,
            "build_s": build_s}


def serve_section(work: Path, images: int, seconds: float, seed: int) -> dict[str, Any]:
    """The shipped service (tiny preset, 2 retriever shards) built by ``serve_bench``'s
    artifact builder; levels: fast-only c=1, K=10 c=1, fast-only c=8 (``serve_bench.measure``)."""
    import asyncio
    import warnings

    import serve_bench as sb

    for key, value in sb.FAST_METRICS_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", message=".*look_back_period_s.*")
    from ray import serve as ray_serve

    from thinkfast_pipelines.serve import serve

    root = work / f"serve-{images}"
    root.mkdir(parents=True, exist_ok=True)
    _start_ray(max(8, os.cpu_count() or 1))  # as serve_bench: CPU slots for every deployment
    try:
        paths, captions, build_s = sb.build_artifacts(root, images, "tiny", 2, seed)
        reranker = {"min_replicas": 1, "max_replicas": 1, "max_batch_size": 8, "batch_wait_timeout_s": 0.005,
                    "max_ongoing_requests": 16, "num_cpus": 1}
        args = {**{k: paths[k] for k in ("fast", "slow", "index", "embeddings", "corpus")}, "reranker": reranker,
                "ingress": {"num_cpus": 0.5, "max_ongoing_requests": 256}}
        url = serve(args, port=sb._free_port(), name=sb.APP)
        queries = random.Random(seed).sample(captions, min(200, len(captions)))
        asyncio.run(sb._level(url, queries, 10, 10, 2, 0.0, 4))  # warm-up: every stage once
        with sb.ReplicaWatcher() as watcher:
            fast1 = sb.measure(url, queries, 0, 1, seconds, 10, watcher)
            k10 = sb.measure(url, queries, 10, 1, seconds, 10, watcher)
            fast8 = sb.measure(url, queries, 0, 8, seconds, 10, watcher)
        ray_serve.delete(sb.APP)
    finally:
        _stop_ray()
    return {"images": images, "preset": "tiny", "shards": 2, "k": 10, "seconds_per_level": seconds,
            "p50_ms_k10": k10.p50_ms, "stage_sum_p50_ms_k10": k10.stage_sum_p50_ms,
            "overhead_p50_ms_k10": k10.overhead_p50_ms, "overhead_p50_ms_fast": fast1.overhead_p50_ms,
            "qps_c8_fast_only": fast8.qps, "levels": [asdict(lv) for lv in (fast1, k10, fast8)],
            "build_s": {k: round(v, 1) for k, v in build_s.items()}}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a few minutes")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--workdir", default=None, help="scratch (kept: the built indexes are reused)")
    parser.add_argument("--out", default=None, help="JSON path (default results/throughput[_quick].json)")
    parser.add_argument("--no-photo", action="store_true", help="skip the 224 px photo-preset embed run")
    parser.add_argument("--settle", type=float, default=45.0,
                        help="seconds to wait at most for the 1-min load to fall below 2 before starting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summarize", nargs="+", metavar="RAW",
                        help="only summarise py-spy raw profiles: writes RAW.top.json beside each and prints it")
    args = parser.parse_args(argv)
    if args.summarize:
        for raw in args.summarize:
            top = top_functions(raw, 20)
            Path(f"{raw}.top.json").write_text(json.dumps(top, indent=1))
            print(json.dumps(top, indent=1))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    load_launch = os.getloadavg()
    deadline = time.monotonic() + args.settle  # under the shared lock the last heavy job's load decays
    while os.getloadavg()[0] >= LOADED_AT and time.monotonic() < deadline:
        time.sleep(5)
    load_start = os.getloadavg()
    if load_start[0] >= LOADED_AT:
        logger.warning("load average %.2f >= %.0f at start: this run is flagged as loaded", load_start[0], LOADED_AT)
    sizes = QUICK if args.quick else FULL
    work = Path(args.workdir or os.path.join(tempfile.gettempdir(), "thinkfast-throughput"))
    work.mkdir(parents=True, exist_ok=True)
    sections: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    runners = {
        "shards": lambda: shards_section(work, sizes.shard_n, sizes.shard_dim, sizes.shard_count),
        "embed": lambda: embed_section(work, sizes.embed_images, "small", 64, 128, args.seed),
        "train": lambda: train_section(work, sizes.train_images, sizes.train_preset, sizes.train_batch, args.seed),
        "serve": lambda: serve_section(work, sizes.serve_images, sizes.serve_seconds, args.seed),
    }
    for name in SECTIONS:
        if name not in args.only:
            continue
        t = time.perf_counter()
        try:
            sections[name] = runners[name]()
            if name == "embed" and sizes.photo_images and not args.no_photo:
                sections[name]["photo"] = embed_section(work, sizes.photo_images, "photo", 32, 64, args.seed)
        except Exception as exc:  # noqa: BLE001 - one failed section is reported, the others still run
            logger.exception("section %s failed", name)
            sections.setdefault(name, {})["error"] = f"{type(exc).__name__}: {exc}"
        timings[name] = round(time.perf_counter() - t, 1)
        logger.warning("section %s done in %.0f s (load %.2f)", name, timings[name], os.getloadavg()[0])
    machine = {"cpus": os.cpu_count(), "load_avg_at_launch": list(load_launch), "platform": platform.platform(), "python": platform.python_version(),
               "section_wall_s": timings}
    try:
        import torch

        machine["torch"] = torch.__version__
        machine["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    result = assemble(sections, load_start, os.getloadavg(), sys.argv[1:] if argv is None else argv, machine)
    print_table(result)
    out = Path(args.out) if args.out else RESULTS / ("throughput_quick.json" if args.quick else "throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
