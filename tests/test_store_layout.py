"""``thinkfast.store.layout``, ``stream`` and ``outputs`` without Ray: the embed manifest
round trip and its errors, the stream tables, and what one write bundle puts on disk."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thinkfast.store import (
    FAST_DIR,
    REJECTED_DIR,
    TEXTS_DIR,
    TOKENS_DIR,
    EmbedCounts,
    EmbedManifest,
    EmbedManifestError,
    EmbedOutputs,
    FastModelRecord,
    MissingEmbedManifestError,
    SlowModelRecord,
    StoreError,
    TokenStore,
    fast_dir,
    finalize_token_store,
    find_embed_manifest,
    read_embed_manifest,
    read_embeddings,
    rejected_dir,
    texts_dir,
    tokens_dir,
    write_embed_manifest,
)


def _manifest(**changes) -> EmbedManifest:
    base = EmbedManifest(
        corpus="/data/corpus",
        corpus_files=2,
        image_size=32,
        counts=EmbedCounts(rows_in=10, embedded=8, rejected=2, rejected_by_reason={"decode:corrupt": 2}),
        fast=FastModelRecord(uri="/m/fast", identity="fast-abc", dim=16),
        slow=SlowModelRecord(uri="/m/slow", identity="slow-def", num_tokens=5, dim=8),
        outputs=EmbedOutputs(fast=FAST_DIR, tokens=TOKENS_DIR, rejected=REJECTED_DIR),
        media_column="mp4",
        num_frames=4,
        config={"batch_size": 8},
        replaced_previous=("fast",),
        timings_s={"embed_media": 1.5},
    )
    return base.replace(**changes)


def test_dir_helpers():
    assert fast_dir("s3://b/emb") == "s3://b/emb/fast"
    assert tokens_dir("/e") == "/e/tokens" and rejected_dir("/e") == "/e/rejected" and texts_dir("/e") == "/e/texts"
    assert TEXTS_DIR == "texts"


def test_manifest_round_trip_keeps_the_json_layout(tmp_path):
    manifest = _manifest()
    write_embed_manifest(str(tmp_path), manifest)
    data = json.loads((tmp_path / "manifest.json").read_text())
    # the keys readers have always used
    assert data["format"] == "thinkfast-embeddings" and data["num_frames"] == 4
    assert data["models"]["fast"] == {"uri": "/m/fast", "identity": "fast-abc", "dim": 16}
    assert data["models"]["slow"]["num_tokens"] == 5
    assert data["counts"] == {"in": 10, "embedded": 8, "rejected": 2, "rejected_by_reason": {"decode:corrupt": 2}}
    assert data["outputs"] == {"fast": "fast", "tokens": "tokens", "rejected": "rejected", "texts": None}
    assert "error" not in data
    assert read_embed_manifest(str(tmp_path)) == manifest
    assert find_embed_manifest(str(tmp_path)).fast_identity == "fast-abc"


def test_texts_only_counts_leave_media_counts_out():
    counts = EmbedCounts.from_streams(4, None, {"texts": 7, "texts_skipped_blank": 1, "rows": 8})
    assert counts.to_json() == {"in": 4, "texts": 7, "texts_skipped_blank": 1}
    assert counts.adds_up() and counts.problem() is None


def test_counts_from_sink_results_and_their_problems():
    media = {"rows": 5, "embedded": 3, "rejected": 2, "rejected:decode:corrupt": 1, "rejected:read:missing_key": 1}
    counts = EmbedCounts.from_streams(5, media)
    assert counts.rejected_by_reason == {"decode:corrupt": 1, "read:missing_key": 1}
    assert counts.problem() is None
    assert "keys must be unique" in counts.problem(duplicates_dropped=2)
    assert "do not add up" in EmbedCounts.from_streams(6, media).problem()


def test_missing_and_invalid_manifests_raise_clear_errors(tmp_path):
    with pytest.raises(MissingEmbedManifestError, match="no embed manifest"):
        read_embed_manifest(str(tmp_path))
    assert find_embed_manifest(str(tmp_path)) is None
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(EmbedManifestError, match="not valid JSON"):
        find_embed_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "thinkfast-faiss-index"}))
    with pytest.raises(EmbedManifestError, match="not a thinkfast embed manifest"):
        read_embed_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "thinkfast-embeddings", "version": 1}))
    with pytest.raises(EmbedManifestError, match="incomplete or malformed"):
        read_embed_manifest(str(tmp_path))
    assert issubclass(EmbedManifestError, StoreError)


def test_decoded_table_then_media_table_then_bundle_on_disk(tmp_path):
    """The stream's tables end to end without Ray: decode rejects, an embed-stage reject,
    and the bundle split into fast/, tokens/ and rejected/."""
    import torch

    from thinkfast.data.decode import REJECT_SCHEMA, DecodedRows, Reject
    from thinkfast.store.outputs import clear_embed_outputs, files_inside_outputs, write_media_bundle
    from thinkfast.store.stream import DECODED_SCHEMA, StatusColumns, decoded_table, media_table, pixel_groups

    decoded = DecodedRows(rows=[{"key": "a"}, {"key": "b"}], pixels=[torch.zeros(3, 2, 2), torch.ones(3, 2, 2)],
                          rejects=[Reject("c", "decode", "corrupt", "bad   bytes")])
    table = decoded_table(decoded)
    assert table.schema == DECODED_SCHEMA
    assert table.column("key").to_pylist() == ["a", "b", "c"]
    assert table.column("detail").to_pylist() == [None, None, "bad bytes"]
    groups = pixel_groups(table)
    assert list(groups) == [(3, 2, 2)] and groups[(3, 2, 2)][0] == [0, 1]

    status = StatusColumns.of(table)
    status.mark(1, "embed", "non_finite", "NaN")
    vectors = [np.ones(4, np.float32), None, None]
    tokens = [np.full((2, 3), 0.5, np.float16), None, None]
    out_table = media_table(status, vectors, 4, tokens, embedded_at=1.0)
    assert out_table.column_names == ["key", "stage", "reason", "detail", "embedding", "tokens", "token_shape",
                                      "embedded_at"]

    out = str(tmp_path / "emb")
    counts = write_media_bundle(out, out_table)
    assert counts == {"rows": 3, "embedded": 1, "rejected": 2, "rejected:embed:non_finite": 1,
                      "rejected:decode:corrupt": 1}
    keys, got = read_embeddings(out)
    assert keys == ["a"] and got.tolist() == [[1.0] * 4]
    rejected = pq.read_table(os.path.join(out, REJECTED_DIR))
    assert rejected.schema.names == REJECT_SCHEMA.names and sorted(rejected.column("key").to_pylist()) == ["b", "c"]
    finalize_token_store(tokens_dir(out))
    np.testing.assert_array_equal(TokenStore.open(out).get(["a"])[0], tokens[0])

    assert files_inside_outputs([os.path.join(out, "fast", "x.parquet"), "/elsewhere.parquet"], out) == [
        (os.path.join(out, "fast", "x.parquet"), os.path.join(out, "fast"))]
    write_embed_manifest(out, _manifest())
    assert sorted(clear_embed_outputs(out)) == ["fast", "manifest.json", "rejected", "tokens"]
    assert os.listdir(out) == []


def test_texts_bundle_skips_blank_captions(tmp_path):
    from thinkfast.store.outputs import write_texts_bundle
    from thinkfast.store.stream import explode_captions, texts_table

    captions = explode_captions(pa.table({"key": ["a", "b"], "captions": [["x", " "], ["y"]]}), caption_column="captions")
    embeddings = [np.ones(2, np.float32) if c is not None else None for c in captions.column("caption").to_pylist()]
    counts = write_texts_bundle(str(tmp_path), texts_table(captions, embeddings, 2))
    assert counts == {"rows": 3, "texts": 2, "texts_skipped_blank": 1}
    written = pq.read_table(os.path.join(str(tmp_path), TEXTS_DIR))
    assert written.column("key").to_pylist() == ["a", "b"] and written.column("caption").to_pylist() == ["x", "y"]
