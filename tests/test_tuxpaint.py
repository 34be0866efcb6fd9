"""The Tux Paint stamps loader on a fixture written here in the package's layout: captions
from the first line of each .txt, alpha composited on the background, rejections with
reasons (SVG only, empty description, corrupt PNG), a concept-grouped split and the
photo/drawing column."""

from __future__ import annotations

import glob
import io
import os

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from thinkfast.data.schema import validate_corpus_schema
from thinkfast.data.tuxpaint import concept_of, fetch_tuxpaint, load_tuxpaint, split_of_stamp


def _stamp(root: str, rel: str, rgba: np.ndarray | None, text: str | None, dat: str | None = None,
           svg: bool = False, raw: bytes | None = None) -> None:
    base = os.path.join(root, *rel.split("/"))
    os.makedirs(os.path.dirname(base), exist_ok=True)
    if rgba is not None:
        Image.fromarray(rgba, "RGBA").save(base + ".png")
    if raw is not None:
        with open(base + ".png", "wb") as f:
            f.write(raw)
    if svg:
        with open(base + ".svg", "w") as f:
            f.write("<svg xmlns='http://www.w3.org/2000/svg'/>")
    if text is not None:
        with open(base + ".txt", "w", encoding="utf-8") as f:
            f.write(text)
    if dat is not None:
        with open(base + ".dat", "w") as f:
            f.write(dat)


def _photo_like(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (40, 48, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:8, :8, 3] = 0  # a transparent corner
    return rgba


def _flat_drawing() -> np.ndarray:
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[5:35, 5:35] = (200, 30, 30, 255)
    return rgba


def test_fixture_becomes_a_corpus_with_reasons(tmp_path) -> None:
    stamps = str(tmp_path / "stamps")
    _stamp(stamps, "animals/mammals/zebra", _photo_like(0), "A zebra.\nfr.utf8=Un zèbre.\n")
    _stamp(stamps, "food/fruit/apple_red", _photo_like(1), "A red apple.\nde.utf8=Ein roter Apfel.\n")
    _stamp(stamps, "food/fruit/apple_granny_smith", _photo_like(2), "A green apple.\n")
    _stamp(stamps, "symbols/shapes/cartoon/heart", _photo_like(3), "A heart.\n")  # cartoon folder -> drawing
    _stamp(stamps, "symbols/shapes/star", _flat_drawing(), "A star.\n", dat="colorable\n")
    _stamp(stamps, "symbols/shapes/square", _flat_drawing(), "A square.\n")  # flat colours -> drawing
    _stamp(stamps, "space/rocket", None, "A rocket.\n", svg=True)  # SVG only
    _stamp(stamps, "town/house", _photo_like(4), "\n")  # empty description
    _stamp(stamps, "town/shop", None, "A shop.\n", raw=b"\x89PNG not really")  # corrupt
    result = load_tuxpaint(str(tmp_path / "corpus"), stamps_dir=stamps)

    assert result.num_rows == 6
    assert result.rejected == {"unsupported": 1, "no_captions": 1, "corrupt": 1}
    assert result.num_rows + sum(result.rejected.values()) == 9  # every stamp accounted for
    files = sorted(glob.glob(str(tmp_path / "corpus" / "part-*.parquet")))
    table = pq.read_table(files)
    validate_corpus_schema(table.schema)
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows["animals/mammals/zebra"]["captions"] == ["A zebra."]  # translations dropped
    assert rows["food/fruit/apple_red"]["category"] == "food"
    kinds = {k: r["kind"] for k, r in rows.items()}
    assert kinds == {"animals/mammals/zebra": "photo", "food/fruit/apple_red": "photo",
                     "food/fruit/apple_granny_smith": "photo", "symbols/shapes/cartoon/heart": "drawing",
                     "symbols/shapes/star": "drawing", "symbols/shapes/square": "drawing"}
    zebra = Image.open(io.BytesIO(rows["animals/mammals/zebra"]["jpg"]))
    assert zebra.format == "JPEG" and zebra.size == (48, 40)
    assert (rows["animals/mammals/zebra"]["width"], rows["animals/mammals/zebra"]["height"]) == (48, 40)
    corner = np.asarray(zebra.convert("RGB"))[:6, :6].astype(int)
    assert corner.min() > 235  # the transparent corner became the white background
    rejected = pq.read_table(str(tmp_path / "corpus" / "_rejected.parquet")).to_pylist()
    assert {r["key"]: r["reason"] for r in rejected} == {"space/rocket": "unsupported", "town/house": "no_captions",
                                                          "town/shop": "corrupt"}


def test_split_is_deterministic_and_keeps_variants_together() -> None:
    assert concept_of("food/fruit/apple_red") == concept_of("food/fruit/apple_granny_smith") == "apple"
    assert concept_of("symbols/math/7") == "7"
    assert split_of_stamp("food/fruit/apple_red") == split_of_stamp("food/fruit/apple_granny_smith")
    keys = ["cat/" + "".join("abcdefghijklmnop"[int(c, 16)] for c in f"{i:04x}") for i in range(2000)]
    splits = [split_of_stamp(k) for k in keys]
    assert splits == [split_of_stamp(k) for k in keys]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.7) < 0.05 and abs(share["val"] - 0.1) < 0.03 and abs(share["test"] - 0.2) < 0.04


def test_a_cached_download_is_reused(tmp_path) -> None:
    stamps = tmp_path / "cache" / "usr" / "share" / "tuxpaint" / "stamps"
    stamps.mkdir(parents=True)
    assert fetch_tuxpaint(str(tmp_path / "cache")) == str(stamps)  # no apt-get call when unpacked already


def test_cli_writes_the_corpus_from_relative_paths(tmp_path, monkeypatch, capsys) -> None:
    from thinkfast_pipelines.cli import main

    _stamp(str(tmp_path / "stamps"), "animals/mammals/zebra", _photo_like(0), "A zebra.\n")
    _stamp(str(tmp_path / "stamps"), "space/rocket", None, "A rocket.\n", svg=True)
    monkeypatch.chdir(tmp_path)
    assert main(["corpus", "tuxpaint", "--stamps-dir", "stamps", "--out", "corpus"]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 rows to " + str(tmp_path / "corpus") in out and "rejected: unsupported 1" in out
    assert pq.read_table(glob.glob(str(tmp_path / "corpus" / "part-*.parquet"))[0]).num_rows == 1
    assert main(["corpus", "tuxpaint", "--stamps-dir", "nowhere", "--out", "c2"]) == 2
    assert "is not a directory of Tux Paint stamps" in capsys.readouterr().err
