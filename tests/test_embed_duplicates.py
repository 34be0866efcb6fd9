"""Duplicate keys in a corpus (issue 20, item 1): found before any work, or handled by
``--on-duplicate first|reject``, and never present twice in any artifact.

The corpus: 16 generated rows, then three keys repeated with *different* media, so a
test can tell which occurrence was kept: ``k1`` twice inside ``part-00000``, ``k0`` in
``part-00000`` and again in ``part-00001``, ``k12`` twice inside ``part-00001`` (its first
occurrence is in the second file). Every artifact (``fast/``, every token shard,
``tokens/keys.parquet``, ``rejected/``, ``texts/``, both manifests) is read back and
checked to hold each key at most once, and ``embedded + rejected == in``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from thinkfast.errors import ThinkfastError
from thinkfast_pipelines.embed import EmbedConfig, embed

IMAGE_SIZE = 32


def _read_dir(path: str, suffix: str = ".parquet") -> pa.Table:
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(suffix))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")


def dup_corpus(root: str) -> tuple[str, dict]:
    """Write the corpus; returns (dir, facts): ``rows`` (every row in file then row order),
    ``dups`` (key -> occurrences), ``first`` (key -> the row kept by ``first``)."""
    from thinkfast.data.synth import SynthConfig, write_synth

    src = os.path.join(root, "synth")
    write_synth(src, SynthConfig(num_images=16, captions_per_image=2, image_size=IMAGE_SIZE, seed=5,
                                 image_format="png"), workers=1)
    base = _read_dir(src).to_pylist()
    assert len(base) == 16
    k = [r["key"] for r in base]

    def copy(i: int, media_of: int) -> dict:
        return {**base[i], "jpg": base[media_of]["jpg"], "captions": [f"copy of {k[i]}"]}

    file0 = base[:12] + [copy(1, 12)]                       # k1 twice inside file 0
    file1 = base[12:] + [copy(0, 13), copy(12, 14)]          # k0 across files, k12 twice inside file 1
    corpus = os.path.join(root, "corpus")
    os.makedirs(corpus)
    schema = pq.read_schema([os.path.join(src, f) for f in sorted(os.listdir(src)) if f.endswith(".parquet")][0])
    for i, rows in enumerate((file0, file1)):
        # small row groups, so a key's occurrences fall in different row groups / batches
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(corpus, f"part-{i:05d}.parquet"),
                       row_group_size=4)
    rows = file0 + file1
    dups = {key: [r for r in rows if r["key"] == key] for key in (k[0], k[1], k[12])}
    first = {key: occ[0] for key, occ in dups.items()}
    return corpus, {"rows": rows, "dups": dups, "first": first, "keys": sorted(set(k))}


# --------------------------------------------------------------------------- artifacts


def check_artifacts(out: str) -> dict:
    """Read every artifact under ``out``; assert each holds every key at most once and the
    counts add up; return what was found."""
    found: dict = {}
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    counts = manifest["counts"]
    assert counts["embedded"] + counts["rejected"] == counts["in"], counts

    fast = _read_dir(os.path.join(out, "fast"))
    fast_keys = fast.column("key").to_pylist()
    assert len(fast_keys) == len(set(fast_keys)), "fast/ holds a key twice"
    assert len(fast_keys) == counts["embedded"]
    found["fast"] = dict(zip(fast_keys, np.asarray(fast.column("embedding").combine_chunks().flatten())
                             .reshape(len(fast_keys), -1)))

    tokens = os.path.join(out, "tokens")
    shard_keys: list[str] = []
    for f in sorted(os.listdir(tokens)):
        if f.startswith("shard-") and f.endswith(".keys.parquet"):
            shard_keys += pq.read_table(os.path.join(tokens, f)).column("key").to_pylist()
    assert len(shard_keys) == len(set(shard_keys)), "the token shards hold a key twice"
    index_keys = pq.read_table(os.path.join(tokens, "keys.parquet")).column("key").to_pylist()
    assert len(index_keys) == len(set(index_keys)) and sorted(index_keys) == sorted(shard_keys) == sorted(fast_keys)
    token_manifest = json.load(open(os.path.join(tokens, "manifest.json")))
    assert not token_manifest.get("duplicates_dropped"), token_manifest

    rejected_dir = os.path.join(out, "rejected")
    rejected = _read_dir(rejected_dir).to_pylist() if os.path.isdir(rejected_dir) else []
    assert len(rejected) == counts["rejected"]
    # a key embedded may also be rejected only as a repeat (``first`` keeps one copy)
    assert not set(fast_keys) & {r["key"] for r in rejected if r["reason"] != "duplicate_key"}
    found["rejected"] = rejected

    texts_dir = os.path.join(out, "texts")
    if os.path.isdir(texts_dir):
        texts = _read_dir(texts_dir).to_pylist()
        ids = [(r["key"], r["caption_index"]) for r in texts]
        assert len(ids) == len(set(ids)), "texts/ holds a caption twice"
        assert {r["key"] for r in texts} <= set(fast_keys)
        found["texts"] = texts
    found["counts"] = counts
    return found


def _expected_vectors(fast_dir: str, rows: list[dict]) -> np.ndarray:
    from thinkfast.data.media import load_pixels
    from thinkfast.data.schema import validate_corpus_schema
    from thinkfast.models.fast import FastModel

    columns = validate_corpus_schema(pa.Table.from_pylist(rows).schema)
    pixels = torch.stack([load_pixels(r, columns, IMAGE_SIZE, 1) for r in rows])
    with torch.inference_mode():
        return FastModel.from_pretrained(fast_dir).eval().encode_image(pixels).numpy()


# --------------------------------------------------------------------------- no Ray


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if embed reaches Ray or clears the output directory."""
    import thinkfast_pipelines.embed.job as job

    def forbidden(*args, **kwargs):
        raise AssertionError("embed reached Ray / the clean-up before rejecting its input")

    monkeypatch.setattr("thinkfast_pipelines.ray_utils.init_ray", forbidden)
    monkeypatch.setattr(job, "clear_outputs", forbidden)


def test_duplicate_plan_in_file_then_row_order(tmp_path):
    from thinkfast.data.reader import find_duplicate_keys, inspect_corpus

    corpus, facts = dup_corpus(str(tmp_path))
    info = inspect_corpus(corpus)
    plan = find_duplicate_keys(info)
    assert sorted(plan.keys) == sorted(facts["dups"])
    assert plan.num_rows == 6 and plan.extra_rows == 3
    # first occurrences: k0 and k1 in file 0 (rows 0, 1), k12 in file 1 (row 0)
    files = info.files
    k = facts["keys"]
    by_key = {key: plan.occurrences[key] for key in plan.keys}
    assert by_key[facts["rows"][0]["key"]] == [(files[0], 0), (files[1], 4)]
    assert by_key[facts["rows"][1]["key"]] == [(files[0], 1), (files[0], 12)]
    assert by_key[facts["rows"][13]["key"]] == [(files[1], 0), (files[1], 5)]
    assert len(k) == 16
    # a corpus without repeats: an empty plan
    clean = tmp_path / "clean"
    clean.mkdir()
    pq.write_table(pa.Table.from_pylist(facts["rows"][:5]), str(clean / "part-0.parquet"))
    assert not find_duplicate_keys(inspect_corpus(str(clean)))


def test_duplicates_fail_before_any_work_naming_the_keys(no_ray, models, tmp_path):
    corpus, facts = dup_corpus(str(tmp_path))
    out = tmp_path / "emb"
    (out / "fast").mkdir(parents=True)
    (out / "fast" / "keep.parquet").write_bytes(b"previous run")
    with pytest.raises(ThinkfastError) as err:
        embed(corpus, str(out), fast=models[0], slow=models[1], config=EmbedConfig(progress=False))
    message = str(err.value)
    assert "\n" not in message
    assert "3 key(s) occur more than once" in message and "6 rows" in message
    for key in facts["dups"]:
        assert repr(key) in message
    assert "--on-duplicate" in message
    assert (out / "fast" / "keep.parquet").exists()


def test_cli_duplicates_one_line_exit_2(no_ray, models, tmp_path, capsys):
    from thinkfast_pipelines.cli import main

    corpus, facts = dup_corpus(str(tmp_path))
    rc = main(["embed", "--corpus", corpus, "--fast", models[0], "--out", str(tmp_path / "emb"), "--no-progress"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if " logs in " not in line]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("thinkfast embed: error: ") and "occur more than once" in err[0]


def test_on_duplicate_flag_and_limit(no_ray, models, tmp_path):
    import argparse

    from thinkfast_pipelines.embed import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--corpus", "c", "--out", "o", "--fast", "f", "--on-duplicate", "reject"])
    assert config_from_args(args).on_duplicate == "reject"
    with pytest.raises(SystemExit):
        parser.parse_args(["--corpus", "c", "--out", "o", "--on-duplicate", "last"])
    corpus, _ = dup_corpus(str(tmp_path))
    with pytest.raises(ThinkfastError, match="--limit"):
        embed(corpus, str(tmp_path / "o"), fast=models[0], config=EmbedConfig(on_duplicate="first", limit=5))


# --------------------------------------------------------------------------- Ray runs


@pytest.mark.ray
def test_on_duplicate_first_then_reject_then_rerun(ray_session, models, tmp_path):
    fast_dir, slow_dir = models
    corpus, facts = dup_corpus(str(tmp_path))
    out = str(tmp_path / "emb")
    # rows_per_write 8: duplicates would land in different bundles, the default in one
    config = EmbedConfig(batch_size=4, decode_batch_size=4, rows_per_write=8, progress=False, on_duplicate="first")

    manifest = embed(corpus, out, fast=fast_dir, slow=slow_dir, texts=True, config=config)
    found = check_artifacts(out)
    assert manifest["counts"]["in"] == len(facts["rows"]) == 19
    assert sorted(found["fast"]) == facts["keys"]
    assert found["counts"]["rejected_by_reason"] == {"read:duplicate_key": 3}
    assert sorted(r["key"] for r in found["rejected"]) == sorted(facts["dups"])
    assert all(r["stage"] == "read" and r["reason"] == "duplicate_key" and r["detail"] for r in found["rejected"])
    # the first occurrence was kept: its pixels, its captions
    keys = sorted(facts["dups"])
    firsts = [facts["first"][key] for key in keys]
    extras = [facts["dups"][key][1] for key in keys]
    kept = np.stack([found["fast"][key] for key in keys])
    np.testing.assert_allclose(kept, _expected_vectors(fast_dir, firsts), atol=1e-5, rtol=0)
    assert not np.allclose(kept, _expected_vectors(fast_dir, extras), atol=1e-3)
    captions = {r["caption"] for r in found["texts"] if r["key"] in facts["dups"]}
    assert captions and not any(c.startswith("copy of") for c in captions)
    assert len(found["texts"]) == 2 * 16

    # reject: every row of a repeated key is rejected; into the same --out (a re-run), with
    # the default --rows-per-write (one bundle for the whole corpus: where the issue saw
    # embed die in the Write stage)
    config = EmbedConfig(batch_size=8, progress=False, on_duplicate="reject")
    manifest = embed(corpus, out, fast=fast_dir, slow=slow_dir, config=config)
    found = check_artifacts(out)
    assert sorted(manifest["replaced_previous"]) == ["fast", "manifest.json", "rejected", "texts", "tokens"]
    assert sorted(found["fast"]) == sorted(set(facts["keys"]) - set(facts["dups"]))
    assert found["counts"]["rejected_by_reason"] == {"read:duplicate_key": 6}
    assert sorted(r["key"] for r in found["rejected"]) == sorted(k for k in facts["dups"] for _ in range(2))
    assert not os.path.exists(os.path.join(out, "texts"))


# --------------------------------------------------------------------------- index --append


def test_index_append_with_known_keys_adds_only_the_new_ones(tmp_path):
    """A batch whose later rows repeat keys already in the index used to be added up to
    the clash (30 of 35 rows in, then the error); since issue 17 the known keys are
    skipped (and, their vectors differing, reported as changed), never added twice."""
    from thinkfast.index import build as B
    from thinkfast.index.sharded import ShardedIndex
    from thinkfast.store import write_embeddings
    from thinkfast_pipelines.index import append_to_index

    rng = np.random.default_rng(0)
    write_embeddings(str(tmp_path / "e1"), [f"k{i}" for i in range(40)], rng.standard_normal((40, 16)).astype("float32"))
    B.build_from_embeddings(str(tmp_path / "e1"), str(tmp_path / "idx"), shards=2)
    keys = [f"n{i}" for i in range(30)] + [f"k{i}" for i in range(5)]
    write_embeddings(str(tmp_path / "e2"), keys, rng.standard_normal((35, 16)).astype("float32"))
    change = append_to_index(str(tmp_path / "e2"), str(tmp_path / "idx"), shard_size=10).last_change
    assert (change["added"], change["skipped"], change["changed"]) == (30, 5, 5)
    manifest = ShardedIndex.read_manifest(str(tmp_path / "idx"))
    assert manifest.count == 70 and len(manifest.shards) == 5
    assert sorted(ShardedIndex.load(str(tmp_path / "idx")).keys()) == sorted({f"k{i}" for i in range(40)} | set(keys))
