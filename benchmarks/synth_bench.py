"""Generated-corpus throughput: rows per second written to local Parquet, end to end
(plan, scenes, captions, drawing, encoding, Parquet shards), for images at 64 and 96 px
with one process and with one per core, and for mp4 clips; plus a per-stage split of one
process's time per image. The target (issue 2): 10k images of 64-96 px well under a minute.

The machine's load average is recorded next to each number: on a shared box, other jobs'
CPU use slows these runs and the numbers say so rather than hide it. CPU seconds (this
process and its worker processes, user + system) are recorded too: they barely change
with contention, so ``cpu_s / workers`` estimates the wall time on an idle machine.

    python benchmarks/synth_bench.py            # 10k images per setting, 500 clips
    python benchmarks/synth_bench.py --quick    # 2k images, 100 clips
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("synth_bench")


def dir_mb(path: str) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


def cpu_seconds() -> float:
    """User + system CPU of this process and of its finished (joined) child processes."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_setting(name: str, images: int, size: int, video: bool, workers: int, root: str) -> dict:
    from thinkfast.data.synth import SynthConfig, write_synth

    out = os.path.join(root, name)
    config = SynthConfig(num_images=images, image_size=size, video=video, seed=0)
    load_before = os.getloadavg()[0]
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    result = write_synth(out, config, workers=workers)
    wall = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_before
    row = {"setting": name, "rows": result.num_rows, "image_size": size, "video": video, "workers": workers,
           "seconds": round(wall, 2), "rows_per_s": round(result.num_rows / wall, 1),
           "cpu_seconds": round(cpu, 2), "idle_estimate_s": round(cpu / workers, 2),
           "mb_on_disk": round(dir_mb(out), 1), "load_avg_1min_before": round(load_before, 1),
           "load_avg_1min_after": round(os.getloadavg()[0], 1), "hard_pairs": result.hard_pairs}
    shutil.rmtree(out, ignore_errors=True)
    return row


def stage_split(n: int = 300, size: int = 64) -> dict:
    """ms per image of each stage, one process (scene+captions, drawing, JPEG)."""
    import numpy as np

    from thinkfast.data.synth_caption import make_captions
    from thinkfast.data.synth_render import encode_image, render_frames
    from thinkfast.data.synth_scene import sample_image_scene

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    scenes = [sample_image_scene(rng, size, 1 + i % 3) for i in range(n)]
    t1 = time.perf_counter()
    for s in scenes:
        make_captions(s, 5, rng)
    t2 = time.perf_counter()
    frames = [render_frames(s)[0] for s in scenes]
    t3 = time.perf_counter()
    for f in frames:
        encode_image(f)
    t4 = time.perf_counter()
    ms = lambda a, b: round((b - a) / n * 1000, 3)  # noqa: E731
    return {"images": n, "image_size": size, "scene_ms": ms(t0, t1), "captions_ms": ms(t1, t2),
            "draw_ms": ms(t2, t3), "jpeg_ms": ms(t3, t4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2k images and 100 clips per setting")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/synth_bench[_quick].json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n_img, n_vid = (2000, 100) if args.quick else (10000, 500)
    cores = os.cpu_count() or 1
    settings = [(f"images_{size}px_{w}proc", n_img, size, False, w) for size in (64, 96) for w in sorted({1, cores})]
    settings.append((f"clips_64px_8f_{cores}proc", n_vid, 64, True, cores))
    rows = []
    root = tempfile.mkdtemp(prefix="synth_bench_")
    try:
        for name, n, size, video, workers in settings:
            rows.append(run_setting(name, n, size, video, workers, root))
            print(f"{name}: {rows[-1]['seconds']} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    split = stage_split()
    header = f"{'setting':<26}{'rows':>7}{'wall s':>8}{'rows/s':>9}{'cpu s':>8}{'idle est s':>11}{'MB':>7}{'load':>7}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['setting']:<26}{r['rows']:>7}{r['seconds']:>8}{r['rows_per_s']:>9}{r['cpu_seconds']:>8}"
              f"{r['idle_estimate_s']:>11}{r['mb_on_disk']:>7}{r['load_avg_1min_before']:>7}")
    print(f"\none process, ms per 64 px image: scene {split['scene_ms']}, captions {split['captions_ms']}, "
          f"draw {split['draw_ms']}, jpeg {split['jpeg_ms']}")
    record = {"benchmark": "synth_bench", "quick": args.quick, "cores": cores, "python": platform.python_version(),
              "machine": platform.machine(), "settings": rows, "stage_split_one_process": split,
              "target": "10k images of 64-96 px well under 60 s"}
    path = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"synth_bench{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
