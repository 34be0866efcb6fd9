"""thinkfast: type a sentence, get the images (or videos) it describes.

A fast dual encoder narrows a large collection to K candidates through a FAISS index, and
a slow cross-attention model re-ranks them ("Thinking Fast and Slow", Miech et al., CVPR
2021), on Ray: Ray Data embeds, Ray Train trains and distils, Ray Serve answers queries.

Start with `thinkfast demo` (the whole pipeline on generated data, on this machine), then
bring your own corpus (an img2dataset-style Parquet: key, caption(s), jpg/mp4/url) through
`train-slow`, `train-fast`, `distill`, `embed`, `index`, `eval`, `serve` and `search`.
Every subcommand takes --help. Paths may be local or s3://.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from thinkfast.errors import ThinkfastError
from thinkfast_pipelines import console

logger = logging.getLogger(__name__)

# Each subcommand's module exposes add_arguments(parser) (or add_arguments_for(name, parser))
# and run(args) -> int, plus the plain Python function that run() calls; modules load only
# when their subcommand runs, so `thinkfast --help` is instant.
# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("thinkfast_pipelines.synth", "write a generated compositional corpus (images or videos) as Parquet"),
    "corpus": ("thinkfast_pipelines.corpus", "write a public caption collection (Tux Paint photos, Karpathy, VATEX) as a corpus"),
    "embed": ("thinkfast_pipelines.embed", "Ray Data: decode a corpus, write fast embeddings, slow tokens and rejected rows"),
    "train-slow": ("thinkfast_pipelines.train.run", "Ray Train: train the slow cross-attention model (L_CA)"),
    "train-fast": ("thinkfast_pipelines.train.run", "Ray Train: train the fast dual encoder (L_DE, NCE)"),
    "distill": ("thinkfast_pipelines.train.run", "Ray Train: distil a frozen slow teacher into the fast model"),
    "index": ("thinkfast_pipelines.index", "build a sharded FAISS index from fast embeddings"),
    "export": ("thinkfast_pipelines.export", "write fast embeddings as clip-retrieval's layout (img_emb/, metadata/)"),
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
    parser = argparse.ArgumentParser(prog="thinkfast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's and the libraries' logs (and tracebacks) on the terminal")
    parser.add_argument("--log-file", metavar="PATH",
                        help="where those logs go otherwise (default: DEMO_WORKDIR/thinkfast.log for demo, "
                             "~/.local/state/thinkfast/logs/COMMAND-TIME.log for other long commands)")
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


# commands that run long enough to start Ray or heavy libraries: they log to a file
LONG_RUNNING = {"embed", "train-slow", "train-fast", "distill", "index", "eval", "serve", "demo", "submit"}


def _log_path(args: argparse.Namespace) -> str | None:
    if args.log_file:
        return os.path.abspath(args.log_file)
    if args.command == "demo":
        from thinkfast_pipelines.demo import workdir_of

        return os.path.join(os.path.abspath(workdir_of(args)), "thinkfast.log")
    if args.command in LONG_RUNNING:
        return console.default_log_file(args.command)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    log_path = _log_path(args)
    console.setup(args.verbose, log_path)
    if log_path and not args.verbose:
        print(f"thinkfast {args.command}: logs in {log_path} (-v shows them here)", file=sys.stderr, flush=True)
    logger.info("thinkfast %s", " ".join(argv))
    module = _load(args.command)
    where = f" (log: {log_path})" if log_path else ""
    try:
        if hasattr(module, "run_for"):
            return int(module.run_for(args.command, args) or 0)
        return int(module.run(args) or 0)
    except ThinkfastError as exc:
        logger.error("thinkfast %s failed", args.command, exc_info=True)
        code = getattr(exc, "exit_code", 2)
        print(f"thinkfast {args.command}: error: {exc}" + (where if code != 2 else ""), file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"thinkfast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - anything else: one line here, the traceback in the log
        logger.error("thinkfast %s failed", args.command, exc_info=True)
        if args.verbose:
            raise
        storage = console.storage_failure(exc)
        if storage:  # unreachable / unwritable storage is the user's to fix: one line, exit 2
            print(f"thinkfast {args.command}: error: {storage}", file=sys.stderr)
            return 2
        print(f"thinkfast {args.command}: error: {console.failure_reason(exc)}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
