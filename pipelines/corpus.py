"""``thinkfast corpus``: turn a public caption collection into thinkfast's corpus Parquet.

* ``tuxpaint``: Debian's ``tuxpaint-stamps-default`` (real captioned photo cut-outs and
  drawings), fetched with ``apt-get download`` into a cache on first use;
* ``karpathy``: Flickr30K / COCO Karpathy-split JSON plus its image folder;
* ``vatex``: VATEX JSON plus its clip folder;
* ``img2dataset``: what ``img2dataset --output_format parquet|webdataset`` wrote (``thinkfast
  embed`` reads that directly too; this gives the corpus layout, with splits, for training).

No Ray here: these are one pass over files; the result feeds every Ray stage.
"""

from __future__ import annotations

import argparse
import logging
import time

from thinkfast.data.loaders import LoadResult, load_img2dataset, load_karpathy, load_vatex
from thinkfast.data.tuxpaint import DEFAULT_CACHE, load_tuxpaint
from thinkfast.utils.paths import user_paths

logger = logging.getLogger(__name__)


@user_paths("out", "stamps_dir", "cache_dir")
def tuxpaint_corpus(out: str, stamps_dir: str | None = None, cache_dir: str | None = None,
                    s3_endpoint: str | None = None) -> LoadResult:
    """The Tux Paint stamps as a corpus (see ``thinkfast.data.tuxpaint``)."""
    return load_tuxpaint(out, stamps_dir=stamps_dir, cache_dir=cache_dir, s3_endpoint=s3_endpoint)


@user_paths("json", "images", "out")
def karpathy_corpus(json: str, images: str, out: str, embed: bool = True,
                    s3_endpoint: str | None = None) -> LoadResult:
    return load_karpathy(json, images, out, embed=embed, s3_endpoint=s3_endpoint)


@user_paths("json", "videos", "out")
def vatex_corpus(json: str, videos: str, out: str, split: str | None = None, embed: bool = True,
                 s3_endpoint: str | None = None) -> LoadResult:
    return load_vatex(json, videos, out, split=split, embed=embed, s3_endpoint=s3_endpoint)


@user_paths("input", "out")
def img2dataset_corpus(input: str, out: str, s3_endpoint: str | None = None) -> LoadResult:
    return load_img2dataset(input, out, s3_endpoint=s3_endpoint)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)
    t = sub.add_parser("tuxpaint", help="Debian's Tux Paint stamps: real captioned photos and drawings",
                       description="Fetch tuxpaint-stamps-default (apt-get download + dpkg-deb -x, no install) "
                                   "and write it as a corpus with split and kind (photo/drawing) columns.")
    t.add_argument("--stamps-dir", default=None, help="an unpacked stamps folder (skips the download)")
    t.add_argument("--cache-dir", default=None, help=f"where the package is unpacked (default {DEFAULT_CACHE})")
    k = sub.add_parser("karpathy", help="Flickr30K / COCO Karpathy-split JSON + image folder")
    k.add_argument("--json", required=True)
    k.add_argument("--images", required=True, help="image folder (local or s3://)")
    v = sub.add_parser("vatex", help="VATEX JSON + clip folder")
    v.add_argument("--json", required=True)
    v.add_argument("--videos", required=True, help="clip folder (local or s3://)")
    v.add_argument("--split", choices=("train", "val", "test"), default=None)
    i = sub.add_parser("img2dataset", help="img2dataset output (--output_format parquet or webdataset)",
                       description="Copy img2dataset's rows into a corpus with captions, a key-hash split and the url; "
                                   "rows img2dataset failed on go to _rejected.parquet with its status and message.")
    i.add_argument("--input", required=True, help="img2dataset's output folder (local or s3://)")
    for p in (t, k, v, i):
        p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
        p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    for p in (k, v):
        p.add_argument("--no-embed", action="store_true", help="store a url column instead of the bytes")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.source == "tuxpaint":
        result = tuxpaint_corpus(args.out, args.stamps_dir, args.cache_dir, args.s3_endpoint)
    elif args.source == "karpathy":
        result = karpathy_corpus(args.json, args.images, args.out, not args.no_embed, args.s3_endpoint)
    elif args.source == "img2dataset":
        result = img2dataset_corpus(args.input, args.out, args.s3_endpoint)
    else:
        result = vatex_corpus(args.json, args.videos, args.out, args.split, not args.no_embed, args.s3_endpoint)
    splits = ", ".join(f"{k or '(none)'} {v}" for k, v in sorted(result.splits.items()))
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(result.rejected.items())) or "none"
    print(f"wrote {result.num_rows} rows to {result.out} in {len(result.files)} Parquet files, "
          f"{time.perf_counter() - start:.1f} s")
    print(f"  splits: {splits}; rejected: {rejected}")
    return 0
