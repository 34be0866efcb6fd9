"""The int8 token format and the S3 record cache of ``TokenStore``: byte layout, accuracy
against the quantisation formula, one format per store, deletes, and a bounded cache."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from thinkfast.store import TokenShape, TokenStore, TokenStoreWriter, finalize_token_store
from thinkfast.store.errors import StoreError
from thinkfast.store.quantize import dequantize_int8, quantize_int8
from thinkfast.store.tokens import remove_token_keys


def _tokens(n: int, t: int = 5, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, t, d)).astype(np.float16)


def test_int8_record_layout_is_codes_then_scales_by_hand():
    """One record, T=1, D=2, tokens (1.0, -0.5): scale = 1/127 (float16), codes (127, -64)."""
    shape = TokenShape(1, 2, "int8")
    assert shape.record_bytes == 1 * (2 + 2) and shape.data_suffix == ".i8"
    raw = shape.encode(np.array([[[1.0, -0.5]]], np.float16))
    scale = np.float16(1.0 / 127)
    assert raw[:2] == np.array([127, -64], np.int8).tobytes()  # round(-0.5 * 127) = -64 (half to even: -63.5 -> -64)
    assert raw[2:] == np.array([scale], np.float16).tobytes()
    out = np.empty((1, 1, 2), np.float16)
    shape.decode(np.frombuffer(raw, np.uint8).reshape(1, -1), out)
    np.testing.assert_array_equal(out, np.array([[[127 * np.float32(scale), -64 * np.float32(scale)]]], np.float16))


def test_int8_store_reads_back_the_quantised_tokens_at_half_the_bytes(tmp_path):
    uri = str(tmp_path / "tokens")
    keys = [f"k{i}" for i in range(30)]
    tokens = _tokens(30, t=6, d=256)
    writer = TokenStoreWriter(uri, token_format="int8")
    writer.write(keys[:17], tokens[:17])
    writer.write(keys[17:], tokens[17:])
    manifest = finalize_token_store(uri)
    assert manifest["dtype"] == "int8"
    data = sorted(f for f in os.listdir(uri) if f.endswith(".i8"))
    assert sum(os.path.getsize(os.path.join(uri, f)) for f in data) == 30 * 6 * (256 + 2)  # 50.4% of 2*6*256*30
    store = TokenStore.open(uri)
    got = store.get([keys[20], keys[3], keys[29]])  # across both shards, in the order asked
    assert got.dtype == np.float16 and got.shape == (3, 6, 256)
    codes, scales = quantize_int8(tokens[[20, 3, 29]])
    np.testing.assert_array_equal(got, dequantize_int8(codes, scales))
    err = np.abs(got.astype(np.float32) - tokens[[20, 3, 29]].astype(np.float32))
    bound = np.abs(tokens[[20, 3, 29]].astype(np.float32)).max(-1, keepdims=True) / 127 / 2 * 1.01 + 1e-3
    assert (err <= bound).all()  # within half a step of each token's own scale (+ float16 rounding)
    clone = pickle.loads(pickle.dumps(store))  # what a re-ranker replica receives
    np.testing.assert_array_equal(clone.get([keys[3]]), got[1:2])


def test_float16_store_is_unchanged_and_formats_do_not_mix(tmp_path):
    uri = str(tmp_path / "tokens")
    tokens = _tokens(4)
    TokenStoreWriter(uri).write(["a", "b"], tokens[:2])
    finalize_token_store(uri)
    np.testing.assert_array_equal(TokenStore.open(uri).get(["b", "a"]), tokens[[1, 0]])  # exact
    TokenStoreWriter(uri, token_format="int8").write(["c", "d"], tokens[2:])
    with pytest.raises(StoreError, match="one format"):
        finalize_token_store(uri)
    with pytest.raises(StoreError, match="unknown token format 'int4'"):
        TokenStoreWriter(uri, token_format="int4")


def test_removed_keys_leave_an_int8_store(tmp_path):
    uri = str(tmp_path / "tokens")
    keys = [f"k{i}" for i in range(6)]
    tokens = _tokens(6)
    TokenStoreWriter(uri, token_format="int8").write(keys, tokens)
    finalize_token_store(uri)
    assert remove_token_keys(uri, {"k1", "k4"}) == 2
    store = TokenStore.open(uri)
    assert store.keys() == ["k0", "k2", "k3", "k5"]
    codes, scales = quantize_int8(tokens[[5, 0]])
    np.testing.assert_array_equal(store.get(["k5", "k0"]), dequantize_int8(codes, scales))


@pytest.mark.parametrize("token_format", ["float16", "int8"])
def test_s3_reads_go_through_a_bounded_record_cache(s3_bucket, token_format):
    uri = f"{s3_bucket}/emb/tokens"
    keys = [f"k{i}" for i in range(20)]
    tokens = _tokens(20, t=4, d=16)
    TokenStoreWriter(uri, token_format=token_format).write(keys, tokens)
    finalize_token_store(uri)
    record = TokenShape(4, 16, token_format).record_bytes
    store = TokenStore.open(uri, cache_mb=5 * record / 2**20)  # room for exactly 5 records
    local = TokenStore.open(uri, cache_mb=0)
    first = store.get(keys[:3])
    assert (store.cache_hits, store.cache_misses) == (0, 3)
    np.testing.assert_array_equal(store.get(keys[:3]), first)  # served from memory
    assert (store.cache_hits, store.cache_misses) == (3, 3)
    np.testing.assert_array_equal(store.get(keys[3:10]), local.get(keys[3:10]))  # 7 more: evicts the oldest
    assert store.cached_bytes <= 5 * record and store.cached_bytes == 5 * record
    np.testing.assert_array_equal(store.get([keys[0], keys[9]]), local.get([keys[0], keys[9]]))
    assert store.cache_misses == 3 + 7 + 1  # k0 was evicted, k9 was not
    assert local.cached_bytes == 0
    if token_format == "float16":
        np.testing.assert_array_equal(first, tokens[:3])
    with pytest.raises(StoreError, match="cache_mb must be >= 0"):
        TokenStore.open(uri, cache_mb=-1)
