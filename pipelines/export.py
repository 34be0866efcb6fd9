"""``thinkfast export --format clip-retrieval EMB OUT``: fast embeddings as the layout
clip-retrieval and autofaiss read (``img_emb/``, ``text_emb/``, ``metadata/``).

No Ray: the export streams ``EMB/fast`` one batch at a time and writes one ``.npy`` +
one metadata Parquet per ``--rows-per-file`` rows; the work is
:func:`thinkfast.store.clip_retrieval.export_clip_retrieval`.
"""

from __future__ import annotations

import argparse
import logging

from thinkfast.store.clip_retrieval import DTYPES, ROWS_PER_FILE, ExportSummary, export_clip_retrieval
from thinkfast.utils.paths import user_paths

logger = logging.getLogger(__name__)

FORMATS = ("clip-retrieval",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("embeddings", metavar="EMB", help="`thinkfast embed --out` directory (local or s3://)")
    parser.add_argument("out", metavar="OUT", help="where to write the layout (local or s3://)")
    parser.add_argument("--format", choices=FORMATS, default="clip-retrieval", help="output layout")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="stored vector type; float16 halves the files, as clip-retrieval's own output")
    parser.add_argument("--rows-per-file", type=int, default=ROWS_PER_FILE, help="rows per img_emb_N.npy")
    parser.add_argument("--corpus", default=None,
                        help="corpus for captions and urls (default: the one EMB's manifest names)")
    parser.add_argument("--overwrite", action="store_true", help="replace img_emb/, text_emb/, metadata/ in OUT")
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")


@user_paths("embeddings", "out", "corpus")
def export(embeddings: str, out: str, *, format: str = "clip-retrieval", dtype: str = "float32",  # noqa: A002
           rows_per_file: int = ROWS_PER_FILE, corpus: str | None = None, overwrite: bool = False,
           s3_endpoint: str | None = None) -> ExportSummary:
    """Export the embed output at ``embeddings`` to ``out`` in ``format`` (only clip-retrieval)."""
    return export_clip_retrieval(embeddings, out, dtype=dtype, rows_per_file=rows_per_file, corpus=corpus,
                                 overwrite=overwrite, s3_endpoint=s3_endpoint)


def run(args: argparse.Namespace) -> int:
    summary = export(args.embeddings, args.out, format=args.format, dtype=args.dtype,
                     rows_per_file=args.rows_per_file, corpus=args.corpus, overwrite=args.overwrite,
                     s3_endpoint=args.s3_endpoint)
    texts = "with text_emb/" if summary.texts else "no text_emb/ (embed ran without --texts)"
    print(f"exported {summary.count} {summary.dim}-d vectors ({summary.dtype}) to {summary.out} in "
          f"{summary.parts} part(s), {texts}, captions from {summary.captions_from or 'nowhere (none found)'}")
    return 0


__all__ = ["add_arguments", "run", "export"]
