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
from thinkfast.utils.options import HELP, add_config_arguments, config_from_args


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
    add_config_arguments(parser, EvalConfig, exclude=("rerank",))


def run(args: argparse.Namespace) -> int:
    config = config_from_args(EvalConfig, args)
    report = evaluate(args.corpus, args.fast, args.slow, index=args.index, embeddings=args.embeddings,
                      out=args.out, **config.evaluate_kwargs())
    print(f"{report['num_queries']} queries over {report['gallery_size']} items (split {report['split']}), "
          f"{report['rejected_count']} rejected")
    print(format_table(report))
    if not args.out:
        print(json.dumps(report["methods"], indent=2))
    return 0
