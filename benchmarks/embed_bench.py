"""Embedding throughput: the Ray Data pipeline vs a bare single-process torch loop.

Both sides embed the same generated corpus with the same untrained ``small`` (or
``tiny``) fast + slow models on the same cores, in one run:

* ``bare``: the images are decoded up front (not timed), then one process runs
  ``FastModel.encode_image`` and ``SlowModel.encode_visual`` over them in batches with
  torch using every core. This is the ceiling: model time only.
* ``pipeline``: ``thinkfast_pipelines.embed.embed`` end to end: Parquet read, decode, the actor
  pool, and writing fast/, tokens/, rejected/ (the ``embed_media`` stage of its
  StageTimer; Ray start-up and the driver's model probe are reported apart).

The ratio pipeline / bare is the price of streaming, decoding and writing (target ≥ 0.9
for ``small``), reported end to end (actor start-up included, which a real corpus
amortises) and steady (first model batch out to last write; decode that ran ahead while
the actors started is not charged, so on a short run this flatters the pipeline: use
enough images that start-up is a small share). Peak memory: the bare process's RSS (it
holds every decoded image), and the sum of RSS over the driver and every Ray process
(workers, raylet, GCS; shared object-store pages count once per process mapping them,
so this over-estimates), sampled every 0.2 s; the idle baseline is printed apart.

    python benchmarks/embed_bench.py            # 2048 images, small preset
    python benchmarks/embed_bench.py --quick    # 512 images
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("embed_bench")
RESULTS = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class Row:
    """One measured line of the table."""

    name: str  # what ran
    images: int  # images embedded
    seconds: float  # timed wall time
    images_per_s: float  # images / seconds
    peak_mem_mib: float  # peak memory (see module docstring for what is summed)
    note: str  # flags


class MemorySampler:
    """Samples the RSS of this process (and, with ``children``, all its descendants:
    Ray's raylet, GCS and workers) in a thread."""

    def __init__(self, interval_s: float = 0.2, children: bool = True) -> None:
        import psutil

        self._psutil = psutil
        self.interval_s = interval_s
        self.children = children
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def total_rss(self) -> int:
        me = self._psutil.Process()
        total = 0
        for p in [me] + (me.children(recursive=True) if self.children else []):
            try:
                total += p.memory_info().rss
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.total_rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "MemorySampler":
        self.peak = self.total_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.total_rss())


def make_assets(workdir: str, images: int, preset: str, image_size: int, seed: int) -> tuple[str, str, str]:
    """Generated corpus + untrained fast/slow models of ``preset`` saved under ``workdir``."""
    from thinkfast.data.reader import read_table
    from thinkfast.data.synth import SynthConfig, write_synth
    from thinkfast.data.tokenizer import WordTokenizer
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel

    corpus = os.path.join(workdir, "corpus")
    write_synth(corpus, SynthConfig(num_images=images, image_size=image_size, seed=seed, shard_size=256))
    captions = [c for row in read_table(corpus, columns=["captions"]).column("captions").to_pylist() for c in row]
    tokenizer = WordTokenizer.build(captions)
    fast_dir, slow_dir = os.path.join(workdir, "fast"), os.path.join(workdir, "slow")
    FastModel.from_preset(preset, tokenizer=tokenizer).save_pretrained(fast_dir)
    SlowModel.from_preset(preset, tokenizer=tokenizer).save_pretrained(slow_dir)
    return corpus, fast_dir, slow_dir


def bare_loop(corpus: str, fast_dir: str, slow_dir: str, batch_size: int, threads: int) -> Row:
    """Decode everything first (untimed), then time the models alone in this process,
    through the same ``thinkfast.encode`` passes the embed actors run."""
    import torch

    from thinkfast.data.decode import decode_rows
    from thinkfast.data.reader import read_table
    from thinkfast.data.schema import validate_corpus_schema
    from thinkfast.encode import image_vectors, visual_tokens
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel

    torch.set_num_threads(threads)
    fast = FastModel.from_pretrained(fast_dir).eval()
    slow = SlowModel.from_pretrained(slow_dir).eval()
    table = read_table(corpus)
    columns = validate_corpus_schema(table.schema)
    size = fast.config.image_size
    decoded = decode_rows(table.select(["key", columns.media]).to_pylist(), columns, size, 8)
    pixels = torch.stack(decoded.pixels)  # (N, 3, S, S)
    with MemorySampler(children=False) as mem:
        start = time.perf_counter()
        image_vectors(fast, pixels, batch_size=batch_size)
        visual_tokens(slow, pixels, batch_size=batch_size)
        seconds = time.perf_counter() - start
    n = len(pixels)
    return Row("bare torch loop", n, seconds, n / seconds, mem.peak / 2**20, f"1 process, {threads} threads, batch {batch_size}")


def bare_full_loop(corpus: str, fast_dir: str, slow_dir: str, out: str, batch_size: int, threads: int,
                   rows_per_write: int) -> Row:
    """The fair baseline for the pipeline: one process doing exactly the pipeline's work,
    with the pipeline's own stage functions, and nothing else. For each ``rows_per_write``
    rows of the corpus Parquet: ``decode_batch`` (decode + preprocess), ``EmbedActor``
    (both models, the same NaN checks and output table) in ``batch_size`` model batches,
    ``write_media_bundle`` (fast/ Parquet + a token-store shard); then
    ``finalize_token_store``. Timed from the first read to the finalized store; model
    loading is left out, as the pipeline's actor start-up is charged only to its
    end-to-end row. Peak memory is this process's RSS."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from thinkfast.data.reader import inspect_corpus
    from thinkfast.store.layout import tokens_dir
    from thinkfast.store.outputs import write_media_bundle
    from thinkfast.store.tokens import finalize_token_store
    from thinkfast_pipelines.embed.config import EmbedConfig
    from thinkfast_pipelines.embed.models import probe_models
    from thinkfast_pipelines.embed.stages import EmbedActor, decode_batch

    info = inspect_corpus(corpus)
    media = info.columns.media
    models = probe_models(fast_dir, slow_dir, media, EmbedConfig())  # image size and frames, as embed() picks them
    actor = EmbedActor(fast_dir, slow_dir, threads=threads, pool_size=1)
    n = 0
    with MemorySampler(children=False) as mem:
        start = time.perf_counter()
        for path in info.files:
            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(batch_size=rows_per_write, columns=["key", media]):
                decoded = decode_batch(pa.Table.from_batches([batch]), columns=info.columns,
                                       image_size=models.image_size, num_frames=models.num_frames)
                parts = [actor(decoded.slice(i, batch_size)) for i in range(0, decoded.num_rows, batch_size)]
                write_media_bundle(out, pa.concat_tables(parts, promote_options="permissive"))
                n += batch.num_rows
        finalize_token_store(tokens_dir(out))
        seconds = time.perf_counter() - start
    return Row("bare full loop", n, seconds, n / seconds, mem.peak / 2**20,
               f"1 process, {threads} threads, batch {batch_size}, {rows_per_write} rows/write: read+decode+models+write")


def pipeline(corpus: str, fast_dir: str, slow_dir: str, out: str, actors: int, batch_size: int,
             threads: int, rows_per_write: int) -> tuple[list[Row], dict]:
    """Run ``embed``: one row end to end (its ``embed_media`` stage, actor start-up
    included) and one steady-state row (first to last write, see EmbeddingSink).
    Memory: peak RSS summed over the driver and every Ray process during the run."""
    from thinkfast_pipelines.embed import EmbedConfig, embed

    config = EmbedConfig(actors=actors, batch_size=batch_size, threads=threads, progress=False,
                         rows_per_write=rows_per_write)
    with MemorySampler() as mem:
        manifest = embed(corpus, out, fast=fast_dir, slow=slow_dir, config=config)
    seconds = manifest["timings_s"]["embed_media"]
    n = manifest["counts"]["embedded"]
    peak = mem.peak / 2**20
    note = f"{actors} actor(s) x {threads} threads, batch {batch_size}, rejected {manifest['counts']['rejected']}"
    rows = [Row(f"pipeline {actors} actor, end to end", n, seconds, n / seconds, peak, note + ", incl. start-up")]
    steady = manifest.get("media_steady_rows_per_s")
    if steady:
        rows.append(Row(f"pipeline {actors} actor, steady", n, n / steady, steady, peak, note + ", after the first model batch (inputs decoded during actor start-up count as free)"))
    return rows, manifest


def _start_ray(cores: int, attempts: int = 3) -> None:
    """Start a local Ray; retried because on a loaded machine the raylet can miss Ray's
    fixed 30 s registration window ("The current node timed out during startup")."""
    import ray

    from thinkfast_pipelines.ray_utils import init_ray

    for attempt in range(1, attempts + 1):
        try:
            init_ray(num_cpus=cores, include_dashboard=False)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception here
            logger.warning("ray start attempt %d/%d failed: %s", attempt, attempts, exc)
            ray.shutdown()
            if attempt == attempts:
                raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 images instead of 2048")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--preset", default="small", choices=("tiny", "small"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rows-per-write", type=int, default=128, help="rows per output file (steady-state resolution)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)

    import ray

    from thinkfast.models.config import fast_preset

    images = args.images or (512 if args.quick else 2048)
    cores = os.cpu_count() or 1
    image_size = fast_preset(args.preset).image_size
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="embed_bench_") as work:
        corpus, fast_dir, slow_dir = make_assets(work, images, args.preset, image_size, args.seed)
        _start_ray(cores)  # first, so the bare loop shares the machine with an idle Ray as well
        try:
            with MemorySampler() as idle:
                pass
            idle_ray_mib = idle.peak / 2**20
            rows.append(bare_loop(corpus, fast_dir, slow_dir, args.batch_size, threads=cores))
            configs = [(1, cores)] + ([(2, max(1, cores // 2))] if cores >= 2 else [])
            manifest = {}
            for actors, threads in configs:
                new, manifest = pipeline(corpus, fast_dir, slow_dir, os.path.join(work, f"out{actors}"), actors,
                                         args.batch_size, threads, args.rows_per_write)
                rows.extend(new)
        finally:
            ray.shutdown()

    bare = rows[0].images_per_s
    print(f"\nembed_bench: {images} images, preset {args.preset} ({image_size} px), {cores} cores\n")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}; driver + idle Ray before the runs: {idle_ray_mib:.0f} MiB")
    print(f"{'run':34s} {'images':>7s} {'s':>7s} {'img/s':>8s} {'ratio':>6s} {'peak MiB':>9s}  note")
    for r in rows:
        print(f"{r.name:34s} {r.images:7d} {r.seconds:7.2f} {r.images_per_s:8.1f} {r.images_per_s / bare:6.2f} {r.peak_mem_mib:9.0f}  {r.note}")
    result = {
        "benchmark": "embed_bench",
        "images": images,
        "preset": args.preset,
        "image_size": image_size,
        "cores": cores,
        "python": platform.python_version(),
        "rows": [asdict(r) | {"ratio_to_bare": round(r.images_per_s / bare, 3)} for r in rows],
        "best_ratio_steady": round(max((r.images_per_s for r in rows if "steady" in r.name), default=0.0) / bare, 3),
        "best_ratio_end_to_end": round(max(r.images_per_s for r in rows if "end to end" in r.name) / bare, 3),
        "load_average_1m": os.getloadavg()[0],
        "driver_plus_idle_ray_mib": round(idle_ray_mib, 1),
        "pipeline_timings_s": manifest.get("timings_s", {}),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "embed_bench_quick.json" if args.quick else "embed_bench.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {RESULTS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
