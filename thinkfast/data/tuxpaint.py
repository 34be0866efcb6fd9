"""Debian's ``tuxpaint-stamps-default`` as a corpus of real captioned photos.

The package (GPL-2, about 161 MB) ships about 960 stamp images under
``usr/share/tuxpaint/stamps/<category>/...``, each with a ``.txt`` whose first line is an
English description ("A zebra.", "A great blue heron."); the other lines are
translations. About a third are photo cut-outs, the rest drawings and symbols. It is the
one collection of captioned photographs that reaches an offline machine (through the
distribution's package mirror), so thinkfast can be measured on photos at all.

* :func:`fetch_tuxpaint` downloads the ``.deb`` with ``apt-get download`` and unpacks it
  with ``dpkg-deb -x`` into a cache directory: no system install, no root needed.
* :func:`tuxpaint_items` walks the stamps: the RGBA cut-out is composited on a plain
  background and stored as JPEG; an SVG-only stamp, a missing or empty description, or an
  unreadable PNG becomes a rejected row with its reason.
* The split is deterministic and by *concept*: variants of one stamp
  (``apple_red``, ``apple_granny_smith``) hash together, so a test caption never has a
  near-copy of its image in train.
* ``kind`` tells ``photo`` from ``drawing`` by a colour statistic (drawings are mostly a
  few flat colours; photos are not), corrected by what the stamp's own files say
  (``cartoon`` folders, ``colorable`` / ``tintable`` stamps are drawings). It is a
  heuristic, right for most stamps, not a label.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from typing import Iterator

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from thinkfast.data.loaders import LoadResult, _Item, _Rejected, write_corpus
from thinkfast.errors import DecodeError, ThinkfastError

logger = logging.getLogger(__name__)

PACKAGE = "tuxpaint-stamps-default"
STAMPS_SUBDIR = os.path.join("usr", "share", "tuxpaint", "stamps")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "thinkfast", "tuxpaint")
# split by concept hash: 70% train, 10% val, 20% test (the test split must hold enough queries)
SPLIT_BUCKETS = (("val", range(0, 10)), ("test", range(10, 30)), ("train", range(30, 100)))
KIND_FIELD = pa.field("kind", pa.string())  # "photo" | "drawing"
CATEGORY_FIELD = pa.field("category", pa.string())  # top-level stamp folder: animals, food, ...
FLAT_COLOUR_SHARE = 0.35  # at or above: the 8 commonest colours cover this share of pixels -> drawing


def fetch_tuxpaint(cache_dir: str | None = None) -> str:
    """The unpacked stamps directory, downloading the package into ``cache_dir`` once."""
    cache_dir = os.path.abspath(cache_dir or DEFAULT_CACHE)
    stamps = os.path.join(cache_dir, STAMPS_SUBDIR)
    if os.path.isdir(stamps):
        return stamps
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise ThinkfastError(f"fetching {PACKAGE} needs {tool} (a Debian/Ubuntu system); "
                                 f"or unpack the package yourself and pass its stamps directory")
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        done = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True, timeout=900)
        debs = [f for f in os.listdir(tmp) if f.endswith(".deb")]
        if done.returncode != 0 or not debs:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no .deb downloaded"]
            raise ThinkfastError(f"apt-get download {PACKAGE} failed: {last[0]}")
        unpacked = os.path.join(tmp, "root")
        done = subprocess.run(["dpkg-deb", "-x", os.path.join(tmp, debs[0]), unpacked], capture_output=True,
                              text=True, timeout=900)
        if done.returncode != 0:
            raise ThinkfastError(f"dpkg-deb -x {debs[0]} failed: {done.stderr.strip()[:200]}")
        os.replace(os.path.join(unpacked, "usr"), os.path.join(cache_dir, "usr"))  # atomic: no half-unpacked cache
    logger.info("unpacked %s into %s", PACKAGE, cache_dir)
    return stamps


def concept_of(key: str) -> str:
    """The stamp's concept: its file stem up to the first ``_``, ``-``, digit or space,
    lower-cased (``food/fruit/apple_red`` -> ``apple``)."""
    stem = key.rsplit("/", 1)[-1].lower()
    head = re.split(r"[_\-\s\d.]+", stem, maxsplit=1)[0]
    return head or stem


def split_of_stamp(key: str) -> str:
    bucket = zlib.crc32(concept_of(key).encode("utf-8")) % 100
    for name, buckets in SPLIT_BUCKETS:
        if bucket in buckets:
            return name
    raise AssertionError("unreachable: buckets cover 0..99")


def description(txt_path: str) -> str:
    """The English description: the first line of the stamp's ``.txt``."""
    with open(txt_path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    return first.strip().lstrip("\ufeff").strip()


def flat_colour_share(rgba: np.ndarray) -> float:
    """Share of opaque pixels covered by the 8 commonest colours (5 bits per channel)."""
    opaque = rgba[..., 3] > 200
    pixels = rgba[opaque][:, :3] // 8
    if len(pixels) < 50:
        return 1.0
    codes = pixels[:, 0].astype(np.int32) * 1024 + pixels[:, 1].astype(np.int32) * 32 + pixels[:, 2]
    counts = np.unique(codes, return_counts=True)[1]
    return float(np.sort(counts)[::-1][:8].sum() / len(pixels))


def stamp_kind(key: str, rgba: np.ndarray, dat_text: str) -> str:
    path = key.lower()
    if "cartoon" in path or "colorable" in dat_text or "tintable" in dat_text:
        return "drawing"
    if "photo" in path:
        return "photo"
    return "photo" if flat_colour_share(rgba) < FLAT_COLOUR_SHARE else "drawing"


def composite(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """The cut-out over a plain background (RGB)."""
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def tuxpaint_items(stamps_dir: str, background: tuple[int, int, int] = (255, 255, 255),
                   jpeg_quality: int = 95) -> Iterator["_Item | _Rejected"]:
    """Every stamp with a description, in sorted path order, or its rejection."""
    if not os.path.isdir(stamps_dir):
        raise ThinkfastError(f"{stamps_dir} is not a directory of Tux Paint stamps")
    stems: dict[str, set[str]] = {}
    for root, _dirs, files in os.walk(stamps_dir):
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext in (".png", ".svg", ".txt", ".dat"):
                rel = os.path.relpath(os.path.join(root, stem), stamps_dir).replace(os.sep, "/")
                stems.setdefault(rel, set()).add(ext)
    if not stems:
        raise ThinkfastError(f"{stamps_dir} holds no stamps (.png/.svg with a .txt)")
    for key in sorted(stems):
        exts = stems[key]
        if ".png" not in exts and ".svg" not in exts:
            continue  # a description or settings file of no image (e.g. a folder's notes)
        base = os.path.join(stamps_dir, *key.split("/"))
        if ".txt" not in exts:
            yield _Rejected(key, DecodeError("no_captions", "the stamp has no .txt description"))
            continue
        caption = description(base + ".txt")
        if not caption:
            yield _Rejected(key, DecodeError("no_captions", "the stamp's description is empty"))
            continue
        if ".png" not in exts:
            yield _Rejected(key, DecodeError("unsupported", "SVG-only stamp (no raster image)"))
            continue
        try:
            with Image.open(base + ".png") as img:
                img.load()
                rgba = np.asarray(img.convert("RGBA"))
                rgb = composite(img, background)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            yield _Rejected(key, DecodeError("corrupt", f"{type(exc).__name__}: {exc}"))
            continue
        dat = ""
        if ".dat" in exts:
            with open(base + ".dat", encoding="utf-8", errors="replace") as f:
                dat = f.read()
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=jpeg_quality)
        yield _Item(key=key, captions=[caption], candidates=(base + ".png",), split=split_of_stamp(key),
                    data=buf.getvalue(),
                    extra={"kind": stamp_kind(key, rgba, dat), "category": key.split("/", 1)[0]})


def load_tuxpaint(out: str, stamps_dir: str | None = None, cache_dir: str | None = None,
                  background: tuple[int, int, int] = (255, 255, 255), shard_size: int = 500,
                  s3_endpoint: str | None = None) -> LoadResult:
    """The stamps (fetched into ``cache_dir`` unless ``stamps_dir`` is given) -> corpus Parquet
    with ``key, captions, jpg, split, width, height, kind, category``."""
    stamps_dir = stamps_dir or fetch_tuxpaint(cache_dir)
    return write_corpus(tuxpaint_items(stamps_dir, background), out, "jpg", True, shard_size, s3_endpoint,
                        extra_fields=(KIND_FIELD, CATEGORY_FIELD))
