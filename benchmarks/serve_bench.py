"""Serve benchmark: latency (p50/p95/p99) and QPS of ``POST /search`` at several client
concurrencies and re-rank depths, and the re-ranker's replica count before, during and
after the load (the autoscaler acting).

The corpus is generated (``thinkfast synth``), models are untrained presets (speed does
not depend on the weights), and the artifacts are made by the real pipeline (embed on
Ray Data, a sharded index), so the numbers are those of the service as shipped. The
client is asyncio + aiohttp in this process, each of ``c`` workers sending requests back
to back for a fixed time; on a small machine the client competes with the service for
the same cores, which the printed table states.

    python benchmarks/serve_bench.py --quick             # 500 images, 3 s levels, 30 s sustained
    python benchmarks/serve_bench.py                     # 10k images (the issue's size)
    python benchmarks/serve_bench.py --workdir /tmp/sb   # keep artifacts; reused when present

Writes ``benchmarks/results/serve_bench.json`` (``serve_bench_quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("serve_bench")

RESULTS = Path(__file__).resolve().parent / "results"
APP = "thinkfast-bench"
LOADED_AT = 2.0  # 1-min load average at start from which a run is flagged as loaded (common rules)

# Ray pushes autoscaling metrics every 10 s by default, too slow to see scaling within a
# benchmark; these must be set before Ray starts so replicas and handles inherit them.
FAST_METRICS_ENV = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
}


@dataclass
class Level:
    """One (rerank K, concurrency) measurement."""

    rerank: int  # K re-ranked per query (0 = fast only)
    concurrency: int  # clients sending back to back
    requests: int  # completed requests (any status)
    errors: int  # non-200 answers or failed connections
    seconds: float  # wall time of the level
    qps: float  # successful requests per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    stage_ms: dict[str, float]  # server-side mean per stage (encode / retrieve / rerank / captions / total)
    replicas_max: int  # most RUNNING re-ranker replicas seen during the level
    target_max: int  # most RUNNING + STARTING (the autoscaler's target) during the level
    label: str = ""  # "sustained N s" for the final long level at the heaviest setting
    stage_p50_ms: dict[str, float] = field(default_factory=dict)  # server-side p50 per stage
    stage_sum_p50_ms: float = 0.0  # p50 over requests of the sum of the stages (encode+retrieve+rerank+captions)
    overhead_p50_ms: float = 0.0  # p50 HTTP minus stage_sum_p50_ms: the hops, proxy, (de)serialisation
    proxy_p50_ms: float = 0.0  # p50 of (HTTP latency - server 'total'): client + proxy + proxy->ingress hop


@dataclass
class Report:
    config: dict[str, Any]
    build_s: dict[str, float]
    replicas_before: int
    replicas_after_load: int
    replicas_after_cooldown: int | None
    replica_timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (s, RUNNING, +STARTING)
    levels: list[Level] = field(default_factory=list)


# --------------------------------------------------------------------------- artifacts


def build_artifacts(workdir: Path, images: int, preset: str, shards: int, seed: int) -> tuple[dict[str, str], list[str], dict[str, float]]:
    """Generated corpus -> untrained models -> embed -> index; reused when already built."""
    import torch

    from thinkfast_pipelines.embed import EmbedConfig, embed
    from thinkfast_pipelines.index import build_index
    from thinkfast_pipelines.synth import synth
    from thinkfast import FastModel, SlowModel
    from thinkfast.data.reader import read_table
    from thinkfast.data.tokenizer import WordTokenizer

    paths = {name: str(workdir / name) for name in ("corpus", "fast", "slow", "embeddings", "index")}
    timings: dict[str, float] = {}
    size = FastModel.preset_config(preset).image_size
    if not (workdir / "corpus").exists():
        t = time.perf_counter()
        synth(paths["corpus"], images=images, captions_per_image=2, image_size=size, seed=seed)
        timings["synth"] = time.perf_counter() - t
    captions = [c for caps in read_table(paths["corpus"], columns=["captions"]).column("captions").to_pylist() for c in caps]
    if not (workdir / "slow" / "config.json").exists():
        tokenizer = WordTokenizer.build(captions)
        torch.manual_seed(seed)
        FastModel.from_preset(preset, tokenizer=tokenizer, load_pretrained=False).save_pretrained(paths["fast"])
        SlowModel.from_preset(preset, tokenizer=tokenizer, load_pretrained=False).save_pretrained(paths["slow"])
    if not (workdir / "embeddings" / "manifest.json").exists():
        t = time.perf_counter()
        embed(paths["corpus"], paths["embeddings"], fast=paths["fast"], slow=paths["slow"],
              config=EmbedConfig(batch_size=128, progress=False))
        timings["embed"] = time.perf_counter() - t
    if not (workdir / "index" / "manifest.json").exists():
        t = time.perf_counter()
        build_index(paths["embeddings"], paths["index"], shards=shards)
        timings["index"] = time.perf_counter() - t
    return paths, captions, timings


# --------------------------------------------------------------------------- replicas


def replica_counts(deployment: str = "Reranker") -> tuple[int, int]:
    """(RUNNING, RUNNING + STARTING) replicas: the second is the autoscaler's decision,
    visible before a new replica has loaded its model (slow on a busy machine)."""
    from ray import serve
    from ray.serve._private.common import ReplicaState

    app = serve.status().applications.get(APP)
    if app is None or deployment not in app.deployments:
        return 0, 0
    states = app.deployments[deployment].replica_states
    running = int(states.get(ReplicaState.RUNNING, 0))
    return running, running + int(states.get(ReplicaState.STARTING, 0))


def running_replicas(deployment: str = "Reranker") -> int:
    return replica_counts(deployment)[0]


class ReplicaWatcher:
    """Samples the re-ranker's RUNNING replicas every ``period`` seconds in a thread."""

    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self.samples: list[tuple[float, int, int]] = []  # (seconds, RUNNING, RUNNING + STARTING)
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((round(time.perf_counter() - self._t0, 2), *replica_counts()))
            except Exception as exc:  # noqa: BLE001 - a status hiccup must not stop the benchmark
                logger.debug("status failed: %s", exc)
            self._stop.wait(self.period)

    def max_since(self, t: float, column: int = 1) -> int:
        return max((row[column] for row in self.samples if row[0] >= t), default=0)

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def __enter__(self) -> "ReplicaWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- load


async def _level(url: str, queries: list[str], rerank: int, k: int, concurrency: int, seconds: float,
                 min_requests: int) -> tuple[list[float], int, float, list[dict[str, float]]]:
    """``concurrency`` clients back to back for ``seconds``: (latencies ms, errors, wall s,
    the server's ``timings_ms`` of each successful request, in the same order)."""
    import aiohttp

    latencies: list[float] = []
    stages: list[dict[str, float]] = []
    errors = 0
    rng = random.Random(rerank * 1000 + concurrency)
    deadline = time.perf_counter() + seconds
    done = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors, done
        while time.perf_counter() < deadline or done < min_requests:
            body = {"query": rng.choice(queries), "k": k, "rerank": rerank}
            t = time.perf_counter()
            try:
                async with session.post(url + "/search", json=body) as resp:
                    payload = await resp.json()
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok, payload = False, {}
            done += 1
            if ok:
                latencies.append((time.perf_counter() - t) * 1000.0)
                stages.append(payload["timings_ms"])
            else:
                errors += 1

    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - start, stages


def measure(url: str, queries: list[str], rerank: int, concurrency: int, seconds: float, k: int,
            watcher: ReplicaWatcher) -> Level:
    t0 = watcher.now()
    lat, errors, wall, stages = asyncio.run(_level(url, queries, rerank, k, concurrency, seconds, 2 * concurrency))
    arr = np.asarray(lat) if lat else np.asarray([np.nan])
    names = list(stages[0]) if stages else []
    stage_mean = {name: round(float(np.mean([s.get(name, 0.0) for s in stages])), 2) for name in names}
    stage_p50 = {name: round(float(np.median([s.get(name, 0.0) for s in stages])), 2) for name in names}
    parts = [n for n in names if n != "total"]
    sums = np.asarray([sum(s.get(n, 0.0) for n in parts) for s in stages]) if stages else np.asarray([np.nan])
    proxy = np.asarray([l - s.get("total", 0.0) for l, s in zip(lat, stages)]) if stages else np.asarray([np.nan])
    p50 = float(np.percentile(arr, 50))
    return Level(
        rerank=rerank, concurrency=concurrency, requests=len(lat) + errors, errors=errors, seconds=round(wall, 2),
        qps=round(len(lat) / wall, 2), p50_ms=round(float(np.percentile(arr, 50)), 1),
        p95_ms=round(float(np.percentile(arr, 95)), 1), p99_ms=round(float(np.percentile(arr, 99)), 1),
        stage_ms=stage_mean, stage_p50_ms=stage_p50, stage_sum_p50_ms=round(float(np.median(sums)), 2),
        overhead_p50_ms=round(p50 - float(np.median(sums)), 2), proxy_p50_ms=round(float(np.median(proxy)), 2),
        replicas_max=watcher.max_since(t0), target_max=watcher.max_since(t0, 2),
    )


def print_table(report: Report) -> None:
    cfg = report.config
    print(f"\nserve_bench: {cfg['images']} images, preset {cfg['preset']}, {cfg['shards']} shards, "
          f"k={cfg['k']}, {cfg['cpus']} cores ({cfg['machine']}); client in-process")
    print(f"{'rerank':>6} {'conc':>5} {'reqs':>6} {'err':>4} {'QPS':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
          f" {'enc':>6} {'retr':>6} {'rerank':>7} {'capt':>6} {'srv':>6} {'sum50':>6} {'ovh50':>6} {'prx50':>6}"
          f" {'replicas':>8}")
    print(f"{'':>118}(running/target)")
    for lv in report.levels:
        s = lv.stage_ms
        print(f"{lv.rerank:>6} {lv.concurrency:>5} {lv.requests:>6} {lv.errors:>4} {lv.qps:>7.1f} {lv.p50_ms:>8.1f}"
              f" {lv.p95_ms:>8.1f} {lv.p99_ms:>8.1f} {s.get('encode', 0):>6.1f} {s.get('retrieve', 0):>6.1f}"
              f" {s.get('rerank', 0):>7.1f} {s.get('captions', 0):>6.1f} {s.get('total', 0):>6.1f}"
              f" {lv.stage_sum_p50_ms:>6.1f} {lv.overhead_p50_ms:>6.1f} {lv.proxy_p50_ms:>6.1f}"
              f" {f'{lv.replicas_max}/{lv.target_max}':>8}  {lv.label}")
    timeline = report.replica_timeline
    print(f"re-ranker replicas: before load {report.replicas_before}, during load max running "
          f"{max((r[1] for r in timeline), default=0)} / max target {max((r[2] for r in timeline), default=0)}, "
          f"right after {report.replicas_after_load}, after {report.config['cooldown_s']:.0f} s idle "
          f"{report.replicas_after_cooldown}")
    print("stage columns: server-side mean ms (timings_ms); enc/retr include queueing on the shared cores;"
          " srv = the ingress's own total; sum50 = p50 of enc+retr+rerank+capt; ovh50 = p50 HTTP - sum50;"
          " prx50 = p50 of (HTTP - srv): client, proxy and the proxy->ingress hop")
    start, end = cfg["load_avg_at_start"][0], cfg.get("load_avg_at_end", [float("nan")])[0]
    flag = "  LOADED: not a result" if start >= LOADED_AT else ""
    print(f"load average (1 min): {start:.2f} at start, {end:.2f} at end{flag}")


# --------------------------------------------------------------------------- main


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 images, 3 s per level")
    parser.add_argument("--images", type=int, default=None, help="corpus size (default 10000; 500 with --quick)")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small"), help="model preset (untrained)")
    parser.add_argument("--shards", type=int, default=2, help="index shards = Retriever deployments")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="client concurrencies (default 1 4 8 16 32; 1 4 8 16 with --quick)")
    parser.add_argument("--rerank", type=int, nargs="+", default=[0, 10, 50])
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--seconds", type=float, default=None, help="per level (default 10; 3 with --quick)")
    parser.add_argument("--max-replicas", type=int, default=3, help="re-ranker autoscaling ceiling")
    parser.add_argument("--sustain", type=float, default=None,
                        help="final level at the heaviest setting, seconds (default 60; 30 with --quick)")
    parser.add_argument("--cooldown", type=float, default=None, help="seconds idle before the last replica count")
    parser.add_argument("--workdir", default=None, help="artifact directory (kept; reused when present)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/serve_bench[_quick].json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: a free one)")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_at_launch = list(os.getloadavg())  # before this run's own Ray start and artifact build
    images = ns.images or (500 if ns.quick else 10_000)
    seconds = ns.seconds or (3.0 if ns.quick else 10.0)
    ns.concurrency = ns.concurrency or ([1, 4, 8, 16] if ns.quick else [1, 4, 8, 16, 32])
    sustain = ns.sustain if ns.sustain is not None else (30.0 if ns.quick else 60.0)
    cooldown = ns.cooldown if ns.cooldown is not None else (15.0 if ns.quick else 40.0)
    for key, value in {**FAST_METRICS_ENV, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                       "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", message=".*look_back_period_s.*")  # the push interval is lowered above

    from ray import serve as ray_serve

    from thinkfast_pipelines.ray_utils import init_ray
    from thinkfast_pipelines.serve import serve
    from thinkfast_pipelines.serve.run import SERVE_FAST_PATH_ENV, set_serve_fast_path_env

    workdir = Path(ns.workdir) if ns.workdir else Path(tempfile.mkdtemp(prefix="serve_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    set_serve_fast_path_env()  # as ``serve()`` does when it starts Ray; an explicit env value wins
    serve_env = {k: os.environ.get(k) for k in SERVE_FAST_PATH_ENV}
    init_ray(num_cpus=max(8, cpus), include_dashboard=False)
    paths, captions, build_s = build_artifacts(workdir, images, ns.preset, ns.shards, ns.seed)

    reranker = {"min_replicas": 1, "max_replicas": ns.max_replicas, "target_ongoing_requests": 2,
                "upscale_delay_s": 2, "downscale_delay_s": 10, "look_back_period_s": 3,
                "max_batch_size": 8, "batch_wait_timeout_s": 0.005, "max_ongoing_requests": 16, "num_cpus": 1}
    args = {**{k: paths[k] for k in ("fast", "slow", "index", "embeddings", "corpus")}, "reranker": reranker,
            "ingress": {"num_cpus": 0.5, "max_ongoing_requests": 256}}
    t = time.perf_counter()
    url = serve(args, port=ns.port or _free_port(), name=APP)
    build_s["serve_start"] = time.perf_counter() - t
    queries = random.Random(ns.seed).sample(captions, min(200, len(captions)))
    asyncio.run(_level(url, queries, max(ns.rerank), ns.k, 2, 0.0, 4))  # warm-up: every stage once
    report = Report(
        config={"images": images, "preset": ns.preset, "shards": ns.shards, "k": ns.k, "seconds_per_level": seconds,
                "reranker": reranker, "cpus": cpus, "machine": f"{platform.machine()} {platform.system()}",
                "load_avg_at_launch": load_at_launch, "load_avg_at_start": list(os.getloadavg()), "quick": ns.quick, "cooldown_s": cooldown,
                "sustain_s": sustain, "serve_env": serve_env, "loaded": os.getloadavg()[0] >= LOADED_AT},
        build_s={k: round(v, 1) for k, v in build_s.items()},
        replicas_before=running_replicas(), replicas_after_load=0, replicas_after_cooldown=None,
    )
    with ReplicaWatcher() as watcher:
        for rerank in ns.rerank:
            for concurrency in ns.concurrency:
                level = measure(url, queries, rerank, concurrency, seconds, ns.k, watcher)
                logger.info("level %s", level)
                report.levels.append(level)
        if sustain > 0:  # long enough for new replicas to load their models and take traffic
            level = measure(url, queries, max(ns.rerank), max(ns.concurrency), sustain, ns.k, watcher)
            level.label = f"sustained {sustain:.0f} s"
            logger.info("sustained level %s", level)
            report.levels.append(level)
        report.replicas_after_load = running_replicas()
        time.sleep(cooldown)
        report.replicas_after_cooldown = running_replicas()
        report.replica_timeline = watcher.samples
    report.config["load_avg_at_end"] = list(os.getloadavg())
    ray_serve.delete(APP)
    print_table(report)
    out = Path(ns.out) if ns.out else RESULTS / ("serve_bench_quick.json" if ns.quick else "serve_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(report), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
