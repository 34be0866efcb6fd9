"""img2dataset's two output formats as embed input, tested on what the real tool wrote.

img2dataset 1.47 pins pandas<3 and webdataset<0.3, so it cannot install beside the
project: ``scripts/img2dataset_fixture.py`` runs it in its own venv (created once under
``~/.cache/thinkfast/venvs/``, about 60 s) against a local HTTP server and committed its
output as ``tests/fixtures/img2dataset/{parquet,webdataset}``. The fast tests read that
fixture; ``test_live_img2dataset_writes_what_the_fixture_holds`` (``slow``) reruns the tool.
The corpus: 6 URLs, 4 images, one 404 and one file of text bytes under an image name.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thinkfast.data import img2dataset
from thinkfast.data.reader import inspect_corpus, read_rows, read_table
from thinkfast.errors import CorpusSchemaError

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "img2dataset"
FORMATS = ("parquet", "webdataset")
KEPT = ["key", "caption", "url", "status", "error_message"]  # img2dataset's columns thinkfast keeps


def _stats(folder: Path) -> dict:
    (stats_file,) = sorted(folder.glob("*_stats.json"))
    return json.loads(stats_file.read_text())


def _rows(folder: Path) -> pa.Table:
    """Every row img2dataset recorded, read in-process with the library readers."""
    corpus = inspect_corpus(str(folder), webdataset=True)
    if corpus.format == "webdataset":
        table = img2dataset.read_webdataset_table(corpus.files, corpus.columns.media)
    else:
        table = read_table(str(folder))
    return table.sort_by("key")


def _check_formats_agree(root: Path) -> dict[str, pa.Table]:
    """Both formats: same rows, same kept columns and image bytes, counts = img2dataset's."""
    tables = {}
    for fmt in FORMATS:
        corpus = inspect_corpus(str(root / fmt), webdataset=True)
        stats = _stats(root / fmt)
        assert corpus.format == fmt and corpus.columns.media == "jpg" and corpus.columns.has_status
        assert corpus.num_rows == stats["count"] == 6
        tables[fmt] = table = _rows(root / fmt)
        statuses = table.column("status").to_pylist()
        assert statuses.count("success") == stats["successes"] == 4
        assert statuses.count("failed_to_download") == stats["failed_to_download"] == 1
        assert statuses.count("failed_to_resize") == stats["failed_to_resize"] == 1
    parquet, webdataset = tables["parquet"], tables["webdataset"]
    assert parquet.select(KEPT).to_pylist() == webdataset.select(KEPT).to_pylist()
    assert parquet.column("jpg").to_pylist() == webdataset.column("jpg").to_pylist()
    failed = [r for r in webdataset.to_pylist() if r["status"] != "success"]
    assert {r["error_message"] for r in failed} == {"HTTP Error 404: File not found", "Image decoding error"}
    assert all(r["jpg"] is None for r in failed)
    return tables


def test_the_fixture_was_written_by_img2dataset_and_both_formats_agree():
    tables = _check_formats_agree(FIXTURE)
    urls = tables["webdataset"].column("url").to_pylist()
    assert all(u.startswith("http://127.0.0.1:") for u in urls)
    # the tar holds only the successful samples, the shard's Parquet every row
    members = [s["__key__"] for s in img2dataset.iter_tar_samples(str(FIXTURE / "webdataset" / "00000.tar"))]
    assert len(members) == 4 and pq.read_table(FIXTURE / "webdataset" / "00000.parquet").num_rows == 6


def test_webdataset_is_refused_in_one_line_where_only_parquet_is_read():
    with pytest.raises(CorpusSchemaError, match="--output_format parquet"):
        inspect_corpus(str(FIXTURE / "webdataset"))
    assert inspect_corpus(str(FIXTURE / "parquet")).format == "parquet"  # parquet output: anyone reads it


def test_read_rows_of_a_webdataset_shard_completes_the_image_from_its_tar():
    """The driver's by-position read (the copy ``--on-duplicate first`` keeps) of a
    webdataset corpus: the metadata Parquet has no image, the tar has it."""
    meta = str(FIXTURE / "webdataset" / "00000.parquet")
    keys = pq.read_table(meta, columns=["key"]).column("key").to_pylist()
    got = read_rows(meta, [3, 0], ["key", "jpg", "status", "error_message"])
    by_key = {r["key"]: r for r in _rows(FIXTURE / "webdataset").to_pylist()}
    assert got.column("key").to_pylist() == [keys[3], keys[0]]
    for row in got.to_pylist():
        assert row["jpg"] == by_key[row["key"]]["jpg"] and row["status"] == by_key[row["key"]]["status"]


def _embed_in_process(folder: Path, fast_dir: str) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
    """decode_batch -> EmbedActor without Ray: key -> vector, key -> (stage, reason, detail)."""
    from thinkfast.models.fast import FastModel
    from thinkfast_pipelines.embed.stages import EmbedActor, decode_batch

    corpus = inspect_corpus(str(folder), webdataset=True)
    rows = _rows(folder).select(corpus.columns.stream_columns(["key", corpus.columns.media]))
    size = FastModel.from_pretrained(fast_dir).config.image_size
    decoded = decode_batch(rows, columns=corpus.columns, image_size=size, num_frames=1)
    out = EmbedActor(fast_dir, None, threads=1)(decoded).to_pylist()
    vectors = {r["key"]: np.asarray(r["embedding"]) for r in out if r["stage"] is None}
    rejects = {r["key"]: (r["stage"], r["reason"], r["detail"]) for r in out if r["stage"] is not None}
    return vectors, rejects


def _check_embeds_agree(results: dict[str, tuple[dict, dict]]) -> None:
    (vp, rp), (vw, rw) = results["parquet"], results["webdataset"]
    assert sorted(vp) == sorted(vw) and len(vp) == 4
    for key in vp:
        np.testing.assert_array_equal(vp[key], vw[key])
    assert rp == rw and len(rp) == 2
    assert sorted((reason, detail) for _, reason, detail in rp.values()) == [
        ("failed_to_download", "img2dataset: HTTP Error 404: File not found"),
        ("failed_to_resize", "img2dataset: Image decoding error"),
    ]


def test_in_process_embed_of_both_formats_gives_the_same_vectors_and_img2dataset_reasons(models):
    _check_embeds_agree({fmt: _embed_in_process(FIXTURE / fmt, models[0]) for fmt in FORMATS})


@pytest.mark.ray
def test_thinkfast_embed_reads_both_formats_directly(ray_session, models, tmp_path):
    from thinkfast.store import read_embeddings
    from thinkfast_pipelines.embed import EmbedConfig, embed

    config = EmbedConfig(batch_size=8, decode_batch_size=8, rows_per_write=16, progress=False)
    results = {}
    for fmt in FORMATS:
        out = tmp_path / fmt
        # --texts on the webdataset run only: its caption stream is the one with new reading code
        manifest = embed(str(FIXTURE / fmt), str(out), fast=models[0], texts=fmt == "webdataset", config=config)
        counts = manifest["counts"]
        assert counts["in"] == _stats(FIXTURE / fmt)["count"] == 6
        assert (counts["embedded"], counts["rejected"]) == (4, 2)
        assert counts["rejected_by_reason"] == {"decode:failed_to_download": 1, "decode:failed_to_resize": 1}
        keys, vectors = read_embeddings(str(out))
        rejected = pa.concat_tables([pq.read_table(out / "rejected" / f) for f in sorted(os.listdir(out / "rejected"))])
        results[fmt] = (dict(zip(keys, vectors)),
                        {r["key"]: (r["stage"], r["reason"], r["detail"]) for r in rejected.to_pylist()})
    _check_embeds_agree(results)
    # captions of every recorded row, the failed ones too (as for any row with bad media)
    out = tmp_path / "webdataset" / "texts"
    text_rows = pa.concat_tables([pq.read_table(out / f) for f in sorted(os.listdir(out))])
    expected = _rows(FIXTURE / "parquet")
    assert sorted(zip(text_rows.column("key").to_pylist(), text_rows.column("caption").to_pylist())) == \
        sorted(zip(expected.column("key").to_pylist(), expected.column("caption").to_pylist()))
    # and the Ray path embeds exactly what the in-process path does
    in_process, _ = _embed_in_process(FIXTURE / "webdataset", models[0])
    for key, vector in results["webdataset"][0].items():
        np.testing.assert_allclose(vector, in_process[key], atol=1e-6, rtol=0)


def _fixture_script():
    spec = importlib.util.spec_from_file_location("img2dataset_fixture", ROOT / "scripts" / "img2dataset_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_live_img2dataset_writes_what_the_fixture_holds(models, tmp_path):
    """The real tool, now: its venv (made if missing), a local HTTP server with a 404 and
    a non-image, both output formats; then the same checks as on the committed fixture."""
    script = _fixture_script()
    python, created_s = script.ensure_venv()
    report = script.build(tmp_path, python)
    assert report["rows"] == 6, report
    tables = _check_formats_agree(tmp_path)
    fixture = _rows(FIXTURE / "webdataset")
    assert tables["webdataset"].schema == fixture.schema  # the layout the fixture pins down
    assert tables["webdataset"].select(["key", "caption", "status", "error_message"]).to_pylist() == \
        fixture.select(["key", "caption", "status", "error_message"]).to_pylist()
    _check_embeds_agree({fmt: _embed_in_process(tmp_path / fmt, models[0]) for fmt in FORMATS})
    print(f"img2dataset venv created in {created_s:.1f} s (0 = reused); runs: {report['img2dataset_s']}")


def test_webdataset_on_s3_reads_as_locally(s3_bucket):
    """The shards on S3 (the moto server): listed, inspected and streamed like local ones."""
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = s3_bucket[len("s3://"):]
    for path in sorted((FIXTURE / "webdataset").iterdir()):
        client.upload_file(str(path), bucket, f"i2d/{path.name}")
    corpus = inspect_corpus(f"{s3_bucket}/i2d", webdataset=True)
    assert corpus.format == "webdataset" and corpus.num_rows == 6
    assert corpus.files == (f"{s3_bucket}/i2d/00000.tar",) and corpus.metadata_files == (f"{s3_bucket}/i2d/00000.parquet",)
    remote = img2dataset.read_webdataset_table(corpus.files, corpus.columns.media).sort_by("key")
    assert remote.to_pylist() == _rows(FIXTURE / "webdataset").to_pylist()
    got = read_rows(corpus.metadata_files[0], [1], ["key", "jpg"])
    assert got.column("jpg")[0].as_py() == {r["key"]: r["jpg"] for r in remote.to_pylist()}[got.column("key")[0].as_py()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_corpus_img2dataset_command_writes_a_training_corpus(fmt, tmp_path, monkeypatch, capsys):
    """``thinkfast corpus img2dataset``: the 4 fetched images become corpus rows with a
    split and their url; the 2 rows img2dataset failed on are rejected with its own status
    and message, so 4 + 2 = the 6 rows it recorded. Relative paths, as a user types them."""
    import shutil

    from thinkfast.data.loaders import REJECTED_NAME
    from thinkfast.data.schema import validate_corpus_schema
    from thinkfast.data.splits import split_of_key
    from thinkfast_pipelines.cli import main

    shutil.copytree(FIXTURE / fmt, tmp_path / "shots")
    monkeypatch.chdir(tmp_path)
    assert main(["corpus", "img2dataset", "--input", "shots", "--out", "corpus"]) == 0
    out = capsys.readouterr().out
    assert "wrote 4 rows" in out and "failed_to_download 1" in out and "failed_to_resize 1" in out

    table = read_table(str(tmp_path / "corpus")).sort_by("key")
    cols = validate_corpus_schema(table.schema)
    assert cols.captions == "captions" and cols.has_split and cols.media == "jpg"
    source = _rows(tmp_path / "shots").filter(pa.compute.equal(pa.compute.field("status"), "success"))
    assert table.column("key").to_pylist() == source.column("key").to_pylist()
    assert table.column("jpg").to_pylist() == source.column("jpg").to_pylist()  # bytes kept as fetched
    assert table.column("url").to_pylist() == source.column("url").to_pylist()
    assert [c[0] for c in table.column("captions").to_pylist()] == source.column("caption").to_pylist()
    assert table.column("split").to_pylist() == [split_of_key(k) for k in table.column("key").to_pylist()]

    rejected = pq.read_table(tmp_path / "corpus" / REJECTED_NAME).sort_by("key").to_pylist()
    failed = _rows(tmp_path / "shots").filter(pa.compute.not_equal(pa.compute.field("status"), "success"))
    assert [(r["key"], r["reason"], r["detail"]) for r in rejected] == [
        (r["key"], r["status"], r["error_message"]) for r in failed.sort_by("key").to_pylist()]
    assert all(r["detail"] for r in rejected)  # img2dataset's message, e.g. the HTTP 404


def test_corpus_img2dataset_rejects_a_repeated_key_and_keeps_the_first(tmp_path):
    """img2dataset run twice into one folder: each key is written once; the repeats are
    rejected rows with their reason, so written + rejected = rows read."""
    import shutil

    from thinkfast.data.loaders import REJECTED_NAME, load_img2dataset

    src = tmp_path / "shots"
    shutil.copytree(FIXTURE / "parquet", src)
    (first,) = sorted(p for p in src.glob("*.parquet"))
    shutil.copy(first, src / ("1" + first.name))  # the same rows again, read second
    result = load_img2dataset(str(src), str(tmp_path / "corpus"))
    assert result.num_rows == 4
    assert result.rejected == {"duplicate_key": 4, "failed_to_download": 2, "failed_to_resize": 2}
    assert result.num_rows + sum(result.rejected.values()) == 12
    keys = read_table(str(tmp_path / "corpus")).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 4
    reasons = pq.read_table(tmp_path / "corpus" / REJECTED_NAME).column("reason").to_pylist()
    assert reasons.count("duplicate_key") == 4


def test_corpus_img2dataset_refuses_a_folder_that_is_not_img2dataset_output(tmp_path):
    from thinkfast.data.loaders import load_img2dataset
    from thinkfast.errors import ThinkfastError

    table = pa.table({"key": ["a"], "captions": [["x"]], "jpg": [b"\xff"]})
    (tmp_path / "c").mkdir()
    pq.write_table(table, tmp_path / "c" / "part-0.parquet")
    with pytest.raises(ThinkfastError, match="not img2dataset output"):
        load_img2dataset(str(tmp_path / "c"), str(tmp_path / "out"))
