"""Train / val / test membership of corpus rows, decided in one place.

A corpus with a ``split`` column uses it. A corpus without one is split by a stable hash
of each key (5% val, 5% test, 90% train), so training, teacher scores, hard negatives and
evaluation all agree on which rows are held out, run after run, on any machine.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import pyarrow as pa

SPLITS = ("train", "val", "test")
# without a split column, rows are assigned by a hash of their key: 5% val, 5% test, 90% train
_HASH_BUCKETS = {"val": range(0, 5), "test": range(5, 10), "train": range(10, 100)}


def split_of_key(key: str) -> str:
    """Deterministic split for corpora without a ``split`` column (stable across runs)."""
    bucket = zlib.crc32(str(key).encode("utf-8")) % 100
    for name, buckets in _HASH_BUCKETS.items():
        if bucket in buckets:
            return name
    raise AssertionError("unreachable: hash buckets cover 0..99")


def check_split(split: str) -> str:
    """``split`` itself, or a ``ValueError`` naming the valid ones (a typo selects nothing)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def splits_of(keys: Sequence[Any], split_values: Sequence[Any] | None) -> list[str]:
    """The split of each row: its ``split`` value when the corpus has the column, else the hash of its key."""
    if split_values is not None:
        return [str(s) if s is not None else "" for s in split_values]
    return [split_of_key(str(k)) for k in keys]


def table_splits(table: pa.Table, key_column: str = "key") -> list[str]:
    """The split of every row of ``table`` (its ``split`` column if present, else hashed keys)."""
    values = table.column("split").to_pylist() if "split" in table.column_names else None
    return splits_of(table.column(key_column).to_pylist(), values)


def select_split(table: pa.Table, split: str | None, key_column: str = "key") -> pa.Table:
    """Rows of ``table`` in ``split`` (``None``: every row), by column or by key hash."""
    if split is None:
        return table
    check_split(split)
    mask = pa.array([s == split for s in table_splits(table, key_column)], type=pa.bool_())
    return table.filter(mask)
