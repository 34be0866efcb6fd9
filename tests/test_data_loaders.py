"""Flickr30K / COCO Karpathy JSON and VATEX JSON -> corpus Parquet, on fixtures written
here in those exact formats."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from thinkfast.data.image import decode_image
from thinkfast.data.loaders import REJECTED_NAME, load_karpathy, load_vatex
from thinkfast.data.reader import inspect_corpus, read_table
from thinkfast.data.video import decode_video, encode_video
from thinkfast.errors import ThinkfastError


def jpeg(colour, size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def sentence(raw: str) -> dict:
    return {"tokens": raw.lower().split(), "raw": raw, "imgid": 0, "sentid": 0}


@pytest.fixture
def flickr(tmp_path):
    """dataset_flickr30k.json layout; one image missing on disk, one with no sentences."""
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    entries = []
    for i, (split, colour) in enumerate([("train", (255, 0, 0)), ("val", (0, 255, 0)), ("test", (0, 0, 255)),
                                         ("train", (9, 9, 9))]):
        name = f"10000{i}.jpg"
        if i != 3:
            (images / name).write_bytes(jpeg(colour))
        entries.append({"filename": name, "imgid": i, "split": split, "sentids": [5 * i + k for k in range(2)],
                        "sentences": [sentence(f"Picture number {i} ."), sentence(f"Another view of {i}")]})
    entries.append({"filename": "100009.jpg", "imgid": 9, "split": "train", "sentids": [], "sentences": []})
    (images / "100009.jpg").write_bytes(jpeg((1, 1, 1)))
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return path, images


def test_flickr30k_karpathy(flickr, tmp_path):
    path, images = flickr
    result = load_karpathy(str(path), str(images), str(tmp_path / "out"), shard_size=2)
    assert result.num_rows == 3 and len(result.files) == 2
    assert result.rejected == {"missing_media": 1, "no_captions": 1}
    table = read_table(str(tmp_path / "out"))
    assert inspect_corpus(str(tmp_path / "out")).columns.media == "jpg"
    rows = {r["key"]: r for r in table.to_pylist()}
    assert set(rows) == {"100000", "100001", "100002"}
    assert rows["100001"]["split"] == "val" and rows["100001"]["captions"][0] == "Picture number 1 ."
    assert (rows["100002"]["width"], rows["100002"]["height"]) == (48, 32)
    assert decode_image(rows["100002"]["jpg"]).getpixel((5, 5))[2] > 200
    rejected = pq.read_table(tmp_path / "out" / REJECTED_NAME).to_pylist()
    assert {r["key"]: r["reason"] for r in rejected} == {"100003": "missing_media", "100009": "no_captions"}


def test_coco_karpathy_filepath_restval_and_url_mode(tmp_path):
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    (root / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(jpeg((200, 100, 0)))
    data = {"images": [{"filepath": "val2014", "sentids": [1], "filename": "COCO_val2014_000000000042.jpg",
                        "imgid": 0, "split": "restval", "sentences": [sentence("A dog.")], "cocoid": 42}],
            "dataset": "coco"}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    result = load_karpathy(str(tmp_path / "dataset_coco.json"), str(root), str(tmp_path / "out"), embed=False)
    row = read_table(str(tmp_path / "out")).to_pylist()[0]
    assert result.splits == {"train": 1} and row["split"] == "train"
    assert row["url"] == str(root / "val2014" / "COCO_val2014_000000000042.jpg")


def test_vatex(tmp_path):
    videos = tmp_path / "clips"
    videos.mkdir()
    frames = [np.full((32, 32, 3), 30 * i, dtype=np.uint8) for i in range(4)]
    (videos / "Ptf_2VRj-V0_000122_000132.mp4").write_bytes(encode_video(frames))
    (videos / "broken_000001_000011.mp4").write_bytes(b"\x00" * 100)
    data = [{"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": ["A man plays a guitar.", "Someone strums."],
             "chCap": ["一个男人在弹吉他。"]},
            {"videoID": "broken_000001_000011", "enCap": ["Nothing to see."], "chCap": []}]
    path = tmp_path / "vatex_validation_v1.0.json"
    path.write_text(json.dumps(data, ensure_ascii=False))
    result = load_vatex(str(path), str(videos), str(tmp_path / "out"))
    assert result.num_rows == 1 and result.rejected == {"corrupt": 1} and result.splits == {"val": 1}
    row = read_table(str(tmp_path / "out")).to_pylist()[0]
    assert row["captions"] == ["A man plays a guitar.", "Someone strums."] and (row["width"], row["height"]) == (32, 32)
    assert decode_video(row["mp4"], 2)[1].num_source_frames == 4
    with pytest.raises(ThinkfastError, match="split"):
        (tmp_path / "clips.json").write_text(json.dumps(data))
        load_vatex(str(tmp_path / "clips.json"), str(videos), str(tmp_path / "out2"))


def test_bad_annotation_files(tmp_path, capsys):
    with pytest.raises(ThinkfastError, match="not found"):
        load_karpathy(str(tmp_path / "none.json"), str(tmp_path), str(tmp_path / "o"))
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ThinkfastError, match="not valid JSON"):
        load_karpathy(str(tmp_path / "x.json"), str(tmp_path), str(tmp_path / "o"))
    (tmp_path / "y.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "weird"}]}))
    with pytest.raises(ThinkfastError, match="unknown split"):
        load_karpathy(str(tmp_path / "y.json"), str(tmp_path), str(tmp_path / "o"))
    from thinkfast_pipelines.cli import main

    assert main(["corpus", "karpathy", "--json", str(tmp_path / "y.json"), "--images", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "unknown split" in capsys.readouterr().err
