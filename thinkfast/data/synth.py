"""The generated compositional corpus: the one data set on which the paper's claims can be
tested offline, and the embedded default of the demo, the tests and the benchmarks.

Rows are scenes of 1-3 shapes (5 shapes x 6 colours x 2 sizes) whose captions state
relations, positions or motions that truly hold (see ``synth_scene`` / ``synth_caption``),
with deliberate *hard pairs*: two rows that differ only in a colour-shape binding, a
relation, a position or the direction of time. Both rows of a pair share their background
and noise and always land in the same split, so evaluation meets them as each other's
distractor; ``hard_pairs(table)`` lists them.

Generation is deterministic for a seed whatever the number of worker processes: the plan
(groups, sizes, splits) is drawn up front from the seed, and each group draws from its own
``default_rng([seed, group])``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa

from thinkfast.data.reader import list_parquet_files, write_table
from thinkfast.data.schema import corpus_schema
from thinkfast.data.synth_caption import make_captions
from thinkfast.data.synth_render import encode_clip, encode_image, render_frames
from thinkfast.data.synth_scene import Scene, make_partner, sample_image_scene, sample_video_scene
from thinkfast.errors import ThinkfastError
from thinkfast.utils import fs as fsutil
from thinkfast.utils.options import option

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_synth.json"  # underscore: corpus readers skip it
SPLITS = ("train", "val", "test")
_PARALLEL_MIN_ROWS = 3000  # default to one process below this corpus size
_MAX_GROUP_TRIES = 1000  # scenes tried per group before the config is declared impossible


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Same config and seed -> byte-identical rows."""

    num_images: int = option(1000, "rows to write (images, or clips with --video)", flag="--images")
    captions_per_image: int = option(5, "paraphrased captions per row (Flickr30K has 5)")
    image_size: int = option(64, "image side in pixels (even, >= 32)")
    video: bool = option(False, "write mp4 clips of moving shapes instead of images")
    num_frames: int = option(8, "frames per clip (--video)", flag="--frames")
    fps: float = option(8.0, "clip frame rate (--video)")
    seed: int = option(0, "same seed, same corpus")
    hard_pair_fraction: float = option(
        0.4, "share of rows in hard pairs (colour swap, relation/position flip, time reverse)", flag="--hard-fraction")
    val_fraction: float = option(0.1, "share of groups in the val split")
    test_fraction: float = option(0.1, "share of groups in the test split")
    object_probs: tuple[float, ...] = option((0.2, 0.5, 0.3), "P(1, 2, 3 objects) per image (clips: 1, 2)", cli=False)
    image_format: Literal["jpeg", "png"] = option(
        "jpeg", "image encoding stored in the jpg column (jpeg: quality 95, 4:4:4)", flag="--format")
    shard_size: int = option(2000, "rows per Parquet file")
    key_prefix: str = option("", 'keys are f"{prefix}{index:07d}"; default "img-" / "vid-"', cli=False)

    def validate(self) -> None:
        if self.num_images < 1:
            raise ThinkfastError(f"--images must be >= 1, got {self.num_images}")
        if self.captions_per_image < 1:
            raise ThinkfastError(f"--captions-per-image must be >= 1, got {self.captions_per_image}")
        if self.image_size < 32 or self.image_size % 2:
            raise ThinkfastError(f"--image-size must be even and >= 32, got {self.image_size}")
        if self.video and self.num_frames < 2:
            raise ThinkfastError(f"--frames must be >= 2 for video, got {self.num_frames}")
        if not 0.0 <= self.hard_pair_fraction <= 1.0:
            raise ThinkfastError(f"hard-pair fraction must be in [0, 1], got {self.hard_pair_fraction}")
        if self.val_fraction < 0 or self.test_fraction < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ThinkfastError("val and test fractions must be >= 0 and sum to less than 1")
        if (len(self.object_probs) != 3 or min(self.object_probs) < 0 or sum(self.object_probs) <= 0
                or (self.video and sum(self.object_probs[:2]) <= 0)):
            raise ThinkfastError(f"object_probs must be 3 non-negative weights for 1, 2, 3 objects "
                                 f"(clips use the first two), got {self.object_probs}")
        if self.image_format not in ("jpeg", "png"):
            raise ThinkfastError(f"image format must be jpeg or png, got {self.image_format!r}")
        if self.shard_size < 1:
            raise ThinkfastError(f"shard size must be >= 1, got {self.shard_size}")

    @property
    def prefix(self) -> str:
        return self.key_prefix or ("vid-" if self.video else "img-")


@dataclass(frozen=True)
class Group:
    """One unit of generation: a lone row or a hard pair (always in the same split)."""

    group: int  # seeds the group's rng
    first: int  # row index of its first row (keys follow from it)
    size: int  # 1 or 2 (hard pair)
    split: str  # "train" | "val" | "test"


@dataclass
class SynthResult:
    """What ``write_synth`` wrote, for the CLI summary, the manifest and benchmarks."""

    out: str
    files: list[str]
    num_rows: int
    splits: dict[str, int]
    hard_pairs: dict[str, int]
    seconds: float
    config: dict = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.num_rows / self.seconds if self.seconds > 0 else float("inf")


def plan_groups(config: SynthConfig) -> list[Group]:
    """Group sizes and splits for the whole corpus, from the seed alone."""
    rng = np.random.default_rng([config.seed, 0x5EED])
    # a group is a pair with probability p, so that pairs hold 2p/(1+p) = fraction of rows
    f = config.hard_pair_fraction
    p_pair = f / (2.0 - f)
    sizes: list[int] = []
    total = 0
    while total < config.num_images:
        size = 2 if (config.num_images - total >= 2 and rng.random() < p_pair) else 1
        sizes.append(size)
        total += size
    n = len(sizes)
    n_test = int(round(n * config.test_fraction))
    n_val = int(round(n * config.val_fraction))
    if n >= 3:  # tiny corpora still get every requested split
        n_test = max(n_test, 1 if config.test_fraction > 0 else 0)
        n_val = max(n_val, 1 if config.val_fraction > 0 else 0)
    order = rng.permutation(n)
    split_of = np.full(n, "train", dtype=object)
    split_of[order[:n_test]] = "test"
    split_of[order[n_test:n_test + n_val]] = "val"
    groups, first = [], 0
    for g, size in enumerate(sizes):
        groups.append(Group(group=g, first=first, size=size, split=str(split_of[g])))
        first += size
    return groups


def _num_objects(rng: np.random.Generator, config: SynthConfig) -> int:
    probs = np.asarray(config.object_probs[:2] if config.video else config.object_probs, dtype=np.float64)
    return int(rng.choice(len(probs), p=probs / probs.sum())) + 1


def _pair_kinds(scene: Scene) -> tuple[str, ...]:
    if scene.is_video:
        # time reversal is the case only video has: weight it 2:1 over a colour swap
        return ("time_reverse", "time_reverse", "colour_swap") if len(scene.objects) > 1 else ("time_reverse",)
    if len(scene.objects) == 1:
        return ("position_flip",)
    return ("colour_swap", "relation_flip")


def _draw_scenes(config: SynthConfig, group: Group, rng: np.random.Generator) -> tuple[list[Scene], list[list[str]]]:
    """Scene(s) and captions of one group; a pair is redrawn until both of its scenes have
    captions that are false of the other."""
    S, C = config.image_size, config.captions_per_image
    for _ in range(_MAX_GROUP_TRIES):
        n = _num_objects(rng, config)
        scene = sample_video_scene(rng, S, n, config.num_frames) if config.video else sample_image_scene(rng, S, n)
        if group.size == 1:
            captions = make_captions(scene, C, rng)
            if captions is not None:
                return [scene], [captions]
            continue
        kinds = _pair_kinds(scene)
        kind = kinds[int(rng.integers(len(kinds)))]
        partner = make_partner(scene, kind, rng)
        if partner is None:
            continue
        caps_a = make_captions(scene, C, rng, partner=partner)
        caps_b = make_captions(partner, C, rng, partner=scene)
        if caps_a is not None and caps_b is not None:
            return [replace(scene, pair={"kind": kind}), replace(partner, pair={"kind": kind})], [caps_a, caps_b]
    raise ThinkfastError(f"no valid scene for group {group.group} after {_MAX_GROUP_TRIES} tries "
                         f"(image size {S}, object probabilities {config.object_probs})")


def generate_group(config: SynthConfig, group: Group) -> list[dict]:
    """The rows of one group: scene(s), captions, encoded media."""
    rng = np.random.default_rng([config.seed, group.group])
    scenes, caption_lists = _draw_scenes(config, group, rng)
    keys = [f"{config.prefix}{group.first + i:07d}" for i in range(group.size)]
    if config.video:
        clips = [render_frames(scenes[0])]
        if group.size == 2:
            reverse = scenes[0].pair is not None and scenes[0].pair["kind"] == "time_reverse"
            # a time-reversed partner is literally the same frames backwards (noise included)
            clips.append(clips[0][::-1] if reverse else render_frames(scenes[1]))
        media = [encode_clip(frames, config.fps) for frames in clips]
    else:
        media = [encode_image(render_frames(s)[0], config.image_format) for s in scenes]
    rows = []
    for i, (scene, captions, data) in enumerate(zip(scenes, caption_lists, media)):
        partner_key = keys[1 - i] if group.size == 2 else None
        rows.append({"key": keys[i], "captions": captions, "media": data, "split": group.split,
                     "width": config.image_size, "height": config.image_size,
                     "scene": scene.to_json(group.group, partner_key)})
    return rows


def generate_table(config: SynthConfig, groups: list[Group]) -> pa.Table:
    """Rows of ``groups`` as one Arrow table in the corpus schema (one Parquet shard)."""
    rows = [row for g in groups for row in generate_group(config, g)]
    media_col = "mp4" if config.video else "jpg"
    schema = corpus_schema(media_col, with_scene=True)
    columns = {
        "key": [r["key"] for r in rows],
        "captions": [r["captions"] for r in rows],
        media_col: [r["media"] for r in rows],
        "split": [r["split"] for r in rows],
        "width": [r["width"] for r in rows],
        "height": [r["height"] for r in rows],
        "scene": [r["scene"] for r in rows],
    }
    return pa.table(columns, schema=schema)


def shard_groups(groups: list[Group], shard_size: int) -> list[list[Group]]:
    """Consecutive groups, about ``shard_size`` rows each; a pair never straddles shards."""
    shards: list[list[Group]] = [[]]
    rows = 0
    for g in groups:
        if rows >= shard_size:
            shards.append([])
            rows = 0
        shards[-1].append(g)
        rows += g.size
    return shards


def _generate_shard(args: tuple[SynthConfig, list[Group]]) -> pa.Table:
    config, groups = args
    return generate_table(config, groups)


def iter_shards(config: SynthConfig, workers: int = 1) -> Iterator[pa.Table]:
    """Shard tables in order; ``workers > 1`` renders shards in spawned processes (spawn,
    not fork: the caller may hold Ray or s3fs threads that a fork would copy mid-flight)."""
    config.validate()
    shards = shard_groups(plan_groups(config), config.shard_size)
    workers = max(1, min(workers, len(shards)))
    if workers == 1:
        for groups in shards:
            yield generate_table(config, groups)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        yield from pool.map(_generate_shard, [(config, g) for g in shards])


def write_synth(out: str, config: SynthConfig, workers: int | None = None, overwrite: bool = False,
                s3_endpoint: str | None = None) -> SynthResult:
    """Generate the corpus into ``out`` (local dir or ``s3://bucket/prefix``) as
    ``part-NNNNN.parquet`` shards plus ``_synth.json`` (config, counts, timing).

    ``workers`` processes are *spawned* (default: one per CPU from 3000 rows up), so a
    script calling this needs the usual ``if __name__ == "__main__":`` guard."""
    config.validate()
    existing = _existing_parquet(out, s3_endpoint)
    if existing and not overwrite:
        raise ThinkfastError(f"{out} already holds {len(existing)} Parquet files; pass --overwrite to replace them")
    if existing:
        fs = fsutil.fsspec_fs(out, s3_endpoint)
        for f in existing:
            fs.rm(fsutil.strip_scheme(f))
    try:
        fsutil.makedirs(out)
    except OSError as exc:
        raise ThinkfastError(f"cannot create {out}: {exc}") from exc
    if workers is None:
        # below a few thousand rows, spawning processes (1-3 s each) costs more than it saves
        workers = (os.cpu_count() or 1) if config.num_images >= _PARALLEL_MIN_ROWS else 1
    start = time.perf_counter()
    files: list[str] = []
    splits = {s: 0 for s in SPLITS}
    pairs: dict[str, int] = {}
    num_rows = 0
    for i, table in enumerate(iter_shards(config, workers)):
        path = fsutil.join(out, f"part-{i:05d}.parquet")
        write_table(table, path, s3_endpoint=s3_endpoint)
        files.append(path)
        num_rows += table.num_rows
        for s in table.column("split").to_pylist():
            splits[s] += 1
        for scene in table.column("scene").to_pylist():
            pair = json.loads(scene)["pair"]
            if pair is not None:
                pairs[pair["kind"]] = pairs.get(pair["kind"], 0) + 1
        logger.info("synth: wrote %s (%d/%d rows)", path, num_rows, config.num_images)
    seconds = time.perf_counter() - start
    result = SynthResult(out=out, files=files, num_rows=num_rows, splits=splits,
                         hard_pairs={k: v // 2 for k, v in sorted(pairs.items())}, seconds=seconds,
                         config=asdict(config))
    manifest = {"config": result.config, "num_rows": num_rows, "splits": splits, "hard_pairs": result.hard_pairs,
                "seconds": round(seconds, 3), "files": [os.path.basename(f) for f in files]}
    try:
        fsutil.write_json(fsutil.join(out, MANIFEST_NAME), manifest, s3_endpoint)
    except OSError as exc:
        raise ThinkfastError(f"cannot write {fsutil.join(out, MANIFEST_NAME)}: {exc}") from exc
    return result


def _existing_parquet(out: str, s3_endpoint: str | None) -> list[str]:
    try:
        return list_parquet_files(out, s3_endpoint)
    except ThinkfastError:
        return []


def hard_pairs(table: pa.Table) -> list[tuple[str, str, str]]:
    """``(key, partner_key, kind)`` for every hard pair in a synth table (each pair once)."""
    out = []
    for key, scene in zip(table.column("key").to_pylist(), table.column("scene").to_pylist()):
        pair = json.loads(scene).get("pair")
        if pair and pair.get("partner") and key < pair["partner"]:
            out.append((key, pair["partner"], pair["kind"]))
    return out
