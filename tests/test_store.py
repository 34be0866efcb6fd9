"""Artifact I/O: fast-embedding Parquet and the slow-token store, locally and on S3 (moto)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thinkfast.errors import ThinkfastError
from thinkfast.store import (
    StoreError,
    TokenStore,
    TokenStoreWriter,
    UnknownKeyError,
    embedding_dim,
    finalize_token_store,
    iter_embeddings,
    read_embeddings,
    write_embeddings,
)


def _vectors(n: int, d: int = 8, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [f"k{seed}-{i:04d}" for i in range(n)], rng.standard_normal((n, d)).astype(np.float32)


def test_embeddings_round_trip_local(tmp_path):
    keys_a, vec_a = _vectors(30, seed=1)
    keys_b, vec_b = _vectors(20, seed=2)
    emb = tmp_path / "emb"
    write_embeddings(str(emb / "fast"), keys_a, vec_a, part="part-0")
    write_embeddings(str(emb / "fast"), keys_b, vec_b, part="part-1")
    schema = pq.read_schema(str(emb / "fast" / "part-0.parquet"))
    assert schema.field("embedding").type == pa.list_(pa.float32(), 8)
    keys, vectors = read_embeddings(str(emb))  # <emb> resolves to <emb>/fast
    assert keys == keys_a + keys_b
    np.testing.assert_array_equal(vectors, np.concatenate([vec_a, vec_b]))
    batches = list(iter_embeddings(str(emb / "fast"), batch_size=16))
    assert [len(k) for k, _ in batches] == [16, 14, 16, 4]
    assert embedding_dim(str(emb)) == 8


def test_embeddings_accept_variable_list_column(tmp_path):
    # Ray Data / pandas writers may produce list<float> rather than fixed_size_list
    table = pa.table({"key": ["a", "b"], "embedding": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "x.parquet")
    keys, vectors = read_embeddings(str(tmp_path))
    assert keys == ["a", "b"] and vectors.shape == (2, 2) and vectors.dtype == np.float32


@pytest.mark.parametrize(
    "table, message",
    [
        (pa.table({"key": ["a"], "vec": [[1.0]]}), "missing column 'embedding'"),
        (pa.table({"key": [1], "embedding": [[1.0]]}), "expected string"),
        (pa.table({"key": ["a", "b"], "embedding": [[1.0, 2.0], [1.0]]}), "different lengths"),
        (pa.table({"key": ["a", "b"], "embedding": [[1.0], None]}), "null embedding"),
        (pa.table({"key": ["a", "a"], "embedding": [[1.0], [2.0]]}), "duplicate key"),
    ],
)
def test_embeddings_bad_input_is_a_clear_error(tmp_path, table, message):
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(StoreError, match=message):
        read_embeddings(str(tmp_path))


def test_embeddings_missing_path(tmp_path):
    with pytest.raises(ThinkfastError, match="no such file"):
        read_embeddings(str(tmp_path / "nope"))


def test_write_embeddings_rejects_nan(tmp_path):
    with pytest.raises(StoreError, match="NaN"):
        write_embeddings(str(tmp_path), ["a"], np.array([[np.nan, 1.0]], np.float32))


def _tokens(n: int, t: int = 5, d: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, t, d)).astype(np.float16)


def test_token_store_local_round_trip_and_idempotent_rerun(tmp_path):
    uri = str(tmp_path / "emb" / "tokens")
    keys = [f"img{i:03d}" for i in range(40)]
    tokens = _tokens(40)

    def write_batches():
        writer = TokenStoreWriter(uri)
        threads = [
            threading.Thread(target=writer.write, args=(keys[i : i + 10], tokens[i : i + 10])) for i in range(0, 40, 10)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    write_batches()
    write_batches()  # a retried job: same batches rewrite their own shards
    TokenStoreWriter(uri).write(keys[5:15], tokens[5:15])  # re-run with other boundaries
    manifest = finalize_token_store(uri)
    assert manifest["count"] == 40 and manifest["duplicates_dropped"] == 10
    assert not [p for p in os.listdir(uri) if ".tmp-" in p]

    store = TokenStore.open(str(tmp_path / "emb"))
    assert store.shape == (40, 5, 4)
    assert sorted(store.keys()) == keys
    ask = ["img031", "img002", "img017", "img002"]
    got = store.get(ask)
    assert got.dtype == np.float16 and got.shape == (4, 5, 4)
    np.testing.assert_array_equal(got, tokens[[31, 2, 17, 2]])
    assert store.get([]).shape == (0, 5, 4)
    with pytest.raises(KeyError):
        store.get(["img001", "nope"])
    with pytest.raises(UnknownKeyError, match="'nope'"):
        store.get(["nope"])


def test_token_store_errors(tmp_path):
    uri = str(tmp_path / "tokens")
    writer = TokenStoreWriter(uri)
    with pytest.raises(StoreError, match="duplicate"):
        writer.write(["a", "a"], _tokens(2))
    with pytest.raises(StoreError, match="overflow"):
        writer.write(["a"], np.full((1, 2, 2), 1e6, np.float32))
    with pytest.raises(StoreError, match="no token store manifest"):
        writer.write(["a"], _tokens(1))
        TokenStore.open(uri)
    writer.write(["b"], _tokens(1, t=3))
    with pytest.raises(StoreError, match="differs"):
        finalize_token_store(uri)


def test_token_store_truncated_shard(tmp_path):
    uri = str(tmp_path / "tokens")
    shard = TokenStoreWriter(uri).write(["a", "b"], _tokens(2))
    path = os.path.join(uri, shard + ".f16")
    with open(path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(StoreError, match="truncated"):
        finalize_token_store(uri)


def test_store_on_s3(s3_bucket):
    keys, vectors = _vectors(25, d=6)
    write_embeddings(f"{s3_bucket}/emb/fast", keys, vectors)
    got_keys, got = read_embeddings(f"{s3_bucket}/emb")
    assert got_keys == keys
    np.testing.assert_array_equal(got, vectors)

    tokens = _tokens(25, t=3, d=2)
    writer = TokenStoreWriter(f"{s3_bucket}/emb/tokens")
    writer.write(keys[:12], tokens[:12])
    writer.write(keys[12:], tokens[12:])
    finalize_token_store(f"{s3_bucket}/emb/tokens")
    store = TokenStore.open(f"{s3_bucket}/emb")
    assert store.shape == (25, 3, 2)
    np.testing.assert_array_equal(store.get([keys[20], keys[3]]), tokens[[20, 3]])
    with pytest.raises(UnknownKeyError):
        store.get(["missing"])


def test_token_store_many_shards_bounded_open_files(tmp_path, monkeypatch):
    import thinkfast.store.tokens as store_module

    monkeypatch.setattr(store_module, "MAX_OPEN_SHARDS", 3)
    uri = str(tmp_path / "tokens")
    tokens = _tokens(30, t=2, d=3)
    keys = [f"k{i}" for i in range(30)]
    writer = TokenStoreWriter(uri)
    for i in range(0, 30, 2):  # 15 shards of 2 records
        writer.write(keys[i : i + 2], tokens[i : i + 2])
    finalize_token_store(uri)
    store = TokenStore.open(uri)
    order = list(np.random.default_rng(0).permutation(30))
    np.testing.assert_array_equal(store.get([keys[i] for i in order]), tokens[order])
    assert len(store._memmaps) <= 3
