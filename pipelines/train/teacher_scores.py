"""Precompute the frozen teacher's distillation scores with a Ray Data batch job.

The slow teacher is frozen, so ``h(x, y)`` is a pure function of the pair and can be
computed once, by an actor pool, instead of inside every distillation step (where each
step pays ``B^2`` decoder passes). What is precomputed is exactly what online distillation
uses: the train split is shuffled into *blocks* of ``block_size`` images, one caption is
sampled per image, and for each block the full ``(B, B)`` matrix ``h[i, j] = h(x_j, y_i)``
is stored. ``distill --teacher-scores`` then trains on these blocks (one block = one step's
batch, B_i = the block's images), with no teacher in the loop.

Output (``out``): Parquet rows, one per block: ``block`` (int), ``round`` (int), ``keys`` /
``captions`` / ``rejected`` (JSON lists), ``media`` (list of the members' encoded bytes or
URLs, so the student decodes them at its own resolution without joining the corpus again),
``scores`` (list<float32>, the B x B matrix row-major); plus ``manifest.json`` (teacher
identity, block size, rounds, counts). Rows that fail to decode are kept in ``rejected``
(key + reason) and left out of their block's matrix, never silently dropped. ``rounds > 1``
stores that many independent shufflings (more distinct B_i per image; a distillation epoch
then covers each image ``rounds`` times), one ``round-NNNNN/`` directory each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from thinkfast.utils.paths import user_paths
from thinkfast.errors import CheckpointError, ThinkfastError
from thinkfast.utils import fs

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TeacherScoresResult:
    """What the job wrote (also in ``manifest.json``)."""

    out: str  # output directory (local or s3://)
    teacher: str  # the teacher model directory
    teacher_identity: str  # SlowModel.identity of that teacher
    blocks: int  # blocks written (rows of the output)
    pairs: int  # scored (image, caption) pairs = sum of block sizes
    rejected: int  # rows that failed to decode (listed per block)
    block_size: int  # images per block (the last block of a round may be smaller)
    rounds: int  # independent shufflings stored
    media: str  # corpus media column the blocks carry (jpg | mp4 | url)
    seconds: float  # wall time of the job

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _select_split(batch: pa.Table, columns: Any, split: str) -> pa.Table:
    from thinkfast.data.splits import select_split

    return select_split(batch, split, columns.key)


class TeacherBlockScorer:
    """Ray Data actor: decodes one block of rows and scores all its (caption, image) pairs."""

    def __init__(self, teacher: str, columns: Any, round_index: int, seed: int, num_frames: int,
                 torch_threads: int) -> None:
        import torch

        from thinkfast.training.loop import load_teacher

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.teacher = load_teacher(teacher)
        self.columns = columns
        self.round = round_index
        self.seed = seed
        self.num_frames = num_frames

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        import torch

        from thinkfast.data.decode import decode_rows
        from thinkfast.data.media import captions_of
        from thinkfast.training.objectives import teacher_score_matrix

        cols = self.columns
        decoded = decode_rows(batch.to_pylist(), cols, self.teacher.config.image_size, self.num_frames,
                              key_column=cols.key, require_captions=True)
        rejected = [[str(r.key), f"{r.reason}: {r.detail}"] for r in decoded.rejects]
        keys, captions, media, pixels = [], [], [], []
        for row, array in zip(decoded.rows, decoded.pixels):
            key = str(row[cols.key])
            caps = captions_of(row, cols)
            rng = np.random.default_rng([self.seed, self.round, zlib.crc32(key.encode("utf-8"))])
            keys.append(key)
            captions.append([caps[int(rng.integers(len(caps)))]])
            media.append(row[cols.media])
            pixels.append(array)
        if keys:
            with torch.inference_mode():
                scores = teacher_score_matrix(self.teacher, torch.stack(pixels), [c[0] for c in captions])
            flat = scores.cpu().numpy().astype(np.float32).reshape(-1)
        else:
            flat = np.zeros(0, dtype=np.float32)
        block_id = zlib.crc32(json.dumps(keys + [k for k, _ in rejected]).encode("utf-8"))
        return {
            "block": np.array([block_id], dtype=np.int64),
            "round": np.array([self.round], dtype=np.int64),
            "keys": np.array([json.dumps(keys)], dtype=object),
            "captions": np.array([json.dumps(captions)], dtype=object),
            "rejected": np.array([json.dumps(rejected)], dtype=object),
            "media": _one_list(media),
            "scores": _one_list(list(flat)),
        }


def _one_list(values: list[Any]) -> np.ndarray:
    """A length-1 object column holding one list (Ray Data stores it as list<...>)."""
    out = np.empty(1, dtype=object)
    out[0] = values
    return out


@user_paths("corpus", "out", models=("teacher",))
def precompute_teacher_scores(corpus: str, teacher: str, out: str, *, block_size: int = 64, rounds: int = 1,
                              seed: int = 0, num_frames: int = 8, actors: int = 1,
                              cpus_per_actor: float = 1.0) -> TeacherScoresResult:
    """Run the job; see the module docstring. ``block_size`` should equal the distillation
    batch size (the blocks *are* its batches)."""
    import ray
    import ray.data

    from thinkfast_pipelines.ray_utils import init_ray
    from thinkfast.training.data import inspect_corpus
    from thinkfast.models.slow import SlowModel

    if block_size < 2 or rounds < 1 or actors < 1:
        raise ThinkfastError("need block_size >= 2, rounds >= 1 and actors >= 1")
    if not fs.exists(fs.join(teacher, "config.json")):
        raise CheckpointError(f"--teacher {teacher} is not a model directory (no config.json)")
    started = time.perf_counter()
    if not ray.is_initialized():
        init_ray(num_cpus=None if os.environ.get("RAY_ADDRESS") else (os.cpu_count() or 1) + 2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    _check_room(actors * cpus_per_actor, joined=bool(os.environ.get("RAY_ADDRESS")))
    identity = SlowModel.from_pretrained(teacher).identity
    info = inspect_corpus(corpus)
    columns = info.columns
    threads = max(1, int(cpus_per_actor))
    # One round at a time, each written to its own ``round-NNNNN/`` directory. A union of
    # per-round pipelines would need one actor pool per round at once: with more rounds
    # than the cluster has room for teacher actors, the pools wait on each other forever.
    stats: list[dict[str, Any]] = []
    for r in range(rounds):
        ds = ray.data.read_parquet(list(info.files), columns=columns.read_columns())
        ds = ds.map_batches(_select_split, batch_format="pyarrow", fn_kwargs={"columns": columns, "split": "train"})
        ds = ds.random_shuffle(seed=seed + r)
        ds = ds.map_batches(
            TeacherBlockScorer,
            batch_format="pyarrow",
            batch_size=block_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
            fn_constructor_kwargs={"teacher": teacher, "columns": columns, "round_index": r, "seed": seed,
                                   "num_frames": num_frames, "torch_threads": threads},
        ).materialize()
        stats += ds.map_batches(_block_stats, batch_format="pyarrow").take_all()
        ds.write_parquet(_round_dir(out, r), mode=ray.data.SaveMode.OVERWRITE)
        logger.info("teacher scores: round %d/%d done (%.1f s so far)", r + 1, rounds, time.perf_counter() - started)
    result = TeacherScoresResult(
        out=out, teacher=teacher, teacher_identity=identity, blocks=len(stats),
        pairs=sum(s["pairs"] for s in stats), rejected=sum(s["rejected"] for s in stats),
        block_size=block_size, rounds=rounds, media=columns.media, seconds=time.perf_counter() - started,
    )
    fs.write_json(fs.join(out, MANIFEST), result.to_dict())
    logger.info("teacher scores: %d blocks, %d pairs, %d rejected rows in %.1f s -> %s",
                result.blocks, result.pairs, result.rejected, result.seconds, out)
    return result


def _check_room(actor_cpus: float, joined: bool) -> None:
    """The actor pool starts before the read and shuffle tasks run: if it takes every CPU,
    they never get one and the job waits forever. Fail fast locally; on a joined cluster an
    autoscaler may still add nodes, so only warn there."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0))
    if actor_cpus < total:
        return
    message = (f"teacher actors need {actor_cpus:g} CPUs but the cluster has {total:g}: nothing would be left "
               f"for reading the corpus; lower --actors / --cpus-per-actor")
    if joined:
        logger.warning(message)
        return
    raise ThinkfastError(message)


def _round_dir(out: str, round_index: int) -> str:
    return fs.join(out, f"round-{round_index:05d}")


def _block_stats(batch: pa.Table) -> pa.Table:
    keys = [len(json.loads(k)) for k in batch.column("keys").to_pylist()]
    rejected = [len(json.loads(r)) for r in batch.column("rejected").to_pylist()]
    return pa.table({"pairs": keys, "rejected": rejected})


def read_manifest(uri: str) -> dict[str, Any]:
    path = fs.join(uri, MANIFEST)
    if not fs.exists(path):
        raise ThinkfastError(f"{uri} is not a teacher-scores directory (no {MANIFEST}); run thinkfast_pipelines.train.teacher_scores")
    return fs.read_json(path)


def _decode_blocks(batch: pa.Table, columns: Any, image_size: int, num_frames: int) -> dict[str, np.ndarray]:
    """Block rows -> the grouped row format of the train loop (pixels (G, ...), scores (G, G))."""
    from thinkfast.data.decode import decode_rows
    from thinkfast.training.data import PIXEL_DTYPE

    out: dict[str, list[Any]] = {"key": [], "captions": [], "reject": [], "pixels": [], "scores": [], "group_size": []}
    for row in batch.to_pylist():
        keys = json.loads(row["keys"])
        n = len(keys)
        if n == 0:
            continue  # a block whose every row was rejected: its rejects are in the manifest counts
        members = [{columns.key: key, columns.media: media} for key, media in zip(keys, row["media"])]
        decoded = decode_rows(members, columns, image_size, num_frames, key_column=columns.key)
        if not decoded.rows:
            continue
        pixels = {str(m[columns.key]): np.ascontiguousarray(p.numpy(), dtype=PIXEL_DTYPE)
                  for m, p in zip(decoded.rows, decoded.pixels)}
        reasons = {str(r.key): f"{r.reason}: {r.detail}" for r in decoded.rejects}
        shape = next(iter(pixels.values())).shape
        out["key"].append(json.dumps(keys))
        out["captions"].append(json.dumps(json.loads(row["captions"])))
        out["reject"].append(json.dumps([reasons.get(str(k), "") for k in keys]))
        out["pixels"].append(np.stack([pixels.get(str(k), np.zeros(shape, dtype=PIXEL_DTYPE)) for k in keys]))
        out["scores"].append(np.asarray(row["scores"], dtype=np.float32).reshape(n, n))
        out["group_size"].append(n)
    result = {k: np.array(v, dtype=object) for k, v in out.items() if k in ("key", "captions", "reject")}
    result["group_size"] = np.array(out["group_size"], dtype=np.int64)
    result["pixels"] = _ragged(out["pixels"])
    result["scores"] = _ragged(out["scores"])
    return result


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack equal shapes; keep an object array when the last block of a round is smaller."""
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    holder = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        holder[i] = a
    return holder


def block_dataset(uri: str, info: Any, image_size: int, num_frames: int) -> tuple[Any, int, int]:
    """The precomputed blocks decoded for the student: (dataset, blocks, images per block)."""
    import ray.data

    manifest = read_manifest(uri)
    if manifest.get("media") != info.columns.media:
        raise ThinkfastError(f"teacher scores {uri} carry {manifest.get('media')} media, "
                             f"the corpus has {info.columns.media}: were they computed from this corpus?")
    files = []
    for r in range(int(manifest["rounds"])):  # only the manifest's rounds: a re-run with fewer leaves stale ones
        found = [f for f in fs.fsspec_fs(uri).find(fs.strip_scheme(_round_dir(uri, r))) if f.endswith(".parquet")]
        if not found:
            raise ThinkfastError(f"teacher scores {uri}: round {r} of {manifest['rounds']} holds no Parquet files")
        files += [("s3://" + f) if fs.is_s3(uri) else f for f in sorted(found)]
    ds = ray.data.read_parquet(files).map_batches(
        _decode_blocks, batch_format="pyarrow", batch_size=8,
        fn_kwargs={"columns": info.columns, "image_size": image_size, "num_frames": num_frames})
    logger.info("teacher scores %s: %d blocks of <= %d (teacher %s)", uri, manifest["blocks"],
                manifest["block_size"], manifest.get("teacher_identity"))
    return ds, int(manifest["blocks"]), int(manifest["block_size"])


# ---------------------------------------------------------------- command line (python -m)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m thinkfast_pipelines.train.teacher_scores", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="corpus Parquet (local or s3://)")
    parser.add_argument("--teacher", required=True, help="slow model dir (local or s3://)")
    parser.add_argument("--out", required=True, help="output directory (local or s3://)")
    parser.add_argument("--block-size", type=int, default=64, help="images per block = the distill batch size")
    parser.add_argument("--rounds", type=int, default=1, help="independent shufflings to store")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-frames", type=int, default=8, help="frames per video (as train and embed)")
    parser.add_argument("--actors", type=int, default=1, help="teacher actors in the pool")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = precompute_teacher_scores(args.corpus, args.teacher, args.out, block_size=args.block_size,
                                           rounds=args.rounds, seed=args.seed, num_frames=args.num_frames,
                                           actors=args.actors, cpus_per_actor=args.cpus_per_actor)
    except ThinkfastError as exc:
        print(f"teacher_scores: error: {exc}")
        return 2
    print(json.dumps(result.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
