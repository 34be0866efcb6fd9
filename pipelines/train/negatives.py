"""Hard negatives for distillation: batches built from fast-index neighbours.

B_i is "the batch's other images". With ``--hard-negatives INDEX`` the train images are
partitioned, once per run, into groups of ``G`` mutual near neighbours (greedy over the
fast index's top results for each image's own stored embedding), and every row of the
train dataset becomes one group: so a step's batch holds, for each image, G-1 images the
fast model finds similar, which are the negatives the slow teacher can tell apart and the
student most needs to learn from. The teacher scores them exactly like any other member
of B_i; NCE sees them as in-batch negatives too.

Train images missing from the index (not embedded, or rejected there) are not dropped:
they fill groups of their own at random.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import numpy as np

from thinkfast.errors import ThinkfastError

if TYPE_CHECKING:
    import ray.data

    from thinkfast.training.config import TrainConfig
    from thinkfast.training.data import CorpusInfo

logger = logging.getLogger(__name__)

NEIGHBOURS_PER_IMAGE = 4  # index results fetched per image = this x group size


def neighbour_groups(train_keys: list[str], index_uri: str, embeddings_uri: str, group_size: int,
                     seed: int) -> dict[str, int]:
    """key -> group id; groups of ``group_size`` index neighbours (greedy, random seed order)."""
    from thinkfast.index.sharded import ShardedIndex
    from thinkfast.store import read_embeddings

    if group_size < 2:
        raise ThinkfastError(f"hard-negative groups need at least 2 images, got {group_size}")
    keys, vectors = read_embeddings(embeddings_uri)
    position = {k: i for i, k in enumerate(keys)}
    train_set = set(train_keys)
    indexed = [k for k in train_keys if k in position]
    if not indexed:
        raise ThinkfastError(f"none of the {len(train_keys)} train keys is in the embeddings {embeddings_uri}")
    index = ShardedIndex.load(index_uri, expected_dim=vectors.shape[1])
    neighbours, _ = index.search(vectors[[position[k] for k in indexed]], k=group_size * NEIGHBOURS_PER_IMAGE)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(indexed))
    assigned: dict[str, int] = {}
    leftovers: list[str] = []
    next_group = 0
    for i in order:
        key = indexed[i]
        if key in assigned:
            continue
        members = [key]
        for other in neighbours[i]:
            if len(members) == group_size:
                break
            if other is not None and other != key and other in train_set and other not in assigned:
                members.append(str(other))
        if len(members) < group_size:
            leftovers.extend(members)  # its neighbours are taken: regrouped at random below
            for m in members:
                assigned[m] = -1
            continue
        for m in members:
            assigned[m] = next_group
        next_group += 1
    leftovers.extend(k for k in train_keys if k not in position)
    rng.shuffle(leftovers)
    for start in range(0, len(leftovers), group_size):
        for m in leftovers[start:start + group_size]:
            assigned[m] = next_group
        next_group += 1
    logger.info("hard negatives: %d train images in %d groups of <= %d (%d grouped at random)",
                len(assigned), next_group, group_size, len(leftovers))
    return assigned


def _tag_groups(batch: dict[str, np.ndarray], groups: dict[str, int]) -> dict[str, np.ndarray]:
    batch["group"] = np.array([groups.get(str(k), -1) for k in batch["key"]], dtype=np.int64)
    return batch


def _stack_group(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One output row per group: JSON lists of keys / caption lists / rejects, stacked pixels."""
    return {
        "key": np.array([json.dumps([str(k) for k in group["key"]])], dtype=object),
        "captions": np.array([json.dumps([json.loads(str(c)) for c in group["captions"]])], dtype=object),
        "reject": np.array([json.dumps([str(r) for r in group["reject"]])], dtype=object),
        "pixels": np.asarray(group["pixels"])[None],  # (1, G, ...)
        "group_size": np.array([len(group["key"])], dtype=np.int64),
    }


def grouped_dataset(info: "CorpusInfo", index_uri: str, embeddings_uri: str | None, config: "TrainConfig",
                    image_size: int) -> tuple["ray.data.Dataset", int, int]:
    """The decoded train split as one row per neighbour group: (dataset, groups, G)."""
    from thinkfast.data import reader
    from thinkfast.data.splits import table_splits
    from thinkfast_pipelines.train.data import decoded_dataset

    if not embeddings_uri:
        raise ThinkfastError("--hard-negatives needs --embeddings (the embed output with the index's vectors)")
    columns = info.columns
    wanted = [columns.key] + (["split"] if columns.has_split else [])
    table = reader.read_table(info.uri, columns=wanted)
    keys = [str(k) for k in table.column(columns.key).to_pylist()]
    splits = table_splits(table, columns.key)
    train_keys = [k for k, s in zip(keys, splits) if s == "train"]
    group_size = config.group_size
    groups = neighbour_groups(train_keys, index_uri, embeddings_uri, group_size, config.seed)
    ds = decoded_dataset(info, "train", image_size, config.num_frames, False, config.decode_batch_size)
    ds = ds.map_batches(_tag_groups, batch_format="numpy", fn_kwargs={"groups": groups})
    ds = ds.groupby("group").map_groups(_stack_group, batch_format="numpy")
    return ds, len(set(groups.values())), group_size
