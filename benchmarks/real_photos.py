"""Real photos: pretrained vs from-scratch towers on the Tux Paint stamps, and the unseen-concept case.

    python benchmarks/real_photos.py                    # seeds 0 1 2 pretrained, seed 0 from scratch
    python benchmarks/real_photos.py --seeds 11 12 --scratch-seeds 11
    python benchmarks/real_photos.py --quick            # 1 epoch each, one seed: the code path only

The corpus is ``thinkfast corpus tuxpaint`` (785 stamps, concept-grouped 70/10/20 split, so
most test concepts never occur in a train caption). Every model is trained in-process with
the library's ``thinkfast.training.fit`` (the step Ray Train runs) on the ``photo`` preset:
EfficientNet-Lite0 + MiniLM, with

* **pretrained**: ImageNet weights, the whole trunk frozen, trained on cached trunk
  features (``cache_frozen``), MiniLM frozen (``freeze_text``);
* **scratch**: the same architecture with a randomly initialised trunk that trains
  (MiniLM is still the pretrained text tower: the comparison is about the image side).

Rows, on the test split (every test caption a query): the untrained photo fast model
(zero-shot, ConSE through the ImageNet class names), fast (NCE), fast distilled, slow
exhaustive, and the distilled fast top-K re-ranked by the slow model (``h + β·s_fast``, β
chosen on the val split), each also on the *unseen* queries (``thinkfast.evaluation.unseen``).
Prints a table (mean ± std over seeds) and writes ``benchmarks/results/real_photos.json``.
Nothing is tuned on the test split; the load average is recorded at start and end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("benchmarks.real_photos")
RESULTS = REPO / "benchmarks" / "results"
EPOCHS = {"slow": 10, "fast": 6, "distill": 2}  # the demo --real schedule
RERANK = (5, 10, 20)


def _init_models(root: str, corpus: str, seed: int, pretrained: bool) -> tuple[str, str]:
    """Untrained photo-preset fast and slow models (seeded), saved as the runs' ``init``."""
    import torch

    from thinkfast.data.tokenizer import WordTokenizer
    from thinkfast.models.config import fast_preset, slow_preset
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast.training.data import inspect_corpus

    def vision(config: Any) -> Any:
        if pretrained:
            return config
        return dataclasses.replace(config, vision=dataclasses.replace(config.vision, pretrained=None, frozen_stages=0))

    torch.manual_seed(seed)
    fast_dir, slow_dir = os.path.join(root, "init_fast"), os.path.join(root, "init_slow")
    FastModel.from_config(vision(fast_preset("photo"))).save_pretrained(fast_dir)
    words = WordTokenizer.build(inspect_corpus(corpus).train_captions)
    SlowModel.from_config(vision(slow_preset("photo")), tokenizer=words).save_pretrained(slow_dir)
    return fast_dir, slow_dir


def _fit_or_reuse(objective: str, corpus: str, out: str, reuse: bool, **kwargs: Any) -> dict[str, Any]:
    """Train, or with ``reuse`` take a finished run's ``training.json`` in ``out`` (a resumed
    benchmark re-evaluates what it trained before instead of training it again)."""
    from thinkfast.training import TRAINING_FILE, fit

    saved = os.path.join(out, TRAINING_FILE)
    if reuse and os.path.exists(saved):
        logger.info("reusing %s", out)
        return json.loads(Path(saved).read_text())
    return fit(objective, corpus, out, **kwargs).to_dict()


def run_one(corpus: str, root: str, seed: int, pretrained: bool, epochs: dict[str, int], reuse: bool = False,
            fast_only: bool = False) -> dict[str, Any]:
    """Train slow, fast (NCE) and distilled fast for one (seed, init); evaluate on test.
    ``fast_only``: only the fast (NCE) model (the from-scratch comparison of the image tower
    at a fraction of the cost: a trained 224 px trunk is most of it)."""
    from thinkfast.evaluate import evaluate
    from thinkfast.evaluation.beta import choose_beta
    from thinkfast.evaluation.unseen import subset_rows, unseen_mask
    from thinkfast.training.data import inspect_corpus

    os.makedirs(root, exist_ok=True)
    common = {"preset": "photo", "seed": seed}
    started = time.perf_counter()
    init_fast, init_slow = os.path.join(root, "init_fast"), os.path.join(root, "init_slow")
    if not (reuse and os.path.exists(os.path.join(init_slow, "config.json"))):
        init_fast, init_slow = _init_models(root, corpus, seed, pretrained)
    times = {"init": time.perf_counter() - started}
    runs = {}
    stages = [("slow", "slow", {"init": init_slow}), ("fast_nce", "fast", {"init": init_fast}),
              ("fast", "distill", {"init": os.path.join(root, "fast_nce"), "teacher": os.path.join(root, "slow")})]
    for name, objective, kwargs in stages[1:2] if fast_only else stages:
        t0 = time.perf_counter()
        runs[name] = _fit_or_reuse(objective, corpus, os.path.join(root, name), reuse, epochs=epochs[objective],
                                   **common, **kwargs)
        times[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    beta, beta_scores = (None, {}) if fast_only else choose_beta(corpus, os.path.join(root, "fast"),
                                                                 os.path.join(root, "slow"))
    times["beta"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    reports = []
    if pretrained:
        reports.append(evaluate(corpus, init_fast, None, rerank=[], precision=False, fast_name="zero-shot (ConSE)",
                                per_query_ranks=True))
    reports.append(evaluate(corpus, os.path.join(root, "fast_nce"), None, rerank=[], precision=False,
                            fast_name="fast (NCE)", per_query_ranks=True))
    if not fast_only:
        reports.append(evaluate(corpus, os.path.join(root, "fast"), os.path.join(root, "slow"), rerank=list(RERANK),
                                beta=beta, precision=False, fast_name="fast distilled", per_query_ranks=True))
    times["eval"] = time.perf_counter() - t0
    mask = unseen_mask(reports[-1]["queries"], inspect_corpus(corpus).train_captions)
    rows, unseen = [], []
    for report in reports:
        rows += report["methods"]
        unseen += subset_rows(report, mask)
    return {"seed": seed, "init": "pretrained" if pretrained else "scratch", "beta": beta, "beta_val_r1": {str(b): r for b, r in beta_scores.items()},
            "queries": len(mask), "unseen_queries": int(mask.sum()), "rows": rows, "unseen_rows": unseen,
            "train_val_r1": {k: (r["history"][-1].get("val_r1") if r["history"] else None) for k, r in runs.items()},
            "seconds": {k: round(v, 1) for k, v in times.items()}}


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of every (init, method) row, all queries and unseen ones."""
    table: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for result in results:
        for subset, key in (("all", "rows"), ("unseen", "unseen_rows")):
            for row in result[key]:
                name = row["method"].replace(" [unseen]", "")
                table.setdefault((result["init"], subset, name), []).append(row)
    out = []
    for (init, subset, method), rows in table.items():
        entry: dict[str, Any] = {"init": init, "queries": subset, "method": method, "seeds": len(rows)}
        for metric in ("R@1", "R@5", "R@10", "median_rank"):
            values = np.array([r[metric] for r in rows], dtype=float)
            entry[metric] = round(float(values.mean()), 2)
            entry[f"{metric}_std"] = round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 2)
        out.append(entry)
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'init':<10} {'queries':<7} {'method':<34} {'seeds':>5} {'R@1':>12} {'R@5':>12} {'R@10':>12} {'medR':>6}"]
    for r in rows:
        cell = lambda m: f"{r[m]:5.1f} ± {r[m + '_std']:4.1f}"  # noqa: E731
        lines.append(f"{r['init']:<10} {r['queries']:<7} {r['method']:<34} {r['seeds']:>5} {cell('R@1'):>12} "
                     f"{cell('R@5'):>12} {cell('R@10'):>12} {r['median_rank']:>6.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/real_photos")
    parser.add_argument("--corpus", help="an existing Tux Paint corpus (default: build one under --workdir)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the pretrained runs")
    parser.add_argument("--scratch-seeds", type=int, nargs="*", default=[0],
                        help="seeds of the from-scratch runs (each trains the 224 px trunk: ~5x the cost)")
    parser.add_argument("--scratch-fast-only", action="store_true",
                        help="from scratch, train and report only the fast (NCE) model (its 224 px trunk is most of the cost)")
    parser.add_argument("--reuse", action="store_true",
                        help="re-evaluate runs already trained under --workdir (their training.json) instead of training them again")
    parser.add_argument("--quick", action="store_true", help="1 epoch per stage, seed 0 only")
    parser.add_argument("--out", default=str(RESULTS / "real_photos.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_start = os.getloadavg()[0]
    epochs = {k: 1 for k in EPOCHS} if args.quick else dict(EPOCHS)
    seeds, scratch = ([0], [0]) if args.quick else (args.seeds, args.scratch_seeds)
    corpus = args.corpus
    if not corpus:
        from thinkfast.data.tuxpaint import load_tuxpaint

        corpus = os.path.abspath(os.path.join(args.workdir, "corpus"))
        load_tuxpaint(corpus)
    started = time.perf_counter()
    results = []
    for pretrained, seed_list in ((True, seeds), (False, scratch)):
        for seed in seed_list:
            root = os.path.abspath(os.path.join(args.workdir, f"{'pretrained' if pretrained else 'scratch'}-{seed}"))
            results.append(run_one(corpus, root, seed, pretrained, epochs, reuse=args.reuse,
                                   fast_only=args.scratch_fast_only and not pretrained))
            logger.info("done %s seed %d in %s", results[-1]["init"], seed, results[-1]["seconds"])
    rows = aggregate(results)
    summary = {"corpus": corpus, "epochs": epochs, "seeds": seeds, "scratch_seeds": scratch,
               "scratch_fast_only": args.scratch_fast_only, "reused": args.reuse, "table": rows,
               "runs": results, "seconds": round(time.perf_counter() - started, 1),
               "load_average": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}}
    print(format_table(rows))
    print(f"load average {summary['load_average']}; {summary['seconds']:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
