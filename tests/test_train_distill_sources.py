"""Distillation's other B_i sources: precomputed teacher scores and index hard negatives.

The teacher here is an untrained tiny SlowModel: what is tested is the plumbing (the
precompute job scores exactly what online distillation would, and both sources train),
not the teacher's quality (tests/test_train.py covers that the student learns from it).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch


def _clustered(n_clusters: int, per: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    vectors = np.repeat(centres, per, axis=0) + 0.01 * rng.normal(size=(n_clusters * per, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_neighbour_groups_are_index_clusters_and_keep_every_key(tmp_path):
    from thinkfast_pipelines.train.negatives import neighbour_groups
    from thinkfast.index.sharded import ShardedIndex
    from thinkfast.store import write_embeddings

    keys = [f"k{i:03d}" for i in range(40)]
    vectors = _clustered(10, 4, 16, seed=1)
    write_embeddings(str(tmp_path / "emb" / "fast"), keys, vectors)
    ShardedIndex.build(keys, vectors, str(tmp_path / "index"), shards=2)
    train = keys[:32] + ["not-indexed"]  # clusters 0..7 are train; one key has no embedding
    groups = neighbour_groups(train, str(tmp_path / "index"), str(tmp_path / "emb"), 4, seed=0)
    assert set(groups) == set(train)
    members: dict[int, list[str]] = {}
    for key, group in groups.items():
        members.setdefault(group, []).append(key)
    full = [sorted(m) for m in members.values() if len(m) == 4]
    assert len(full) == 8
    for m in full:  # each group is one cluster of mutual neighbours
        assert len({int(k[1:]) // 4 for k in m}) == 1, m
    assert any(m == ["not-indexed"] for m in members.values())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Corpus, an untrained tiny teacher and student, and an index of the student's image
    embeddings (what `embed` + `index` would produce)."""
    from thinkfast.training.data import decode_split, inspect_corpus
    from thinkfast.data import reader
    from thinkfast.data.synth import SynthConfig, write_synth
    from thinkfast.data.tokenizer import WordTokenizer
    from thinkfast.index.sharded import ShardedIndex
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast.store import write_embeddings

    root = tmp_path_factory.mktemp("distill_sources")
    corpus = str(root / "corpus")
    write_synth(corpus, SynthConfig(num_images=48, captions_per_image=2, image_size=32, image_format="png",
                                    val_fraction=0.1, test_fraction=0.1, seed=5))
    info = inspect_corpus(corpus)
    tokenizer = WordTokenizer.build(info.train_captions)
    torch.manual_seed(0)
    SlowModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(str(root / "teacher"))
    student = FastModel.from_preset("tiny", tokenizer=tokenizer).eval()
    student.save_pretrained(str(root / "student"))
    table = reader.read_table(corpus, columns=info.columns.read_columns())
    rows = decode_split(table, info.columns, "train", 32, 1, explode_captions=False)
    with torch.no_grad():
        vectors = student.encode_image(torch.as_tensor(np.asarray(rows["pixels"], dtype=np.float32))).numpy()
    keys = [str(k) for k in rows["key"]]
    write_embeddings(str(root / "emb" / "fast"), keys, vectors)
    ShardedIndex.build(keys, vectors, str(root / "index"))
    return {"root": root, "corpus": corpus, "info": info, "teacher": str(root / "teacher"),
            "student": str(root / "student"), "train_keys": keys}


TINY = {"preset": "tiny", "batch_size": 8, "workers": 2, "epochs": 2, "val_images": 32, "seed": 0}


@pytest.mark.ray
def test_precomputed_teacher_scores_equal_online_scores_and_train(setup, ray_session):
    from thinkfast_pipelines.train.teacher_scores import precompute_teacher_scores
    from thinkfast_pipelines.train import distill
    from thinkfast.training.objectives import teacher_score_matrix
    from thinkfast.data import reader
    from thinkfast.data.media import load_pixels
    from thinkfast.models.slow import SlowModel

    out = str(setup["root"] / "scores")
    result = precompute_teacher_scores(setup["corpus"], setup["teacher"], out, block_size=8, rounds=2, seed=0)
    n_train = len(setup["train_keys"])
    assert result.pairs == 2 * n_train and result.rejected == 0
    assert result.teacher_identity == SlowModel.from_pretrained(setup["teacher"]).identity

    blocks = reader.read_table(out, columns=["round", "keys", "captions", "scores"]).to_pylist()
    assert len(blocks) == result.blocks
    for r in (0, 1):  # every round covers every train image once
        covered = [k for b in blocks if b["round"] == r for k in json.loads(b["keys"])]
        assert sorted(covered) == sorted(setup["train_keys"])
    # one block re-scored here by the online path gives the stored matrix
    block = max(blocks, key=lambda b: len(json.loads(b["keys"])))
    keys, captions = json.loads(block["keys"]), [c[0] for c in json.loads(block["captions"])]
    columns = setup["info"].columns
    corpus = {r["key"]: r for r in reader.read_table(setup["corpus"], columns=columns.read_columns()).to_pylist()}
    teacher = SlowModel.from_pretrained(setup["teacher"]).eval()
    pixels = torch.stack([load_pixels(corpus[k], columns, 32) for k in keys])
    expected = teacher_score_matrix(teacher, pixels, captions)
    stored = torch.tensor(block["scores"]).view(len(keys), len(keys))
    torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-4)

    trained = distill(setup["corpus"], str(setup["root"] / "from_scores"), teacher_scores=out,
                      init=setup["student"], storage=str(setup["root"] / "ckpt1"), **TINY)
    assert trained.starts == [0] and len(trained.history) == 2
    assert all(math.isfinite(h["train_distill"]) and math.isfinite(h["train_nce"]) for h in trained.history)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_more_rounds_than_room_for_teacher_actors_finishes_and_reruns_cleanly(setup, ray_session):
    """Regression: rounds used to be a union of per-round actor pools, all needed at once;
    12 rounds of 2-CPU actors on a 2-CPU cluster waited on each other forever."""
    import ray

    from thinkfast_pipelines.train.teacher_scores import block_dataset, precompute_teacher_scores
    from thinkfast.data import reader

    out = str(setup["root"] / "scores_many_rounds")
    from thinkfast.errors import ThinkfastError

    with pytest.raises(ThinkfastError, match="nothing would be left"):  # would starve the reads: refused
        precompute_teacher_scores(setup["corpus"], setup["teacher"], str(setup["root"] / "never"), block_size=16,
                                  cpus_per_actor=ray.cluster_resources()["CPU"])
    per_actor = ray.cluster_resources().get("CPU", 2) / 2  # room for one actor plus the read tasks
    rounds = 3  # the old union needed 3 actors (1.5x the cluster) at once
    result = precompute_teacher_scores(setup["corpus"], setup["teacher"], out, block_size=16, rounds=rounds,
                                       seed=1, cpus_per_actor=per_actor)
    n_train = len(setup["train_keys"])
    assert result.rounds == rounds and result.pairs == rounds * n_train and result.rejected == 0
    blocks = reader.read_table(out, columns=["round", "keys"]).to_pylist()
    for r in range(rounds):
        covered = [k for b in blocks if b["round"] == r for k in json.loads(b["keys"])]
        assert sorted(covered) == sorted(setup["train_keys"])

    again = precompute_teacher_scores(setup["corpus"], setup["teacher"], out, block_size=16, rounds=1, seed=1)
    ds, n_blocks, _ = block_dataset(out, setup["info"], 32, 1)
    rows = ds.take_all()
    assert n_blocks == again.blocks == len(rows)  # the stale rounds 1.. of the first run are not read
    assert sorted(k for r in rows for k in json.loads(r["key"])) == sorted(setup["train_keys"])


@pytest.mark.ray
def test_hard_negative_distillation_trains_on_index_groups(setup, ray_session):
    from thinkfast_pipelines.train import distill

    trained = distill(setup["corpus"], str(setup["root"] / "hard"), teacher=setup["teacher"],
                      hard_negatives=str(setup["root"] / "index"), embeddings=str(setup["root"] / "emb"),
                      init=setup["student"], storage=str(setup["root"] / "ckpt2"), group_size=4, **TINY)
    assert trained.starts == [0] and len(trained.history) == 2
    losses = [h["train_loss"] for h in trained.history]
    assert all(math.isfinite(x) for x in losses)
    assert "val_r1" in trained.history[-1]
