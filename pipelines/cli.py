"""The ``thinkfast`` command. Each subcommand lives in its own module under ``pipelines/``
and exposes ``add_arguments(parser)`` and ``run(args) -> int``; the same module exposes a
plain Python function (e.g. ``thinkfast_pipelines.embed.embed(...)``) that ``run`` calls, so the
CLI and the Python API are one code path. Modules are imported only when their
subcommand runs, so ``thinkfast --help`` is instant and nothing heavy loads at import.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from thinkfast.errors import ThinkfastError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("thinkfast_pipelines.synth", "write a generated compositional corpus (images or videos) as Parquet"),
    "embed": ("thinkfast_pipelines.embed", "Ray Data: decode a corpus, write fast embeddings, slow tokens and rejected rows"),
    "train-slow": ("thinkfast_pipelines.train.run", "Ray Train: train the slow cross-attention model (L_CA)"),
    "train-fast": ("thinkfast_pipelines.train.run", "Ray Train: train the fast dual encoder (L_DE, NCE)"),
    "distill": ("thinkfast_pipelines.train.run", "Ray Train: distil a frozen slow teacher into the fast model"),
    "index": ("thinkfast_pipelines.index", "build a sharded FAISS index from fast embeddings"),
    "eval": ("thinkfast_pipelines.evaluate", "text-to-visual retrieval metrics: fast, slow, re-ranked"),
    "serve": ("thinkfast_pipelines.serve.run", "Ray Serve: two-stage search service with HTTP API and page"),
    "search": ("thinkfast_pipelines.search", "query a running service"),
    "demo": ("thinkfast_pipelines.demo", "everything end to end on generated data, local Ray"),
    "submit": ("thinkfast_pipelines.cluster.submit", "run any subcommand as a Ray job on a cluster"),
}


def _load(name: str):
    module = importlib.import_module(COMMANDS[name][0])
    return module


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinkfast", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = _load(name)
            if hasattr(module, "add_arguments_for"):
                module.add_arguments_for(name, p)
            else:
                module.add_arguments(p)
    return parser


def _command_of(argv: list[str]) -> str | None:
    for arg in argv:
        if arg in COMMANDS:
            return arg
        if arg == "--":
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.command:
        parser.print_help()
        return 2
    module = _load(args.command)
    try:
        if hasattr(module, "run_for"):
            return int(module.run_for(args.command, args) or 0)
        return int(module.run(args) or 0)
    except ThinkfastError as exc:
        print(f"thinkfast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"thinkfast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
