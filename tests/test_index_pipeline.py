"""``thinkfast index``: Ray shard tasks over Parquet on S3 (moto), the CLI, append / remove."""

from __future__ import annotations

import json

import numpy as np
import pytest

from thinkfast_pipelines.cli import main
from thinkfast_pipelines.index import append_to_index, build_index, remove_keys
from thinkfast.errors import IndexMismatchError, ThinkfastError
from thinkfast.index.sharded import ShardedIndex
from thinkfast.index.synthetic import clustered_vectors, noisy_queries
from thinkfast.store import EmbedCounts, EmbedManifest, FastModelRecord, fast_dir, write_embed_manifest, write_embeddings
from thinkfast.utils import fs


def _write_corpus(emb: str, n: int, parts: int, identity: str | None = "fast-123", seed: int = 0):
    x, _ = clustered_vectors(n, 16, clusters=8, seed=seed)
    keys = [f"k{seed}-{i:05d}" for i in range(n)]
    bounds = np.linspace(0, n, parts + 1).astype(int)
    for p, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        write_embeddings(fast_dir(emb), keys[a:b], x[a:b], part=f"part-{p}")
    if identity:  # what embed records: the fast model's identity is what the index checks
        manifest = EmbedManifest(corpus="generated", corpus_files=parts, image_size=32,
                                 counts=EmbedCounts(rows_in=n, embedded=n, rejected=0),
                                 fast=FastModelRecord(uri="models/fast", identity=identity, dim=16))
        write_embed_manifest(emb, manifest)
    return keys, x


def _exact_keys(keys, x, q, k):
    order = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]
    return np.asarray(keys, dtype=object)[order]


@pytest.mark.ray
def test_ray_build_on_s3_then_append_and_remove(ray_session, s3_bucket, tmp_path):
    emb, out = f"{s3_bucket}/emb", f"{s3_bucket}/index"
    keys, x = _write_corpus(emb, 600, parts=4)
    manifest = build_index(emb, out, shards=3, factory="IVF8,Flat", train_sample=600)
    assert manifest.count == 600 and manifest.num_shards == 3 and manifest.model_identity == "fast-123"
    assert [s.count for s in manifest.shards] == [200, 200, 200]

    q = noisy_queries(x, 20)
    index = ShardedIndex.load(out, cache_dir=str(tmp_path / "cache"), expected_model_identity="fast-123")
    found, _ = index.search(q, 5, nprobe=8)  # every list: exact for IVF-Flat
    np.testing.assert_array_equal(found, _exact_keys(keys, x, q, 5))
    with pytest.raises(IndexMismatchError, match="fast-999"):
        ShardedIndex.load(out, cache_dir=str(tmp_path / "cache"), expected_model_identity="fast-999")

    new_emb = f"{s3_bucket}/emb2"
    new_keys, new_x = _write_corpus(new_emb, 50, parts=1, seed=1)
    after = append_to_index(new_emb, out)
    assert after.count == 650 and after.num_shards == 4
    assert remove_keys(out, keys[:10]) == 10

    fresh = ShardedIndex.load(out, cache_dir=str(tmp_path / "cache2"))
    assert len(fresh) == 640 and fresh.manifest.count == 640
    all_keys = [k for k in keys[10:]] + new_keys
    all_x = np.concatenate([x[10:], new_x])
    q2 = np.concatenate([q, noisy_queries(new_x, 5)])
    found, _ = fresh.search(q2, 5, nprobe=8)
    np.testing.assert_array_equal(found, _exact_keys(all_keys, all_x, q2, 5))

    with pytest.raises(IndexMismatchError, match="fast-123"):  # embeddings of another model
        other = f"{s3_bucket}/emb3"
        _write_corpus(other, 5, parts=1, identity="fast-999", seed=2)
        append_to_index(other, out)


@pytest.mark.ray
def test_duplicate_keys_across_parts_fail_the_build(ray_session, tmp_path):
    emb = str(tmp_path / "emb")
    keys, x = _write_corpus(emb, 40, parts=1)
    write_embeddings(fast_dir(emb), keys[:3], x[:3], part="again")
    with pytest.raises(ThinkfastError, match="duplicate key"):
        build_index(emb, str(tmp_path / "idx"), shards=2)
    assert not (tmp_path / "idx" / "manifest.json").exists()


def test_cli_local_build_rebuild_and_errors(tmp_path, capsys):
    emb, out = str(tmp_path / "emb"), str(tmp_path / "idx")
    keys, x = _write_corpus(emb, 90, parts=3, identity=None)
    assert main(["index", "--embeddings", emb, "--out", out, "--shards", "3", "--local"]) == 0
    assert "90 vectors, 3 shard(s), Flat" in capsys.readouterr().out
    assert main(["index", "--embeddings", emb, "--out", out, "--shards", "2", "--local"]) == 0
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert "shard-00002.faiss" not in files  # the smaller rebuild cleaned up after itself
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["count"] == 90

    (tmp_path / "gone.txt").write_text("\n".join(keys[:4]) + "\n")
    assert main(["index", "--out", out, "--remove-keys", str(tmp_path / "gone.txt")]) == 0
    assert len(ShardedIndex.load(out)) == 86

    assert main(["index", "--out", out, "--local"]) == 2
    assert "--embeddings is required" in capsys.readouterr().err
    assert main(["index", "--embeddings", str(tmp_path / "nope"), "--out", out, "--local"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["index", "--embeddings", emb, "--out", out, "--factory", "Bogus", "--local"]) == 2
    assert "invalid FAISS factory" in capsys.readouterr().err
