"""``thinkfast embed`` end to end on tiny generated corpora and tiny untrained models.

The Ray runs (local salted images + re-run, S3 round trip, video) check what the issue
promises: every input row lands exactly once in fast/ or rejected/ with its reason,
embeddings equal ``FastModel.encode_image`` on the same decoded pixels (1e-5), tokens
equal ``SlowModel.encode_visual`` to float16 precision, texts equal ``encode_text``, and a
re-run replaces rather than duplicates. The rest runs without Ray: schema errors fail
before any work, and the stages' per-row error handling.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from thinkfast_pipelines.embed import EmbedConfig, EmbedError, embed
from thinkfast.data.reader import read_table
from thinkfast.data.schema import validate_corpus_schema
from thinkfast.errors import CorpusSchemaError, ThinkfastError

IMAGE_SIZE = 32
NUM_FRAMES = 4


# --------------------------------------------------------------------------- fixtures


def _write_synth(out: str, n: int, video: bool = False) -> None:
    from thinkfast.data.synth import SynthConfig, write_synth

    config = SynthConfig(num_images=n, captions_per_image=2, image_size=IMAGE_SIZE, video=video,
                         num_frames=NUM_FRAMES, seed=3, image_format="png")
    write_synth(out, config, workers=1)


def _png(side: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(side: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _zero_frame_video() -> bytes:
    """A container with a video stream and no frames (AVI keeps the empty track)."""
    import av

    buf = io.BytesIO()
    container = av.open(buf, "w", format="avi")
    stream = container.add_stream("mpeg4", rate=8)
    stream.width, stream.height, stream.pix_fmt = IMAGE_SIZE, IMAGE_SIZE, "yuv420p"
    container.start_encoding()
    container.close()
    return buf.getvalue()


# salted rows: key -> (media bytes, expected reason)
MAX_PIXELS = 100 * 100


def _salted_rows() -> dict[str, tuple[bytes | None, str]]:
    good = _jpeg(48, seed=1)
    return {
        "bad-empty": (b"", "missing_media"),
        "bad-null": (None, "missing_media"),
        "bad-corrupt": (b"\x00this is not an image" * 8, "corrupt"),
        "bad-truncated": (good[: len(good) // 2], "truncated"),
        "bad-too-large": (_png(160, seed=2), "too_large"),  # 25600 px > MAX_PIXELS
        "bad-svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"></svg>', "corrupt"),
    }


def _salted_corpus(root: str) -> tuple[str, list[str]]:
    """Synth images (part-00000) + a second file with bad rows, a null key, a blank caption."""
    corpus = os.path.join(root, "corpus")
    _write_synth(corpus, 20)
    schema = read_table(corpus).schema
    nullable = pa.schema([f.with_nullable(True) for f in schema])
    rows = []
    for key, (data, _) in _salted_rows().items():
        rows.append({"key": key, "captions": ["a red circle"], "jpg": data, "split": "train"})
    rows.append({"key": None, "captions": ["a red circle"], "jpg": _png(40), "split": "train"})
    rows.append({"key": "good-blank-caption", "captions": ["  ", "a blue square"], "jpg": _png(40, 5), "split": "train"})
    extra = pa.Table.from_pylist(
        [{**{n: None for n in schema.names}, **r} for r in rows], schema=nullable
    )
    pq.write_table(extra, os.path.join(corpus, "part-99999.parquet"))
    keys = _read_dir(corpus).column("key").to_pylist()
    return corpus, keys


# --------------------------------------------------------------------------- reading outputs


def _read_dir(path: str) -> pa.Table:
    """Every Parquet file of a local directory as one table (nullability may differ)."""
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")


def _decoded(corpus: str, keys: list[str], num_frames: int = 1) -> torch.Tensor:
    """Pixels of ``keys`` exactly as the pipeline decodes them, in this process."""
    from thinkfast.data.media import load_pixels

    table = _read_dir(corpus)
    columns = validate_corpus_schema(table.schema)
    by_key = {r["key"]: r for r in table.select(["key", columns.media]).to_pylist() if r["key"] is not None}
    return torch.stack([load_pixels(by_key[k], columns, IMAGE_SIZE, num_frames) for k in keys])


def _check_against_models(fast_dir: str, slow_dir: str | None, keys: list[str], vectors: np.ndarray,
                          pixels: torch.Tensor, tokens: np.ndarray | None) -> None:
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel

    with torch.inference_mode():
        expected = FastModel.from_pretrained(fast_dir).eval().encode_image(pixels).numpy()
        np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)
        if slow_dir is not None:
            ref = SlowModel.from_pretrained(slow_dir).eval().encode_visual(pixels).numpy()  # (N, T, D)
            assert tokens is not None and tokens.dtype == np.float16 and tokens.shape == ref.shape
            # float16 keeps 11 significant bits: relative error <= 2^-11, plus subnormal slack
            np.testing.assert_allclose(tokens.astype(np.float32), ref, rtol=2**-10, atol=1e-4)


# --------------------------------------------------------------------------- Ray runs


@pytest.mark.ray
def test_salted_local_corpus_then_rerun(ray_session, models, tmp_path):
    from thinkfast.models.fast import FastModel
    from thinkfast.store import TokenStore

    fast_dir, slow_dir = models
    corpus, input_keys = _salted_corpus(str(tmp_path))
    out = str(tmp_path / "emb")
    config = EmbedConfig(batch_size=8, decode_batch_size=8, rows_per_write=16, max_pixels=MAX_PIXELS, progress=False)
    manifest = embed(corpus, out, fast=fast_dir, slow=slow_dir, texts=True, config=config)

    fast = _read_dir(os.path.join(out, "fast"))
    rejected = _read_dir(os.path.join(out, "rejected"))
    fast_keys = fast.column("key").to_pylist()
    assert pa.types.is_fixed_size_list(fast.schema.field("embedding").type)

    # every input row exactly once in fast/ or rejected/
    assert len(fast_keys) == len(set(fast_keys))
    assert sorted(fast_keys + rejected.column("key").to_pylist(), key=str) == sorted(input_keys, key=str)
    counts = manifest["counts"]
    assert counts["in"] == len(input_keys) == counts["embedded"] + counts["rejected"]
    assert counts["embedded"] == len(fast_keys) == 21  # 20 synth + the blank-caption row

    # each salted row rejected with its reason; the null key at the read stage
    reasons = {r["key"]: (r["stage"], r["reason"]) for r in rejected.to_pylist()}
    for key, (_, reason) in _salted_rows().items():
        assert reasons[key] == ("decode", reason), key
    assert reasons[None] == ("read", "missing_key")
    assert sum(counts["rejected_by_reason"].values()) == counts["rejected"]
    assert all(r["detail"] for r in rejected.to_pylist())

    # values: fast embeddings and slow tokens equal the models on the same pixels
    vectors = np.asarray(fast.column("embedding").combine_chunks().flatten()).reshape(len(fast_keys), -1)
    store = TokenStore.open(out)
    assert store.shape[0] == len(fast_keys)
    _check_against_models(fast_dir, slow_dir, fast_keys, vectors, _decoded(corpus, fast_keys), store.get(fast_keys))
    assert manifest["models"]["fast"]["dim"] == vectors.shape[1]
    assert list(store.shape[1:]) == [manifest["models"]["slow"]["num_tokens"], manifest["models"]["slow"]["dim"]]

    # texts: every non-blank caption of every row (bad media rows too), g(y) exact
    texts = _read_dir(os.path.join(out, "texts"))
    all_captions = _read_dir(corpus).column("captions").to_pylist()
    non_blank = sum(1 for caps in all_captions for c in caps if c.strip())
    assert texts.num_rows == counts["texts"] == non_blank and counts["texts_skipped_blank"] == 1
    fast_model = FastModel.from_pretrained(fast_dir).eval()
    sample = texts.slice(0, 6).to_pylist()
    with torch.inference_mode():
        enc = fast_model.tokenize([r["caption"] for r in sample])
        expected = fast_model.encode_text(enc["input_ids"], enc["attention_mask"]).numpy()
    np.testing.assert_allclose(np.stack([r["embedding"] for r in sample]), expected, atol=1e-5, rtol=0)

    # re-run into the same --out, slow only: replaced, not appended; fast/ and texts/ gone
    again = embed(corpus, out, slow=slow_dir, config=config)
    assert sorted(again["replaced_previous"]) == sorted(["manifest.json", "fast", "tokens", "rejected", "texts"])
    assert sorted(TokenStore.open(out).keys()) == sorted(fast_keys)
    assert _read_dir(os.path.join(out, "rejected")).num_rows == counts["rejected"]
    assert not os.path.exists(os.path.join(out, "fast")) and not os.path.exists(os.path.join(out, "texts"))
    assert again["counts"]["embedded"] == counts["embedded"]
    assert again["models"]["fast"] is None and again["outputs"]["fast"] is None and again["outputs"]["tokens"] == "tokens"


@pytest.mark.ray
def test_s3_url_corpus_with_models_and_output_on_s3(ray_session, s3_bucket, models, tmp_path):
    """Media fetched by ``url`` from S3 inside the workers; models loaded from S3 by the
    actors; outputs written to S3 and read back through the store's S3 paths."""
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast.store import TokenStore, read_embeddings
    from thinkfast.utils import fs

    fast_dir, slow_dir = models
    local = str(tmp_path / "synth")
    _write_synth(local, 8)
    rows = []
    for row in _read_dir(local).select(["key", "captions", "jpg"]).to_pylist():
        url = f"{s3_bucket}/media/{row['key']}.png"
        fs.write_bytes(url, row["jpg"])
        rows.append({"key": row["key"], "captions": row["captions"], "url": url})
    rows.append({"key": "url-missing", "captions": ["a red circle"], "url": f"{s3_bucket}/media/nope.png"})
    rows.append({"key": "url-http", "captions": ["a red circle"], "url": "http://example.invalid/x.png"})
    corpus = f"{s3_bucket}/corpus"
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    fs.write_bytes(f"{corpus}/part-00000.parquet", sink.getvalue())
    fast_uri, slow_uri = f"{s3_bucket}/models/fast", f"{s3_bucket}/models/slow"
    FastModel.from_pretrained(fast_dir).save_pretrained(fast_uri)
    SlowModel.from_pretrained(slow_dir).save_pretrained(slow_uri)
    out = f"{s3_bucket}/emb"

    manifest = embed(corpus, out, fast=fast_uri, slow=slow_uri, config=EmbedConfig(batch_size=4, progress=False))
    assert manifest["counts"] == {"in": 10, "embedded": 8, "rejected": 2,
                                  "rejected_by_reason": {"decode:fetch_failed": 2}, "skipped": 0}
    assert fs.read_json(f"{out}/manifest.json")["counts"]["embedded"] == 8

    keys, vectors = read_embeddings(out)
    assert sorted(keys) == sorted(r["key"] for r in rows[:8])
    tokens = TokenStore.open(out).get(keys)
    by_key = {r["key"]: r for r in rows}
    from thinkfast.data.media import load_pixels

    columns = validate_corpus_schema(table.schema)
    pixels = torch.stack([load_pixels(by_key[k], columns, IMAGE_SIZE) for k in keys])
    _check_against_models(fast_dir, slow_dir, keys, vectors, pixels, tokens)


@pytest.mark.ray
def test_video_corpus_with_zero_frame_and_corrupt_clips(ray_session, models, tmp_path):
    from thinkfast.store import TokenStore

    fast_dir, slow_dir = models
    corpus = str(tmp_path / "videos")
    _write_synth(corpus, 3, video=True)
    schema = read_table(corpus).schema
    bad = pa.Table.from_pylist(
        [
            {"key": "vid-zero-frames", "captions": ["a red circle"], "mp4": _zero_frame_video(), "split": "train"},
            {"key": "vid-corrupt", "captions": ["a red circle"], "mp4": b"\x00\x00\x00\x18ftypmp42 broken", "split": "train"},
        ],
        schema=pa.schema([f.with_nullable(True) for f in schema]),
    )
    pq.write_table(bad, os.path.join(corpus, "part-99999.parquet"))
    out = str(tmp_path / "emb")
    manifest = embed(corpus, out, fast=fast_dir, slow=slow_dir,
                     config=EmbedConfig(batch_size=2, num_frames=NUM_FRAMES, progress=False))

    assert manifest["counts"]["in"] == 5 and manifest["counts"]["embedded"] == 3
    assert manifest["num_frames"] == NUM_FRAMES
    reasons = {r["key"]: r["reason"] for r in _read_dir(os.path.join(out, "rejected")).to_pylist()}
    assert reasons == {"vid-zero-frames": "no_frames", "vid-corrupt": "corrupt"}
    fast = _read_dir(os.path.join(out, "fast"))
    keys = fast.column("key").to_pylist()
    vectors = np.asarray(fast.column("embedding").combine_chunks().flatten()).reshape(len(keys), -1)
    pixels = _decoded(corpus, keys, num_frames=NUM_FRAMES)  # (N, F, 3, S, S)
    _check_against_models(fast_dir, slow_dir, keys, vectors, pixels, TokenStore.open(out).get(keys))


# --------------------------------------------------------------------------- fail fast, no Ray


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if embed reaches Ray or clears the output directory."""
    import thinkfast_pipelines.embed.job as embed_run

    def forbidden(*args, **kwargs):
        raise AssertionError("embed reached Ray / the clean-up before rejecting its input")

    monkeypatch.setattr("thinkfast_pipelines.ray_utils.init_ray", forbidden)
    monkeypatch.setattr(embed_run, "clear_outputs", forbidden)


def _table_corpus(tmp_path, table: pa.Table) -> str:
    path = tmp_path / "corpus"
    path.mkdir()
    pq.write_table(table, path / "part-0.parquet")
    return str(path)


@pytest.mark.parametrize(
    "table, match",
    [
        (pa.table({"key": ["a"], "captions": [["x"]]}), "no media column"),
        (pa.table({"key": ["a"], "captions": [["x"]], "jpg": ["not bytes"]}), "'jpg' has type string"),
        (pa.table({"key": [1], "captions": [["x"]], "jpg": [b"x"]}), "'key' has type int64"),
    ],
    ids=["missing-media", "jpg-as-string", "int-key"],
)
def test_bad_schema_fails_before_any_work(no_ray, models, tmp_path, table, match):
    corpus = _table_corpus(tmp_path, table)
    out = tmp_path / "emb"
    (out / "fast").mkdir(parents=True)
    (out / "fast" / "keep.parquet").write_bytes(b"previous run")
    with pytest.raises(CorpusSchemaError, match=match):
        embed(corpus, str(out), fast=models[0])
    assert (out / "fast" / "keep.parquet").exists()


def test_cli_prints_one_line_and_exits_2(no_ray, models, tmp_path, capsys):
    from thinkfast_pipelines.cli import main

    corpus = _table_corpus(tmp_path, pa.table({"key": ["a"], "captions": [["x"]]}))
    rc = main(["embed", "--corpus", corpus, "--fast", models[0], "--out", str(tmp_path / "emb"), "--no-progress"])
    # the CLI may first say where its log file is; the failure itself is one line
    err = [line for line in capsys.readouterr().err.strip().splitlines() if " logs in " not in line]
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("thinkfast embed: error: ") and "corpus has no media column" in err[0]


def test_bad_flags_and_checkpoints_fail_before_any_work(no_ray, models, tmp_path):
    corpus = str(tmp_path / "c")
    _write_synth(corpus, 2)
    with pytest.raises(EmbedError, match="--fast, --slow"):
        embed(corpus, str(tmp_path / "o"))
    with pytest.raises(EmbedError, match="--texts needs --fast"):
        embed(corpus, str(tmp_path / "o"), slow=models[1], texts=True)
    with pytest.raises(EmbedError, match="--actors"):
        embed(corpus, str(tmp_path / "o"), fast=models[0], config=EmbedConfig(actors=0))
    with pytest.raises(ThinkfastError):
        embed(corpus, str(tmp_path / "o"), fast=str(tmp_path / "no-such-model"))
    with pytest.raises(EmbedError, match="max_frames"):
        video = str(tmp_path / "v")
        _write_synth(video, 1, video=True)
        embed(video, str(tmp_path / "o"), slow=models[1], config=EmbedConfig(num_frames=64))


# --------------------------------------------------------------------------- stages, no Ray


def test_decode_batch_marks_bad_rows_and_keeps_good_pixels():
    from thinkfast_pipelines.embed.stages import DECODED_SCHEMA, decode_batch
    from thinkfast.data.media import load_pixels

    table = pa.table({"key": ["ok", "bad", None], "captions": [["x"]] * 3,
                      "jpg": pa.array([_png(40), b"junk", _png(40)], pa.binary())})
    columns = validate_corpus_schema(table.schema)
    out = decode_batch(table, columns=columns, image_size=IMAGE_SIZE, num_frames=1)
    rows = out.to_pylist()  # good rows first, then the rejected ones in input order
    assert out.schema == DECODED_SCHEMA
    assert [(r["key"], r["stage"], r["reason"]) for r in rows] == [
        ("ok", None, None), ("bad", "decode", "corrupt"), (None, "read", "missing_key")]
    pixels = np.frombuffer(rows[0]["pixels"], np.float32).reshape(rows[0]["pixel_shape"])
    expected = load_pixels(table.slice(0, 1).to_pylist()[0], columns, IMAGE_SIZE, 1).numpy()
    np.testing.assert_array_equal(pixels, expected)
    assert rows[1]["pixels"] is None and rows[1]["detail"]


def test_embed_actor_rejects_non_finite_rows_only(models):
    from thinkfast_pipelines.embed.stages import DECODED_SCHEMA, EmbedActor

    good = np.random.default_rng(0).standard_normal((3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    nan = good.copy()
    nan[0, 0, 0] = np.nan
    batch = pa.Table.from_pydict(
        {"key": ["g", "n", "r"], "stage": [None, None, "decode"], "reason": [None, None, "corrupt"],
         "detail": [None, None, "junk"], "pixels": [good.tobytes(), nan.tobytes(), None],
         "pixel_shape": [list(good.shape), list(nan.shape), None]},
        schema=DECODED_SCHEMA,
    )
    expected = [("g", None, None), ("n", "embed", "non_finite"), ("r", "decode", "corrupt")]
    both = EmbedActor(models[0], models[1], threads=1)(batch)
    assert [(r["key"], r["stage"], r["reason"]) for r in both.to_pylist()] == expected
    rows = both.to_pylist()
    assert rows[0]["embedding"] is not None and rows[0]["tokens"] is not None
    assert rows[1]["embedding"] is None and rows[1]["tokens"] is None

    # fast only / slow only: the same statuses, only that model's column, same values
    fast_only = EmbedActor(models[0], None, threads=1)(batch)
    slow_only = EmbedActor(None, models[1], threads=1)(batch)
    assert fast_only.column_names == ["key", "stage", "reason", "detail", "embedding", "embedded_at"]
    assert slow_only.column_names == ["key", "stage", "reason", "detail", "tokens", "token_shape", "embedded_at"]
    for table in (fast_only, slow_only):
        assert [(r["key"], r["stage"], r["reason"]) for r in table.to_pylist()] == expected
    assert fast_only.column("embedding").to_pylist() == both.column("embedding").to_pylist()
    assert slow_only.column("tokens").to_pylist() == both.column("tokens").to_pylist()


def test_explode_captions_one_row_per_caption_blank_kept_as_null():
    from thinkfast_pipelines.embed.stages import explode_captions

    table = pa.table({"key": ["a", "b", "c"], "captions": [["x y", " "], None, ["z"]]})
    out = explode_captions(table, caption_column="captions").to_pylist()
    assert out == [
        {"key": "a", "caption_index": 0, "caption": "x y"},
        {"key": "a", "caption_index": 1, "caption": None},
        {"key": "c", "caption_index": 0, "caption": "z"},
    ]
    single = explode_captions(pa.table({"key": ["a"], "caption": ["hello"]}), caption_column="caption")
    assert single.to_pylist() == [{"key": "a", "caption_index": 0, "caption": "hello"}]


def test_sink_splits_a_bundle_and_a_retried_write_replaces_its_files(tmp_path):
    """A write task that Ray retries with the same bundle must not add a second copy."""
    from ray.data.datasource import WriteResult

    from thinkfast_pipelines.embed.sink import EmbeddingSink
    from thinkfast_pipelines.embed.stages import _fixed_size_list
    from thinkfast.store import TokenStore, finalize_token_store, read_embeddings

    dim, t, d = 4, 3, 2
    tokens = np.arange(2 * t * d, dtype=np.float16).reshape(2, t, d)
    bundle = pa.table({
        "key": ["a", "b", "c"],
        "stage": [None, None, "decode"],
        "reason": [None, None, "corrupt"],
        "detail": [None, None, "junk"],
        "embedding": _fixed_size_list([np.ones(dim, np.float32), np.full(dim, 2, np.float32), None], dim),
        "tokens": pa.array([tokens[0].tobytes(), tokens[1].tobytes(), None], pa.large_binary()),
        "token_shape": pa.array([[t, d], [t, d], None], pa.list_(pa.int32())),
    })
    out = str(tmp_path / "emb")
    sink = EmbeddingSink(out, rows_per_write=8)
    returns = [sink.write([bundle], ctx=None), sink.write([bundle], ctx=None)]  # the retry
    sink.on_write_complete(WriteResult(num_rows=6, size_bytes=0, write_returns=returns))
    assert sink.result["embedded"] == 4 and sink.result["rejected:decode:corrupt"] == 2  # counted per call

    keys, vectors = read_embeddings(out)  # raises on duplicate keys
    assert keys == ["a", "b"] and vectors.tolist() == [[1.0] * dim, [2.0] * dim]
    assert _read_dir(os.path.join(out, "rejected")).to_pylist() == [
        {"key": "c", "stage": "decode", "reason": "corrupt", "detail": "junk"}]
    manifest = finalize_token_store(os.path.join(out, "tokens"))
    assert manifest["count"] == 2 and manifest["duplicates_dropped"] == 0
    np.testing.assert_array_equal(TokenStore.open(out).get(["b", "a"]), tokens[::-1])

    # --token-format int8: the same bundle, stored as codes + per-token scales
    from thinkfast.store.quantize import dequantize_int8, quantize_int8

    out8 = str(tmp_path / "emb8")
    sink8 = EmbeddingSink(out8, rows_per_write=8, token_format="int8")
    sink8.on_write_complete(WriteResult(num_rows=3, size_bytes=0, write_returns=[sink8.write([bundle], ctx=None)]))
    assert finalize_token_store(os.path.join(out8, "tokens"))["dtype"] == "int8"
    np.testing.assert_array_equal(TokenStore.open(out8).get(["b", "a"]), dequantize_int8(*quantize_int8(tokens[::-1])))
