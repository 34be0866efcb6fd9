"""Corpus schema validation and streaming Parquet reads, locally and over real S3 (moto)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thinkfast.data.reader import (CorpusNotFoundError, inspect_corpus, iter_batches, list_parquet_files,
                                   read_table, write_table)
from thinkfast.data.schema import corpus_schema, validate_corpus_schema
from thinkfast.errors import CorpusSchemaError

GOOD = {"key": pa.string(), "caption": pa.string(), "jpg": pa.binary()}


def schema(**fields) -> pa.Schema:
    return pa.schema([(k, v) for k, v in fields.items() if v is not None])


def test_img2dataset_layout_is_accepted_and_bytes_win_over_url():
    cols = validate_corpus_schema(schema(key=pa.string(), caption=pa.string(), url=pa.string(), jpg=pa.binary(),
                                         width=pa.int64(), height=pa.int64(), status=pa.string()))
    assert cols.media == "jpg" and cols.captions == "caption" and cols.has_width and not cols.has_split
    cols = validate_corpus_schema(schema(key=pa.large_string(), captions=pa.list_(pa.string()), mp4=pa.large_binary(),
                                         split=pa.string()))
    assert cols.media == "mp4" and cols.is_video and cols.captions == "captions" and cols.has_split
    assert validate_corpus_schema(corpus_schema("url", with_scene=True)).has_scene


@pytest.mark.parametrize("fields, column", [
    (dict(GOOD, key=None), "'key'"),
    (dict(GOOD, key=pa.int64()), "'key'"),
    (dict(GOOD, caption=None), "'caption'"),
    (dict(GOOD, caption=pa.int32()), "'caption'"),
    (dict(GOOD, caption=None, captions=pa.list_(pa.int32())), "'captions'"),
    (dict(GOOD, jpg=None), "'jpg'"),
    (dict(GOOD, jpg=pa.string()), "'jpg'"),
    (dict(GOOD, jpg=None, url=pa.binary()), "'url'"),
    (dict(GOOD, split=pa.int8()), "'split'"),
    (dict(GOOD, width=pa.float32()), "'width'"),
    (dict(GOOD, scene=pa.binary()), "'scene'"),
])
def test_schema_errors_name_the_column(fields, column):
    with pytest.raises(CorpusSchemaError) as e:
        validate_corpus_schema(schema(**fields))
    assert column in str(e.value)


def small_table(n: int, start: int = 0) -> pa.Table:
    return pa.table({
        "key": [f"k{i:03d}" for i in range(start, start + n)],
        "caption": [f"caption {i}" for i in range(start, start + n)],
        "jpg": [bytes([i % 256]) * 10 for i in range(start, start + n)],
        "split": ["test" if i % 5 == 0 else "train" for i in range(start, start + n)],
    })


def write_corpus(root: str, files: int = 3, rows: int = 20) -> None:
    for f in range(files):
        write_table(small_table(rows, f * rows), f"{root}/part-{f:05d}.parquet", row_group_size=7)


def test_local_streaming_split_filter_and_hidden_files(tmp_path):
    write_corpus(str(tmp_path))
    pq.write_table(pa.table({"x": [1]}), tmp_path / "_metadata.parquet")  # skipped: underscore
    assert [p.rsplit("/", 1)[1] for p in list_parquet_files(str(tmp_path))] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    batches = list(iter_batches(str(tmp_path), columns=["key"], batch_size=5))
    assert max(b.num_rows for b in batches) <= 5 and sum(b.num_rows for b in batches) == 60
    assert batches[0].schema.names == ["key"]
    test = read_table(str(tmp_path), columns=["key"], filter_split="test")
    assert test.column_names == ["key"] and test.num_rows == 12
    info = inspect_corpus("file://" + str(tmp_path))
    assert info.num_rows == 60 and info.columns.media == "jpg" and len(info.files) == 3


def test_reader_errors(tmp_path):
    with pytest.raises(CorpusNotFoundError):
        list_parquet_files(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusNotFoundError):
        list_parquet_files(str(tmp_path / "empty"))
    write_corpus(str(tmp_path / "c"), files=1)
    with pytest.raises(CorpusSchemaError, match="'nope'"):
        list(iter_batches(str(tmp_path / "c"), columns=["key", "nope"]))
    write_table(small_table(3).rename_columns(["key", "text", "jpg", "split"]), str(tmp_path / "c" / "part-9.parquet"))
    with pytest.raises(CorpusSchemaError, match="'caption'"):
        inspect_corpus(str(tmp_path / "c"))  # one shard with a different schema fails the corpus
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(CorpusSchemaError, match="not a readable Parquet"):
        inspect_corpus(str(tmp_path / "bad"))


def test_s3_round_trip_through_moto(s3_bucket):
    uri = f"{s3_bucket}/corpus"
    write_corpus(uri, files=2, rows=10)
    files = list_parquet_files(uri)
    assert files == [f"{uri}/part-00000.parquet", f"{uri}/part-00001.parquet"]
    info = inspect_corpus(uri)
    assert info.num_rows == 20 and info.columns.captions == "caption"
    got = read_table(uri)
    want = pa.concat_tables([small_table(10), small_table(10, 10)])
    assert got.equals(want)
    assert sum(b.num_rows for b in iter_batches(uri, batch_size=4, filter_split="test")) == 4


def test_explicit_s3_endpoint_overrides_environment(s3_bucket, s3_server, monkeypatch):
    write_corpus(f"{s3_bucket}/c", files=1, rows=5)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert read_table(f"{s3_bucket}/c", s3_endpoint=s3_server).num_rows == 5
