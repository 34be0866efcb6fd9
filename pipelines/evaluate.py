"""``thinkfast eval``: text-to-visual retrieval on a corpus split, fast vs slow vs re-ranked.

    thinkfast eval --corpus runs/corpus --fast runs/fast --slow runs/slow --rerank 5 10 20 50

The evaluation is :func:`thinkfast.evaluate.evaluate` (library code, no Ray); this module
is only the command: the paths as flags, the rest generated from
:class:`thinkfast.evaluate.EvalConfig`. The library names are re-exported here because
benchmarks, the demo and the notebook import them from ``thinkfast_pipelines.evaluate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from thinkfast.evaluate import (  # noqa: F401 - re-exported for existing callers
    DEFAULT_RERANK,
    EvalConfig,
    EvalError,
    Gallery,
    Queries,
    evaluate,
    format_table,
    load_gallery,
    make_queries,
)
from thinkfast.evaluation.beta import BETAS, choose_and_save_beta
from thinkfast.evaluation.config import ALL_SPLITS
from thinkfast.evaluation.rerank_config import RERANK_CONFIG
from thinkfast.utils.options import HELP, add_config_arguments, config_from_args

CHOSEN_ON = "val"  # the split --choose-beta tunes on


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="corpus Parquet (local path or s3://)")
    parser.add_argument("--fast", required=True, help="fast model directory or URI")
    parser.add_argument("--slow", help="slow model directory or URI (omit for fast-only metrics)")
    parser.add_argument("--index", help="ShardedIndex URI for the re-ranking's stage 1 (default: exact top-K in memory)")
    parser.add_argument("--embeddings", help="embed output (fast/ + tokens/) to use instead of running the image towers")
    parser.add_argument("--out", help="write the JSON report here (local path or s3://)")
    # zero values ("--rerank" alone) means no re-ranking, which the generated nargs="+" cannot say
    rerank = {f.name: f for f in dataclasses.fields(EvalConfig)}["rerank"]
    parser.add_argument("--rerank", dest="rerank", type=int, nargs="*", default=None, metavar="K",
                        help=rerank.metadata[HELP])
    parser.add_argument("--choose-beta", action="store_true",
                        help="choose beta on the val split (R@1 of the largest --rerank K, over "
                             f"{' '.join(f'{b:g}' for b in BETAS)}), evaluate --split with it, and save it as "
                             "SLOW/rerank_config.json, which thinkfast serve uses unless given --beta")
    add_config_arguments(parser, EvalConfig, exclude=("rerank",))


def _choose_beta(args: argparse.Namespace, config: EvalConfig) -> EvalConfig:
    """``config`` with the β chosen on val (saved beside the slow model for the service)."""
    if not args.slow or not config.rerank:
        raise EvalError("--choose-beta needs --slow and at least one --rerank K (beta weighs the re-ranking)")
    if config.split in (CHOSEN_ON, ALL_SPLITS):
        raise EvalError(f"--choose-beta chooses on the {CHOSEN_ON} split, so --split must be another one "
                        f"(got {config.split!r}): a beta tuned on the rows it is reported on would flatter it")
    # the val rows through the towers, as the demo does (an index or embed output over the whole
    # corpus would bring other splits' items into stage 1)
    chosen = choose_and_save_beta(args.corpus, args.fast, args.slow, k=max(config.rerank), split=CHOSEN_ON,
                                  max_queries=config.max_queries, num_frames=config.num_frames,
                                  batch_size=config.batch_size, seed=config.seed, s3_endpoint=config.s3_endpoint)
    print(f"beta {chosen.beta:g} chosen on {CHOSEN_ON} (R@1 at K={chosen.k}: "
          f"{', '.join(f'{b} -> {r:.1f}' for b, r in chosen.r1_by_beta.items())}); "
          f"saved to {args.slow}/{RERANK_CONFIG}")
    return dataclasses.replace(config, beta=chosen.beta)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(EvalConfig, args)
    if args.choose_beta:
        config = _choose_beta(args, config)
    report = evaluate(args.corpus, args.fast, args.slow, index=args.index, embeddings=args.embeddings,
                      out=args.out, **config.evaluate_kwargs())
    print(f"{report['num_queries']} queries over {report['gallery_size']} items (split {report['split']}), "
          f"{report['rejected_count']} rejected")
    print(format_table(report))
    if not args.out:
        print(json.dumps(report["methods"], indent=2))
    return 0
