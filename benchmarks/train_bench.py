"""Training benchmark: Ray Train throughput, online vs precomputed distillation, accuracy.

One run, one generated corpus, the same cores for every row:

1. **Throughput** (fast objective, NCE): steps/s and pairs/s of
   * ``bare``: one process, the train split decoded into memory up front, the same model,
     objective, optimizer and batch size, torch using every core;
   * ``ray-1`` / ``ray-2``: ``thinkfast_pipelines.train.train_fast`` with 1 and 2 Ray Train workers
     (DDP over gloo; each worker's batch is the same size, so 2 workers do 2x the pairs
     per step). Measured on the last epoch (the decoded split is cached after the first),
     plus the run's whole wall time (Ray start, worker start-up, decode, checkpoints).
2. **Distillation sources**: ``distill`` with the teacher scoring each batch online vs the
   Ray Data precompute job (``thinkfast_pipelines.train.teacher_scores``) + ``distill --teacher-scores``.
3. **Accuracy** (skipped with ``--skip-accuracy``): R@1/5/10 on the test split of fast
   (NCE), fast distilled (online and precomputed) and slow (exhaustive) after the default
   schedule, via ``thinkfast_pipelines.evaluate.evaluate``.

    python benchmarks/train_bench.py             # small preset, 2000 images
    python benchmarks/train_bench.py --quick     # tiny preset, 300 images, 1-2 epochs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("train_bench")
RESULTS = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class Row:
    """One throughput line."""

    name: str  # bare | ray-1 | ray-2
    workers: int  # DDP ranks (1 for bare)
    steps: int  # steps timed
    steps_per_s: float  # optimizer steps per second (last epoch for Ray)
    pairs_per_s: float  # steps/s x batch x workers
    wall_s: float  # whole run incl. start-up (bare: the timed loop only)


def bare_loop(corpus: str, preset: str, batch: int, steps: int, seed: int) -> Row:
    """The ceiling: decoded rows in memory, one process, no Ray, no data pipeline: the
    library's own step (``thinkfast.training.loop.train_step``) over its data order."""
    import itertools

    import torch

    from thinkfast.training import build_config, train_step
    from thinkfast.training.data import ShardRows, inspect_corpus, read_split, to_pairs
    from thinkfast.training.loop import build_model, build_tokenizer, make_optimizer
    from thinkfast.training.objectives import build_objective

    torch.set_num_threads(os.cpu_count() or 1)
    config = build_config({"preset": preset, "batch_size": batch, "seed": seed, "lr": 1e-3, "warmup_steps": 2})
    info = inspect_corpus(corpus)
    model = build_model("fast", config, tokenizer=build_tokenizer(config, info, None))
    rows = ShardRows(read_split(info, "train", model.config.image_size, 1))
    objective = build_objective("fast", model, None, config)
    optimizer = make_optimizer(model, config)
    model.train()
    # epoch after epoch of full batches, as many as the warm-up and the timed steps need
    stream = (to_pairs(raw, seed, epoch) for epoch in itertools.count() for raw in rows.batches(epoch, batch, seed))

    def step(i: int) -> None:
        train_step(objective, optimizer, next(stream), step=i, total_steps=steps, config=config)

    for i in range(2):  # warm-up (allocator, threads)
        step(i)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    seconds = time.perf_counter() - started
    return Row("bare", 1, steps, round(steps / seconds, 3), round(steps * batch / seconds, 1), round(seconds, 2))


def ray_row(corpus: str, work: str, preset: str, batch: int, workers: int, epochs: int, seed: int) -> Row:
    from thinkfast_pipelines.train import train_fast

    started = time.perf_counter()
    result = train_fast(corpus, os.path.join(work, f"fast-ray{workers}"), preset=preset, batch_size=batch,
                        workers=workers, epochs=epochs, seed=seed, val_images=0, lr=1e-3)
    wall = time.perf_counter() - started
    last = result.history[-1]
    steps = last["step"] - (result.history[-2]["step"] if len(result.history) > 1 else 0)
    rate = float(last["steps_per_second"])
    return Row(f"ray-{workers}", workers, steps, round(rate, 3), round(rate * batch * workers, 1), round(wall, 2))


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


def distill_and_accuracy(corpus: str, work: str, preset: str, batch: int, epochs: dict[str, int], workers: int,
                         seed: int, accuracy: bool, max_queries: int) -> dict[str, Any]:
    """The demo's schedule: slow, fast (NCE), distil from the fast model online and from
    precomputed scores; then eval. ``fast (NCE, same steps)`` trains NCE alone for as many
    epochs as fast + distil together: the control that says whether distillation, rather
    than the extra epochs, moved R@1."""
    from thinkfast_pipelines.train.teacher_scores import precompute_teacher_scores
    from thinkfast_pipelines.train import distill, train_fast, train_slow

    common = {"preset": preset, "batch_size": batch, "workers": workers, "seed": seed}
    slow, slow_s = timed(train_slow, corpus, f"{work}/slow", epochs=epochs["slow"], **common)
    fast, fast_s = timed(train_fast, corpus, f"{work}/fast", epochs=epochs["fast"], **common)
    longer, _ = timed(train_fast, corpus, f"{work}/fast_same_steps", epochs=epochs["fast"] + epochs["distill"],
                      **common)
    online, online_s = timed(distill, corpus, f"{work}/distilled", teacher=slow.out, init=fast.out,
                             epochs=epochs["distill"], **common)
    scores, pre_s = timed(precompute_teacher_scores, corpus, slow.out, f"{work}/teacher_scores",
                          block_size=batch, rounds=epochs["distill"], seed=seed, actors=1,
                          cpus_per_actor=max(1, (os.cpu_count() or 1) // workers))
    from_scores, from_s = timed(distill, corpus, f"{work}/distilled_pre", teacher_scores=scores.out,
                                init=fast.out, epochs=1, **common)

    def epoch_seconds(result: Any) -> float:
        return round(sum(h["epoch_seconds"] for h in result.history), 2)

    out: dict[str, Any] = {
        "runs_s": {"train_slow": round(slow_s, 1), "train_fast": round(fast_s, 1), "distill_online": round(online_s, 1),
                   "precompute_teacher_scores": round(pre_s, 1), "distill_from_scores": round(from_s, 1)},
        "training_loop_s": {"distill_online": epoch_seconds(online), "distill_from_scores": epoch_seconds(from_scores)},
        "teacher_scores": scores.to_dict(),
        "schedule": {**epochs, "workers": workers},
        "histories": {"slow": slow.history, "fast": fast.history, "distill_online": online.history,
                      "distill_from_scores": from_scores.history},
    }
    out["distill_speedup_loop"] = round(out["training_loop_s"]["distill_online"]
                                        / max(out["training_loop_s"]["distill_from_scores"], 1e-9), 2)
    out["distill_speedup_end_to_end"] = round(online_s / max(pre_s + from_s, 1e-9), 2)
    if accuracy:
        from thinkfast_pipelines.evaluate import evaluate

        rows = []
        for name, fast_dir in (("fast (NCE)", fast.out),
                               (f"fast (NCE, {epochs['fast'] + epochs['distill']} epochs)", longer.out),
                               ("fast distilled (online)", online.out),
                               ("fast distilled (precomputed)", from_scores.out)):
            report = evaluate(corpus, fast_dir, None, rerank=[], split="test", max_queries=max_queries,
                              fast_name=name)
            rows.append(report["methods"][0])
        report = evaluate(corpus, fast.out, slow.out, rerank=[], split="test", max_queries=max_queries,
                          fast_name="fast (NCE)", slow_name="slow (exhaustive)")
        rows.append(report["methods"][1])  # [fast, slow exhaustive]: the slow model's row
        rows = [{k: r[k] for k in ("method", "R@1", "R@5", "R@10", "median_rank") if k in r} for r in rows]
        out["accuracy"] = rows
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, 300 images")
    parser.add_argument("--images", type=int, help="generated corpus size")
    parser.add_argument("--preset", help="model preset (default small; tiny with --quick)")
    parser.add_argument("--batch-size", type=int, help="pairs per worker per step")
    parser.add_argument("--skip-distill", action="store_true", help="throughput rows only")
    parser.add_argument("--skip-accuracy", action="store_true", help="no test-split R@K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep artifacts here (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS / "train_bench.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                       "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}.items():
        os.environ.setdefault(key, value)

    preset = args.preset or ("tiny" if args.quick else "small")
    images = args.images or (300 if args.quick else 2000)
    batch = args.batch_size or (16 if args.quick else 64)
    # the demo's schedule (what the end-to-end experiment builds on); --quick: one epoch each
    from thinkfast_pipelines.demo import DemoConfig

    demo = DemoConfig()
    epochs = ({"slow": 1, "fast": 1, "distill": 1} if args.quick
              else {"slow": demo.slow_epochs, "fast": demo.fast_epochs, "distill": demo.distill_epochs})
    workers = 1 if args.quick else demo.workers
    work = args.workdir or tempfile.mkdtemp(prefix="train_bench-")

    from thinkfast_pipelines.ray_utils import init_ray
    from thinkfast.data.synth import SynthConfig, write_synth
    from thinkfast.models.config import fast_preset

    corpus = os.path.join(work, "corpus")
    size = fast_preset(preset).image_size
    write_synth(corpus, SynthConfig(num_images=images, captions_per_image=3, image_size=max(size, 32), seed=args.seed),
                overwrite=True)
    init_ray(num_cpus=max(4, os.cpu_count() or 1))
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False

    ray1 = ray_row(corpus, work, preset, batch, 1, 2, args.seed)
    ray2 = ray_row(corpus, work, preset, batch, 2, 2, args.seed)
    bare = bare_loop(corpus, preset, batch, max(ray1.steps, 10), args.seed)
    rows = [bare, ray1, ray2]
    record: dict[str, Any] = {
        "preset": preset, "images": images, "batch_size": batch, "cpus": os.cpu_count(),
        "machine": platform.platform(), "load_average": os.getloadavg(),
        "throughput": [asdict(r) for r in rows],
    }
    if not args.skip_distill:
        record["distill"] = distill_and_accuracy(corpus, work, preset, batch, epochs, workers, args.seed,
                                                 not args.skip_accuracy, 200 if args.quick else 1000)
    record["load_average_end"] = os.getloadavg()

    print(f"\nRay Train throughput ({preset}, batch {batch}/worker, {os.cpu_count()} cores)")
    print(f"{'run':8} {'workers':>7} {'steps':>6} {'steps/s':>8} {'pairs/s':>8} {'wall s':>8} {'vs bare':>8}")
    for r in rows:
        print(f"{r.name:8} {r.workers:7d} {r.steps:6d} {r.steps_per_s:8.2f} {r.pairs_per_s:8.1f} {r.wall_s:8.1f} "
              f"{r.pairs_per_s / bare.pairs_per_s:8.2f}")
    if "distill" in record:
        d = record["distill"]
        print("\nDistillation: online teacher vs precomputed scores")
        for k, v in d["runs_s"].items():
            print(f"  {k:28} {v:8.1f} s")
        print(f"  training-loop speed-up from precomputed scores: {d['distill_speedup_loop']}x; "
              f"end to end (incl. the precompute job): {d['distill_speedup_end_to_end']}x")
        for row in d.get("accuracy", []):
            print(f"  {row['method']:30} R@1 {row['R@1']:6.2f}  R@5 {row['R@5']:6.2f}  R@10 {row['R@10']:6.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1, default=str))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
