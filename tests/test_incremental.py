"""A corpus that grows and shrinks (issue 17): incremental embed, incremental index with a
drift verdict, and deletes that reach the index, the token store and the serving catalog.

In-process except the one embed test (Ray Data is the only way embed runs), so the file
costs a few seconds: the index and delete tests build small FAISS indexes in threads,
and the two-stage search runs the session's tiny untrained models.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thinkfast.errors import ThinkfastError
from thinkfast.index.drift import MAX_RESIDUAL_RATIO
from thinkfast.index.sharded import ShardedIndex
from thinkfast.index.synthetic import clustered_vectors
from thinkfast.store import TokenStore, TokenStoreWriter, finalize_token_store, read_embeddings, write_embeddings
from thinkfast_pipelines.index import append_to_index, build_index, remove_everywhere

# --------------------------------------------------------------------------- incremental index


def _emb(path, keys, x):
    write_embeddings(os.path.join(path, "fast"), keys, x)
    return str(path)


def test_append_adds_only_new_keys_and_reports_changed_ones(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 16)).astype(np.float32)
    keys = [f"k{i:03d}" for i in range(60)]
    e1 = _emb(tmp_path / "e1", keys[:40], x[:40])
    out = str(tmp_path / "idx")
    build_index(e1, out, shards=2, use_ray=False)
    # the grown directory: every old key again (k005 with new media -> a new vector) plus 20 new
    grown = x.copy()
    grown[5] = rng.standard_normal(16)
    e2 = _emb(tmp_path / "e2", keys, grown)
    manifest = append_to_index(e2, out, shard_size=8)
    change = manifest.last_change
    assert manifest.count == 60
    assert (change["added"], change["skipped"], change["changed"], change["replaced"]) == (20, 40, 1, 0)
    assert change["added"] + change["skipped"] == change["input"] == 60
    assert change["changed_examples"] == ["k005"]
    index = ShardedIndex.load(out)
    assert sorted(index.keys()) == keys  # nothing twice
    q = grown[5] / np.linalg.norm(grown[5])
    assert index.search(q, 1)[0][0][0] != "k005"  # the old vector is still the indexed one
    # again: nothing new; then with --replace-changed the new vector replaces the old
    again = append_to_index(e2, out).last_change
    assert (again["added"], again["skipped"], again["changed"]) == (0, 60, 1)
    replaced = append_to_index(e2, out, replace_changed=True)
    assert replaced.last_change["replaced"] == 1 and replaced.count == 60
    index = ShardedIndex.load(out)
    assert sorted(index.keys()) == keys and index.search(q, 1)[0][0][0] == "k005"


def test_drift_report_flags_a_shifted_distribution_not_more_of_the_same(tmp_path):
    """IVF centroids trained on the first build: more vectors from the same clusters keep
    the residual ratio near 1; vectors from new clusters push it past the limit."""
    x, _ = clustered_vectors(9000, 32, clusters=40, seed=0)
    keys = [f"a{i}" for i in range(9000)]
    out = str(tmp_path / "idx")
    build_index(_emb(tmp_path / "e1", keys[:6000], x[:6000]), out, factory="IVF64,Flat", use_ray=False)
    same = append_to_index(_emb(tmp_path / "e2", keys, x), out).last_change["drift"]
    assert same["applicable"] and same["appended"] == 3000
    assert 0.8 < same["residual_ratio"] < 1.2 and not same["rebuild_due"], same
    shifted, _ = clustered_vectors(2000, 32, clusters=5, spread=0.9, seed=7)
    drift = append_to_index(_emb(tmp_path / "e3", [f"b{i}" for i in range(2000)], shifted), out).last_change["drift"]
    assert drift["appended"] == 5000 and drift["residual_ratio"] > MAX_RESIDUAL_RATIO and drift["rebuild_due"], drift
    assert "rebuild due" in ShardedIndex.load(out).drift().describe()
    # an exact index has no quantizer: never due
    flat = str(tmp_path / "flat")
    build_index(_emb(tmp_path / "e4", keys[:100], x[:100]), flat, use_ray=False)
    assert not ShardedIndex.load(flat).drift().applicable


def test_cli_append_prints_counts_and_drift(tmp_path, capsys):
    from thinkfast_pipelines.cli import main

    x, _ = clustered_vectors(3000, 16, clusters=10, seed=1)
    keys = [f"c{i}" for i in range(3000)]
    out = str(tmp_path / "idx")
    build_index(_emb(tmp_path / "e1", keys[:2000], x[:2000]), out, factory="IVF16,Flat", use_ray=False)
    rc = main(["index", "--append", "--embeddings", _emb(tmp_path / "e2", keys, x), "--out", out])
    text = capsys.readouterr().out
    assert rc == 0 and "added 1000, skipped 2000 already indexed" in text and "quantizer drift" in text, text
    assert main(["index", "--drift", "--out", out]) == 0
    assert "no rebuild needed" in capsys.readouterr().out


# --------------------------------------------------------------------------- deletes reach every artifact


def _corpus(root, keys):
    from thinkfast.data.synth import SynthConfig, write_synth

    write_synth(str(root), SynthConfig(num_images=len(keys), captions_per_image=1, image_size=32, seed=3,
                                       image_format="png"), workers=1)
    return str(root)


def test_deleted_key_leaves_index_tokens_and_catalog_and_search_never_returns_it(models, tmp_path):
    import torch

    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast.rerank import two_stage_search
    from thinkfast.serving.catalog import CorpusCatalog
    from thinkfast.serving.errors import UnknownMediaKey
    from thinkfast.store.incremental import read_removed

    fast, slow = FastModel.from_pretrained(models[0]).eval(), SlowModel.from_pretrained(models[1]).eval()
    corpus = _corpus(tmp_path / "corpus", range(12))
    table = pq.read_table(corpus)
    keys = table.column("key").to_pylist()
    n = len(keys)
    torch.manual_seed(0)
    pixels = torch.rand(n, 3, fast.config.image_size, fast.config.image_size)
    with torch.inference_mode():
        vectors = fast.encode_image(pixels).numpy()
        tokens = slow.encode_visual(pixels).numpy()
    emb = str(tmp_path / "emb")
    write_embeddings(os.path.join(emb, "fast"), keys, vectors)
    TokenStoreWriter(os.path.join(emb, "tokens")).write(keys[:6], tokens[:6])
    TokenStoreWriter(os.path.join(emb, "tokens")).write(keys[6:], tokens[6:])
    finalize_token_store(os.path.join(emb, "tokens"))
    out = str(tmp_path / "idx")
    build_index(emb, out, use_ray=False)

    def search():
        index, store = ShardedIndex.load(out), TokenStore.open(emb)
        hits = two_stage_search(["a red circle", "the blue square"], fast, slow, index, store.get,
                                k=len(index), rerank_k=len(index))
        return [{h.key for h in q} for q in hits]

    assert all(found == set(keys) for found in search())
    gone = [keys[2], keys[7], "never-embedded"]
    counts = remove_everywhere(out, emb, gone)
    assert (counts["index"], counts["fast"], counts["tokens"]) == (2, 2, 2)
    live = set(keys) - set(gone)
    assert all(found == live for found in search())  # every live key, no deleted one
    store = TokenStore.open(emb)
    assert len(store) == n - 2 and keys[2] not in store and keys[7] not in store
    np.testing.assert_array_equal(store.get([keys[8]]), tokens[8:9].astype(np.float16))  # records kept in place
    assert sorted(read_embeddings(emb)[0]) == sorted(live)
    assert read_removed(emb) == set(gone)
    catalog = CorpusCatalog.open(corpus, embeddings=emb)
    assert keys[2] not in catalog and keys[3] in catalog and len(catalog) == n - 2
    with pytest.raises(UnknownMediaKey):
        catalog.media(keys[7])
    assert catalog.remove([keys[3]]) == 1 and keys[3] not in catalog
    # a second removal of the same keys changes nothing and does not fail
    assert remove_everywhere(out, emb, gone)["index"] == 0


# --------------------------------------------------------------------------- incremental embed (Ray)


def _fast_rows(emb):
    keys, vectors = read_embeddings(emb)
    assert len(keys) == len(set(keys))  # nothing written twice
    return dict(zip(keys, vectors))


def test_incremental_plan_skips_known_reports_changed_drops_leftovers(tmp_path):
    """The driver's decision, without Ray: an embeddings dir written by hand (a, b, c
    committed; x a crashed run's leftover; bad rejected before; r removed)."""
    from thinkfast.store.incremental import read_digests, write_digests, write_removed
    from thinkfast.store.outputs import write_rejected
    from thinkfast.data.decode import Reject, rejects_table
    from thinkfast_pipelines.embed import EmbedConfig
    from thinkfast_pipelines.embed.incremental import plan_run

    out = str(tmp_path / "emb")
    rng = np.random.default_rng(0)
    have = ["a", "b", "c", "x"]
    write_embeddings(os.path.join(out, "fast"), have, rng.standard_normal((4, 8)).astype(np.float32))
    TokenStoreWriter(os.path.join(out, "tokens")).write(have, rng.standard_normal((4, 3, 2)).astype(np.float32))
    finalize_token_store(os.path.join(out, "tokens"))
    write_digests(out, {"a": "da", "b": "db", "c": "dc"})
    write_removed(out, {"r"})
    write_rejected(out, rejects_table([Reject("bad", "decode", "corrupt", "x")]))
    digests = {"a": "da", "b": "db-new", "n": "dn", "r": "dr", "bad": "dbad"}

    plan = plan_run(out, digests, EmbedConfig(incremental=True), None, incremental=True)
    assert plan.skip == {"a", "b", "r"} and sorted(plan.embed) == ["bad", "n"] and plan.skipped_rows == 3
    assert plan.stats["changed"] == 1 and plan.stats["changed_examples"] == ["b"]
    assert (plan.stats["leftovers_dropped"], plan.stats["skipped_removed"], plan.stats["skipped_unchanged"]) == (1, 1, 1)
    assert sorted(read_embeddings(out)[0]) == ["a", "b", "c"] and sorted(TokenStore.open(out).keys()) == ["a", "b", "c"]
    assert not os.path.exists(os.path.join(out, "rejected")) or not pq.read_table(os.path.join(out, "rejected")).num_rows

    again = plan_run(out, digests, EmbedConfig(incremental=True, reembed_changed=True), None, incremental=True)
    assert again.skip == {"a", "r"} and sorted(again.embed) == ["b", "bad", "n"]
    assert sorted(read_embeddings(out)[0]) == ["a", "c"] and "b" not in TokenStore.open(out)
    assert sorted(read_digests(out)) == ["a", "c"]  # b's old digest goes with its rows
    with pytest.raises(ThinkfastError, match="--incremental"):
        EmbedConfig(reembed_changed=True).validate()


def test_incremental_refuses_other_models_and_unfinished_dirs(tmp_path):
    from thinkfast.store.layout import EmbedCounts, EmbedManifest, EmbedOutputs, FastModelRecord
    from thinkfast_pipelines.embed.incremental import check_same_models, previous_manifest
    from thinkfast_pipelines.embed.models import ModelInfo

    old = EmbedManifest(corpus="c", corpus_files=1, image_size=32, counts=EmbedCounts(rows_in=1, embedded=1),
                        fast=FastModelRecord("f", "fast-1", 8), outputs=EmbedOutputs(fast="fast"))
    same = ModelInfo(image_size=32, num_frames=8, fast=FastModelRecord("g", "fast-1", 8), slow=None)
    check_same_models(old, same, texts=False, out="emb")
    other = ModelInfo(image_size=32, num_frames=8, fast=FastModelRecord("g", "fast-2", 8), slow=None)
    with pytest.raises(ThinkfastError, match="fast model fast-1, this run has fast-2"):
        check_same_models(old, other, texts=False, out="emb")
    with pytest.raises(ThinkfastError, match="texts"):
        check_same_models(old, same, texts=True, out="emb")
    with_tokens = EmbedManifest(corpus="c", corpus_files=1, image_size=32, counts=EmbedCounts(rows_in=1, embedded=1),
                                fast=FastModelRecord("f", "fast-1", 8), outputs=EmbedOutputs(fast="fast", tokens="tokens"),
                                config={"token_format": "int8"})
    check_same_models(with_tokens, same, texts=False, out="emb", token_format="int8")
    with pytest.raises(ThinkfastError, match="stores int8 tokens, this run writes float16"):
        check_same_models(with_tokens, same, texts=False, out="emb")
    assert previous_manifest(str(tmp_path / "empty"), None) is None
    write_embeddings(str(tmp_path / "half" / "fast"), ["a"], np.ones((1, 8), np.float32))
    with pytest.raises(ThinkfastError, match="unfinished"):
        previous_manifest(str(tmp_path / "half"), None)


@pytest.mark.ray
def test_incremental_embed_grows_a_directory_without_writing_anything_twice(ray_session, models, tmp_path):
    """Two Ray runs: --incremental into an empty --out (a full run), then the grown corpus
    (5 new rows, a corrupt one, key 0 with new media, one key taken down before) with
    --reembed-changed."""
    from thinkfast.data.synth import SynthConfig, write_synth
    from thinkfast.store.incremental import read_digests, remove_from_embeddings
    from thinkfast_pipelines.embed import EmbedConfig, embed

    fast, slow = models
    synth = tmp_path / "synth"
    write_synth(str(synth), SynthConfig(num_images=17, captions_per_image=1, image_size=32, seed=5,
                                        image_format="png"), workers=1)
    table = pq.read_table(str(synth))
    first, rest = table.slice(0, 12), table.slice(12)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(first, str(corpus / "part-00000.parquet"))
    config = EmbedConfig(batch_size=8, decode_batch_size=8, progress=False, incremental=True)
    out = str(tmp_path / "emb")
    created = embed(str(corpus), out, fast=fast, slow=slow, config=config)
    assert created["counts"]["embedded"] == 12 and created["incremental"]["mode"] == "full"
    before = _fast_rows(out)
    assert len(read_digests(out)) == 12

    keys = first.column("key").to_pylist()
    new_keys = rest.column("key").to_pylist()
    rows = first.to_pylist()
    rows[0]["jpg"] = rest.column("jpg")[0].as_py()  # same key, other bytes
    pq.write_table(pa.Table.from_pylist(rows, schema=first.schema), str(corpus / "part-00000.parquet"))
    bad = {**rest.to_pylist()[0], "key": "bad-1", "jpg": b"\x00not an image" * 8}
    pq.write_table(pa.Table.from_pylist(rest.to_pylist() + [bad], schema=rest.schema), str(corpus / "part-00001.parquet"))
    remove_from_embeddings(out, [new_keys[1]])  # a takedown of a key not embedded yet
    grown = embed(str(corpus), out, fast=fast, slow=slow,
                  config=EmbedConfig(**{**config.__dict__, "reembed_changed": True}))
    c, inc = grown["counts"], grown["incremental"]
    assert (c["in"], c["embedded"], c["rejected"], c["skipped"]) == (18, 5, 1, 12), c  # 4 new + key 0
    assert c["embedded"] + c["rejected"] + c["skipped"] == c["in"]
    assert (inc["mode"], inc["skipped_unchanged"], inc["skipped_removed"], inc["changed_reembedded"]) == (
        "incremental", 11, 1, 1)
    assert inc["changed_examples"] == [keys[0]] and inc["total_embedded"] == 16
    after = _fast_rows(out)
    assert sorted(after) == sorted(keys + new_keys[:1] + new_keys[2:])
    assert not np.allclose(after[keys[0]], before[keys[0]])
    for k in keys[1:]:  # untouched rows are the same bytes
        np.testing.assert_array_equal(after[k], before[k])
    assert sorted(TokenStore.open(out).keys()) == sorted(after)
    assert read_digests(out).keys() == after.keys()
    assert pq.read_table(os.path.join(out, "rejected")).column("key").to_pylist() == ["bad-1"]
    assert not os.path.exists(os.path.join(out, "incremental_in_progress.json"))
    with pytest.raises(ThinkfastError, match="same models"):  # fast only now: one line, before any work
        embed(str(corpus), out, fast=fast, config=config)
