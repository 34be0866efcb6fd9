"""``thinkfast synth``: write the generated compositional corpus (images or mp4 clips) as
Parquet shards to a local folder or ``s3://``.

No Ray here: generation is CPU-bound numpy/Pillow work that a process pool spreads over the
machine's cores in seconds; the corpus then feeds every Ray stage like any other.
"""

from __future__ import annotations

import argparse
import logging

from thinkfast.data.synth import SynthConfig, SynthResult, write_synth
from thinkfast.utils.options import add_config_arguments, config_from_args
from thinkfast.utils.paths import absolute_uri, user_paths

logger = logging.getLogger(__name__)


@user_paths("out")
def synth(
    out: str,
    images: int = 1000,
    captions_per_image: int = 5,
    image_size: int = 64,
    video: bool = False,
    seed: int = 0,
    frames: int = 8,
    fps: float = 8.0,
    hard_fraction: float = 0.4,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    image_format: str = "jpeg",
    shard_size: int = 2000,
    workers: int | None = None,
    overwrite: bool = False,
    s3_endpoint: str | None = None,
) -> SynthResult:
    """Generate and write the corpus; the Python twin of the CLI subcommand."""
    config = SynthConfig(
        num_images=images, captions_per_image=captions_per_image, image_size=image_size, video=video,
        num_frames=frames, fps=fps, seed=seed, hard_pair_fraction=hard_fraction,
        val_fraction=val_fraction, test_fraction=test_fraction, image_format=image_format,
        shard_size=shard_size,
    )
    return write_synth(out, config, workers=workers, overwrite=overwrite, s3_endpoint=s3_endpoint)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    add_config_arguments(parser, SynthConfig)
    parser.add_argument("--workers", type=int, default=None, help="generator processes (default: CPU count)")
    parser.add_argument("--overwrite", action="store_true", help="replace Parquet files already in --out")
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")


def run(args: argparse.Namespace) -> int:
    config = config_from_args(SynthConfig, args)
    result = write_synth(absolute_uri(args.out), config, workers=args.workers, overwrite=args.overwrite,
                         s3_endpoint=args.s3_endpoint)
    kind = "clips" if config.video else "images"
    splits = ", ".join(f"{k} {v}" for k, v in result.splits.items())
    pairs = ", ".join(f"{k} {v}" for k, v in result.hard_pairs.items()) or "none"
    print(f"wrote {result.num_rows} {kind} ({config.image_size}px) to {result.out} in {len(result.files)} "
          f"Parquet files, {result.seconds:.1f} s ({result.rows_per_s:.0f} {kind}/s)")
    print(f"  splits: {splits}; hard pairs: {pairs}")
    return 0
