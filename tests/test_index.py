"""ShardedIndex without Ray: exactness across shard counts, ANN recall, manifest truth,
mismatch and damage errors, add / remove, exact re-scoring."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pytest
from faiss.contrib.evaluation import knn_intersection_measure

from thinkfast.errors import IndexMismatchError, ThinkfastError
from thinkfast.index.build import choose_factory, default_nlist
from thinkfast.index.sharded import ShardedIndex
from thinkfast.index.synthetic import clustered_vectors, noisy_queries


def _keys(n: int, prefix: str = "img") -> list[str]:
    return [f"{prefix}{i:06d}" for i in range(n)]


def _exact(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    return flat.search(q, k)


@pytest.fixture(scope="module")
def small():
    x, _ = clustered_vectors(3000, 32, clusters=30, seed=3)
    return _keys(len(x)), x, noisy_queries(x, 40, seed=4)


def test_exact_one_and_four_shards_are_identical(small, tmp_path):
    keys, x, q = small
    one = ShardedIndex.build(keys, x, str(tmp_path / "one"), shards=1)
    four = ShardedIndex.build(keys, x, str(tmp_path / "four"), shards=4)
    assert one.factory == four.factory == "Flat" and four.num_shards == 4
    k1, s1 = one.search(q, 10)
    k4, s4 = four.search(q, 10)
    np.testing.assert_array_equal(k1, k4)
    np.testing.assert_array_equal(s1, s4)
    truth_scores, truth_ids = _exact(x, q, 10)
    np.testing.assert_array_equal(k1, np.asarray(keys, dtype=object)[truth_ids])
    np.testing.assert_allclose(s1, truth_scores, rtol=1e-6)


def test_default_factory_rules():
    assert choose_factory(50_000, 256) == "Flat"  # exact below ~100k
    assert choose_factory(1_000_000, 256) == "IVF4096_HNSW32,Flat"
    assert choose_factory(50_000_000, 256).endswith(",PQ64x8")  # raw floats would not fit
    assert default_nlist(50_000) == 1024 and default_nlist(100) == 2


def test_default_ann_recall_on_50k_clustered(tmp_path):
    x, _ = clustered_vectors(50_000, 32, clusters=200, seed=0)
    q = noisy_queries(x, 200)
    keys = _keys(len(x))
    index = ShardedIndex.build(keys, x, str(tmp_path / "ann"), shards=2, exact_below=10_000, train_sample=40_000)
    assert index.factory.startswith("IVF1024_HNSW32")
    assert index.manifest.search_defaults["nprobe"] < 1024  # tuned, not exhaustive
    found, _ = index.search(q, 10)
    _, truth = _exact(x, q, 10)
    ids = np.vectorize(lambda k: int(k[3:]))(found)
    assert knn_intersection_measure(ids, truth) >= 0.95
    # nprobe is honoured per call: one list is visibly worse than the tuned default
    worse, _ = index.search(q, 10, nprobe=1)
    assert knn_intersection_measure(np.vectorize(lambda k: int(k[3:]) if k else -1)(worse), truth) < 0.95


def test_manifest_is_true(small, tmp_path):
    keys, x, _ = small
    out = tmp_path / "idx"
    ShardedIndex.build(keys, x, str(out), shards=3, model_identity="fast-abc")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dim"] == 32 and manifest["metric"] == "inner_product" and manifest["factory"] == "Flat"
    assert manifest["model_identity"] == "fast-abc"
    assert [s["count"] for s in manifest["shards"]] == [1000, 1000, 1000] and manifest["count"] == 3000
    for shard in manifest["shards"]:
        assert os.path.getsize(out / f"{shard['name']}.faiss") == shard["index_bytes"]


def test_dimension_and_identity_mismatch(small, tmp_path):
    keys, x, q = small
    out = str(tmp_path / "idx")
    ShardedIndex.build(keys, x, out, model_identity="fast-abc")
    with pytest.raises(IndexMismatchError, match="64-d"):
        ShardedIndex.load(out, expected_dim=64)
    with pytest.raises(IndexMismatchError, match="fast-other"):
        ShardedIndex.load(out, expected_model_identity="fast-other")
    index = ShardedIndex.load(out, expected_dim=32, expected_model_identity="fast-abc")
    with pytest.raises(IndexMismatchError, match="expects"):
        index.search(np.ones((2, 16), np.float32), 5)
    with pytest.raises(IndexMismatchError, match="fast-other"):
        index.search(q, 5, expected_model_identity="fast-other")
    with pytest.raises(ThinkfastError, match="k must be"):
        index.search(q, 0)


def test_damaged_shards_fail_cleanly(small, tmp_path):
    keys, x, _ = small
    out = tmp_path / "idx"
    ShardedIndex.build(keys, x, str(out), shards=2, factory="IVF16,Flat")
    shard = out / "shard-00001.faiss"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexMismatchError, match="truncated"):
        ShardedIndex.load(str(out))
    shard.write_bytes(b"\x00" * len(data))  # right size, garbage inside
    with pytest.raises(IndexMismatchError, match="cannot read"):
        ShardedIndex.load(str(out))
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(IndexMismatchError, match="not valid JSON"):
        ShardedIndex.load(str(out))
    with pytest.raises(IndexMismatchError, match="no index"):
        ShardedIndex.load(str(tmp_path / "missing"))


def test_add_and_remove_keep_the_manifest_true(small, tmp_path):
    keys, x, q = small
    out = str(tmp_path / "idx")
    index = ShardedIndex.build(keys, x, out, shards=2, factory="HNSW16")
    top, _ = index.search(q[:5], 3)
    gone = list({k for k in top[:, 0]})
    assert index.remove(gone) == len(gone)
    after, _ = index.search(q[:5], 3)
    assert not set(gone) & set(after.ravel())
    assert len(index) == 3000 - len(gone)

    extra, _ = clustered_vectors(50, 32, clusters=2, seed=9)
    index.add(_keys(50, "new"), extra)
    assert index.num_shards == 3
    with pytest.raises(ThinkfastError, match="already in the index"):
        index.add([keys[5]], x[5:6])
    with pytest.raises(KeyError):
        index.remove(["never-there"])

    reloaded = ShardedIndex.load(out)
    assert len(reloaded) == 3000 - len(gone) + 50
    manifest = reloaded.manifest
    assert manifest.count == len(reloaded) and [s.count for s in manifest.shards][-1] == 50
    hit, score = reloaded.search(extra[:3], 1)
    assert list(hit[:, 0]) == ["new000000", "new000001", "new000002"]
    np.testing.assert_allclose(score[:, 0], 1.0, rtol=1e-5)
    assert gone[0] not in reloaded and "new000010" in reloaded

    view = ShardedIndex.load(out, shards=[2])
    assert len(view) == 50 and view.partial
    with pytest.raises(ThinkfastError, match="view"):
        view.remove(["new000000"])


def test_exact_rescoring_of_lossy_codes(small, tmp_path):
    keys, x, q = small
    index = ShardedIndex.build(keys, x, str(tmp_path / "pq"), shards=2, factory="IVF16,PQ4x4")
    plain_keys, plain_scores = index.search(q, 10, nprobe=16, rescore=False)
    best_keys, best_scores = index.search(q, 10, nprobe=16, rescore=True, rescore_factor=8)
    truth_scores, truth_ids = _exact(x, q, 10)
    to_ids = np.vectorize(lambda k: int(k[3:]))
    assert knn_intersection_measure(to_ids(best_keys), truth_ids) > knn_intersection_measure(
        to_ids(plain_keys), truth_ids
    )
    # re-scored values are exact inner products of the returned keys
    exact = np.einsum("nkd,nd->nk", x[to_ids(best_keys)], q)
    np.testing.assert_allclose(best_scores, exact, rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain_scores, np.einsum("nkd,nd->nk", x[to_ids(plain_keys)], q), atol=1e-4)

    bare = ShardedIndex.build(keys, x, str(tmp_path / "bare"), factory="IVF16,PQ4x4", store_vectors=False)
    with pytest.raises(IndexMismatchError, match="without stored vectors"):
        bare.search(q, 5, rescore=True)


def test_k_is_capped_and_bad_build_input(tmp_path):
    x, _ = clustered_vectors(5, 8, clusters=2)
    index = ShardedIndex.build(_keys(5), x, str(tmp_path / "tiny"), shards=3)
    found, scores = index.search(x[:2], 50)
    assert found.shape == scores.shape == (2, 5) and None not in found
    with pytest.raises(ThinkfastError, match="factory"):
        ShardedIndex.build(_keys(5), x, str(tmp_path / "bad"), factory="NoSuchIndex")
    with pytest.raises(ThinkfastError, match="duplicate"):
        ShardedIndex.build(["a", "a"], x[:2], str(tmp_path / "dup"))
    with pytest.raises(ThinkfastError, match="NaN"):
        ShardedIndex.build(["a"], np.full((1, 8), np.nan, np.float32), str(tmp_path / "nan"))


@pytest.mark.parametrize("factory", ["IVF8,Flat", "PQ4", "HNSW8"])
def test_removed_keys_never_come_back(small, tmp_path, factory):
    # IVF and HNSW hide tombstones with an ID selector; IndexPQ refuses selectors, so the
    # shard over-fetches and filters instead: both must give k live results
    keys, x, _ = small
    index = ShardedIndex.build(keys, x[:, :32], str(tmp_path / "i"), shards=2, factory=factory)
    gone = keys[:200]
    index.remove(gone)
    found, scores = index.search(x[:20], 10, nprobe=8, rescore=False)
    assert not set(gone) & set(found.ravel()) and None not in found
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16_HNSW8,Flat"])
def test_ivf_shards_equal_one_index(tmp_path, factory):
    # sharded IVF search assigns each query block to its lists once and scans every shard's
    # part of them; it must give the single index's keys and scores exactly: with tied
    # scores (duplicate vectors), -1 slots (few lists probed, k above a shard's size),
    # tombstones, and any batch size
    from thinkfast.index.files import load_trained

    rng = np.random.default_rng(7)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    x[500:] = x[:100]  # exact duplicates: tied scores across shards
    keys = _keys(len(x))
    q = np.concatenate([x[:8], rng.standard_normal((32, 16)).astype(np.float32)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # the index normalizes; so the check below can score
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    one = ShardedIndex.build(keys, x, str(tmp_path / "one"), shards=1, factory=factory, exact_below=0)
    four = ShardedIndex.build(keys, x, str(tmp_path / "four"), shards=4, factory=factory, exact_below=0,
                              trained=load_trained(str(tmp_path / "one")))
    assert four._shared_quantizer(four._shards) is not None  # the shared-assignment path runs
    for index in (one, four):
        index.remove(keys[::37])
    for k, nprobe in ((10, 4), (200, 2), (600, 16)):
        for batch in (1, 16, 40):
            k1, s1 = one.search(q[:batch], k, nprobe=nprobe, rescore=False)
            k4, s4 = four.search(q[:batch], k, nprobe=nprobe, rescore=False)
            np.testing.assert_array_equal(s1, s4)
            _assert_same_up_to_boundary_ties(k1, k4, s1, x, keys, q[:batch])
    _, s = four.search(q, 200, nprobe=2, rescore=False)
    assert np.isinf(s).any()  # the -1 slots were exercised


def _assert_same_up_to_boundary_ties(k1, k4, scores, x, keys, q) -> None:
    """Keys equal, except where several vectors tie with a row's last kept score: which of
    them fill the last slots depends on scan order (one index, or one shard, keeps the
    first it meets), in FAISS itself as much as in the merge. There each key must still be
    a true tie: its vector scores exactly the boundary score."""
    row_of = {key: i for i, key in enumerate(keys)}
    for r, c in np.argwhere(k1 != k4):
        finite = scores[r][np.isfinite(scores[r])]
        assert finite.size and scores[r, c] == finite.min(), f"keys differ above the boundary at {(r, c)}"
        for key in (k1[r, c], k4[r, c]):
            assert np.float32(x[row_of[key]] @ q[r]) == pytest.approx(float(scores[r, c]), abs=1e-5)
    for row in k4:
        live = [key for key in row if key is not None]
        assert len(set(live)) == len(live), "a key came back twice"
