"""The generated corpus: determinism, captions true of the pixels (checked here with our
own parser and geometry, not the generator's), the hard-pair property, video motion,
writing to S3, and the CLI."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from thinkfast_pipelines.cli import main as cli_main
from thinkfast.data.image import decode_image
from thinkfast.data.reader import inspect_corpus, read_table
from thinkfast.data.synth import SynthConfig, generate_table, hard_pairs, iter_shards, plan_groups, write_synth
from thinkfast.data.synth_scene import COLOURS
from thinkfast.data.video import decode_video
from thinkfast.errors import ThinkfastError

SHAPES = "circle|square|triangle|diamond|cross"
NP = re.compile(rf"\b(?:a|the) (small|large) ({'|'.join(COLOURS)}) ({SHAPES})\b")
REL = {"to the left of": "left", "left of": "left", "on the left of": "left",
       "to the right of": "right", "right of": "right", "on the right of": "right",
       "above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below"}
POS = {"top left": ("top", "left"), "top right": ("top", "right"), "bottom left": ("bottom", "left"),
       "bottom right": ("bottom", "right"), "the top": ("top", "centre"), "the bottom": ("bottom", "centre"),
       "the centre": ("middle", "centre"), "the middle": ("middle", "centre"),
       "the left": ("middle", "left"), "the right": ("middle", "right")}
DIRS = r"(to the right|to the left|rightwards|leftwards|right|left|upwards|downwards|up|down)"
MOTION = re.compile(rf"(?:first moves|moves|is moving|moving|slides|goes) {DIRS}(?:,? (?:and )?then {DIRS})?\b")


# ----------------------------------------------------------------------------- our own checker
def find(scene: dict, desc: tuple[str, str, str]) -> dict:
    hits = [o for o in scene["objects"] if (o["size"], o["colour"], o["shape"]) == desc]
    assert len(hits) == 1, f"{desc} named but {len(hits)} such objects in the scene"
    return hits[0]


def holds(rel: str, a: dict, b: dict) -> bool:
    (ax, ay), (bx, by) = a["centre"], b["centre"]
    dx, dy = bx - ax, by - ay
    return {"left": dx > 0 and dx >= 2 * abs(dy), "right": dx < 0 and -dx >= 2 * abs(dy),
            "above": dy > 0 and dy >= 2 * abs(dx), "below": dy < 0 and -dy >= 2 * abs(dx)}[rel]


def grid_cell(o: dict, size: int) -> tuple[str, str]:
    x, y = o["centre"]
    return ("top", "middle", "bottom")[min(int(3 * y / size), 2)], ("left", "centre", "right")[min(int(3 * x / size), 2)]


def path(o: dict) -> tuple[str, ...]:
    """Directions of the frame-to-frame steps (2:1 dominance), repeats merged."""
    out: list[str] = []
    for (x0, y0), (x1, y1) in zip(o.get("track", []), o.get("track", [])[1:]):
        dx, dy = x1 - x0, y1 - y0
        d = None
        if abs(dx) >= 2 * abs(dy) and dx:
            d = "right" if dx > 0 else "left"
        elif abs(dy) >= 2 * abs(dx) and dy:
            d = "down" if dy > 0 else "up"
        if d and (not out or out[-1] != d):
            out.append(d)
    return tuple(out)


def caption_true(caption: str, scene: dict) -> bool:
    """Parse one generated caption and check every claim in it against the scene."""
    tone = re.search(r"on a (dark|light) background", caption)
    if tone:
        if tone.group(1) != scene["background"]["tone"]:
            return False
        caption = caption[: tone.start()].strip()
    nps = [(m.start(), m.end(), m.groups()) for m in NP.finditer(caption)]
    if not nps:
        return False
    for _, _, desc in nps:
        if not any((o["size"], o["colour"], o["shape"]) == desc for o in scene["objects"]):
            return False
    if scene["num_frames"] > 1:
        motion = MOTION.search(caption)
        if motion is None:
            return False
        mover = find(scene, [d for s, e, d in nps if s < motion.start()][-1])
        words = [w for w in motion.groups() if w]
        said = tuple(next(d for d in ("right", "left", "up", "down") if d in w) for w in words)
        if path(mover) != said:  # the words' order must be the order in time
            return False
        others = [find(scene, d) for _, _, d in nps if d != (mover["size"], mover["colour"], mover["shape"])]
        for other in others:
            d0 = np.hypot(*np.subtract(mover["track"][0], other["centre"]))
            d1 = np.hypot(*np.subtract(mover["track"][-1], other["centre"]))
            if "towards" in caption and not d1 < d0:
                return False
            if "away from" in caption and not d1 > d0:
                return False
            if re.search(r"stays still|not moving|does not move", caption) and len({tuple(p) for p in other["track"]}) != 1:
                return False
        return True
    if len(nps) == 1:
        pos = next((v for k, v in sorted(POS.items(), key=lambda kv: -len(kv[0])) if k in caption), None)
        return pos is not None and grid_cell(find(scene, nps[0][2]), scene["width"]) == pos
    for clause in re.split(r",? and ", caption):
        found = [(m.start(), m.end(), m.groups()) for m in NP.finditer(clause)]
        if len(found) != 2:
            return False
        between = clause[found[0][1]: found[1][0]].strip()
        between = between[3:] if between.startswith("is ") else between
        if between not in REL or not holds(REL[between], find(scene, found[0][2]), find(scene, found[1][2])):
            return False
    return True


def colour_at(pixels: np.ndarray, xy) -> str:
    """Palette colour nearest to the 3x3 mean around a point."""
    x, y = int(round(xy[0])), int(round(xy[1]))
    patch = pixels[y - 1: y + 2, x - 1: x + 2].reshape(-1, 3).mean(axis=0)
    return min(COLOURS, key=lambda c: float(np.sum((patch - np.array(COLOURS[c])) ** 2)))


def rows_by_key(table) -> dict[str, dict]:
    return {r["key"]: {**r, "scene": json.loads(r["scene"])} for r in table.to_pylist()}


@pytest.fixture(scope="module")
def images():
    cfg = SynthConfig(num_images=160, seed=7, hard_pair_fraction=0.7, captions_per_image=8)
    return cfg, generate_table(cfg, plan_groups(cfg))


@pytest.fixture(scope="module")
def clips():
    cfg = SynthConfig(num_images=20, seed=5, video=True, num_frames=6, hard_pair_fraction=0.8, captions_per_image=4)
    return cfg, generate_table(cfg, plan_groups(cfg))


# ----------------------------------------------------------------------------- tests
def test_determinism_across_runs_and_worker_counts():
    cfg = SynthConfig(num_images=40, seed=11, shard_size=10)
    serial = list(iter_shards(cfg, workers=1))
    assert len(serial) >= 3
    assert all(a.equals(b) for a, b in zip(serial, iter_shards(cfg, workers=2)))  # spawned processes
    again = generate_table(cfg, plan_groups(cfg))
    assert again.equals(pa.concat_tables(serial))
    other_cfg = SynthConfig(num_images=40, seed=12, shard_size=10)
    other = generate_table(other_cfg, plan_groups(other_cfg))
    assert other.column("key").equals(again.column("key"))  # same keys, different content
    assert not other.column("jpg").equals(again.column("jpg"))
    assert not other.column("captions").equals(again.column("captions"))


def test_schema_splits_and_vocabulary(images):
    cfg, table = images
    rows = rows_by_key(table)
    assert table.num_rows == 160 and len(rows) == 160
    assert Counter(r["split"] for r in rows.values()).keys() == {"train", "val", "test"}
    assert all(len(r["captions"]) == 8 and r["width"] == r["height"] == 64 for r in rows.values())
    counts = Counter(len(r["scene"]["objects"]) for r in rows.values())
    assert set(counts) == {1, 2, 3}
    words = Counter(w for r in rows.values() for c in r["captions"] for w in c.replace(",", " ").split())
    assert len(words) < 80, sorted(words)  # small closed vocabulary for the word tokenizer
    sizes = {w: [o["radius"] for r in rows.values() for o in r["scene"]["objects"] if o["size"] == w and o["shape"] == "circle"]
             for w in ("small", "large")}
    assert max(sizes["small"]) < min(sizes["large"])


def test_captions_agree_with_scene_and_pixels(images):
    _, table = images
    for key, row in rows_by_key(table).items():
        scene = row["scene"]
        pixels = np.asarray(decode_image(row["jpg"]), dtype=np.float32)
        for o in scene["objects"]:
            assert colour_at(pixels, o["centre"]) == o["colour"], (key, o)
        luminance = float(np.median(pixels.mean(axis=2)))
        assert (luminance < 128) == (scene["background"]["tone"] == "dark"), key
        for caption in row["captions"]:
            assert caption_true(caption, scene), (key, caption, scene)


def test_checker_rejects_false_captions(images):
    """The checker above is not vacuous: flipped relations, colours and positions fail."""
    _, table = images
    rows = list(rows_by_key(table).values())
    flips = {"left of": "right of", "above": "below", " red ": " blue ", "top": "bottom", "the left": "the right"}
    rejected = 0
    for row in rows:
        for caption in row["captions"]:
            for a, b in flips.items():
                if a in caption and b not in caption:
                    rejected += not caption_true(caption.replace(a, b), row["scene"])
    assert rejected > 50


def test_hard_pairs_change_one_thing_and_no_caption_fits_the_partner(images):
    _, table = images
    rows = rows_by_key(table)
    pairs = hard_pairs(table)
    kinds = Counter(k for _, _, k in pairs)
    assert set(kinds) == {"colour_swap", "relation_flip", "position_flip"} and min(kinds.values()) >= 5
    for a, b, kind in pairs:
        x, y = rows[a], rows[b]
        sx, sy = x["scene"], y["scene"]
        assert x["split"] == y["split"] and sx["group"] == sy["group"]
        assert sx["pair"] == {"kind": kind, "partner": b} and sy["pair"] == {"kind": kind, "partner": a}
        assert sx["background"] == sy["background"]
        ox, oy = sx["objects"], sy["objects"]
        changed = [i for i in range(len(ox)) if ox[i] != oy[i]]
        if kind == "colour_swap":
            (i, j) = changed
            assert (ox[i]["colour"], ox[j]["colour"]) == (oy[j]["colour"], oy[i]["colour"])
            assert ox[i]["shape"] != ox[j]["shape"] and ox[i]["size"] == ox[j]["size"]
            assert [o["centre"] for o in ox] == [o["centre"] for o in oy]
        elif kind == "relation_flip":
            (i, j) = changed
            assert (ox[i]["centre"], ox[j]["centre"]) == (oy[j]["centre"], oy[i]["centre"])
            assert [o["colour"] for o in ox] == [o["colour"] for o in oy]
        else:
            assert len(ox) == 1 and grid_cell(ox[0], 64) != grid_cell(oy[0], 64)
        # every caption names the difference: none is true of the partner
        for cap in x["captions"]:
            assert not caption_true(cap, sy), (a, b, cap)
        for cap in y["captions"]:
            assert not caption_true(cap, sx), (b, a, cap)
        # ... yet the same attribute words describe both (what a bag of words sees)
        attrs = lambda caps: {frozenset(w for m in NP.finditer(c) for w in m.groups()) for c in caps}  # noqa: E731
        if kind != "position_flip":
            assert attrs(x["captions"]) == attrs(y["captions"])
        # pooled pixels (mean colour) are the same, local pixels differ
        px = np.asarray(decode_image(x["jpg"]), dtype=np.float32)
        py = np.asarray(decode_image(y["jpg"]), dtype=np.float32)
        assert np.abs(px.mean(axis=(0, 1)) - py.mean(axis=(0, 1))).max() < 2.0, (a, b, kind)
        assert np.abs(px - py).mean() > 1.0


def test_video_clips_motion_captions_and_time_reversal(clips):
    cfg, table = clips
    rows = rows_by_key(table)
    assert "mp4" in table.column_names and "jpg" not in table.column_names
    for key, row in rows.items():
        scene = row["scene"]
        frames, info = decode_video(row["mp4"], cfg.num_frames)
        assert info.num_source_frames == cfg.num_frames and info.padding == "none"
        first, last = (np.asarray(f, dtype=np.float32) for f in (frames[0], frames[-1]))
        for o in scene["objects"]:
            assert colour_at(first, o["track"][0]) == o["colour"], key
            assert colour_at(last, o["track"][-1]) == o["colour"], key
        assert sum(bool(path(o)) for o in scene["objects"]) == 1
        for caption in row["captions"]:
            assert caption_true(caption, scene), (key, caption)
    turning = [r for r in rows.values() if any(len(path(o)) == 2 for o in r["scene"]["objects"])]
    assert turning, "no clip with a turn"
    for row in turning:  # the same two direction words in the other order are false
        for caption in row["captions"]:
            m = MOTION.search(caption)
            swapped = caption[: m.start(1)] + m.group(2) + caption[m.end(1): m.start(2)] + m.group(1) + caption[m.end(2):]
            assert not caption_true(swapped, row["scene"]), swapped
    pairs = hard_pairs(table)
    assert "time_reverse" in {k for _, _, k in pairs}
    for a, b, kind in pairs:
        if kind != "time_reverse":
            continue
        fa, _ = decode_video(rows[a]["mp4"], cfg.num_frames)
        fb, _ = decode_video(rows[b]["mp4"], cfg.num_frames)
        va = np.stack([np.asarray(f, dtype=np.float32) for f in fa])  # (F, H, W, 3)
        vb = np.stack([np.asarray(f, dtype=np.float32) for f in fb])
        assert np.abs(va.mean(axis=0) - vb.mean(axis=0)).mean() < 2.0  # frame-averaged: alike
        assert np.abs(va - vb).mean() > 2.0  # in order: different
        # literally the same frames backwards (up to H.264 re-encoding noise)
        assert np.abs(va - vb[::-1]).mean() < 0.5 * np.abs(va - vb).mean()
        assert np.abs(va.mean(axis=(1, 2)) - vb[::-1].mean(axis=(1, 2))).max() < 1.0
        for cap in rows[a]["captions"]:
            assert not caption_true(cap, rows[b]["scene"]), cap


def test_write_to_s3_and_read_back(s3_bucket, tmp_path):
    cfg = SynthConfig(num_images=24, seed=3, shard_size=10)
    result = write_synth(f"{s3_bucket}/synth", cfg)
    assert result.num_rows == 24 and len(result.files) == 3 and sum(result.splits.values()) == 24
    info = inspect_corpus(f"{s3_bucket}/synth")
    assert info.num_rows == 24 and info.columns.media == "jpg" and info.columns.has_scene
    local = write_synth(str(tmp_path / "local"), cfg)
    assert read_table(f"{s3_bucket}/synth").equals(read_table(local.out))
    with pytest.raises(ThinkfastError, match="cannot write"):
        write_synth("s3://no-such-bucket-here/synth", SynthConfig(num_images=2))


def test_cli(tmp_path, capsys):
    out = str(tmp_path / "c")
    assert cli_main(["synth", "--out", out, "--images", "12", "--captions-per-image", "2", "--seed", "1"]) == 0
    assert "wrote 12 images" in capsys.readouterr().out
    assert read_table(out).num_rows == 12
    assert cli_main(["synth", "--out", out, "--images", "5"]) == 2  # refuses to mix with an old corpus
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["synth", "--out", out, "--images", "5", "--overwrite"]) == 0
    assert read_table(out).num_rows == 5
    assert cli_main(["synth", "--out", out, "--images", "5", "--image-size", "33", "--overwrite"]) == 2
    assert "--image-size" in capsys.readouterr().err


def test_plan_fractions_splits_and_shards():
    from thinkfast.data.synth import shard_groups

    cfg = SynthConfig(num_images=2000, hard_pair_fraction=0.4, val_fraction=0.1, test_fraction=0.2, seed=2)
    groups = plan_groups(cfg)
    assert sum(g.size for g in groups) == 2000 and [g.first for g in groups] == sorted(g.first for g in groups)
    paired = sum(g.size for g in groups if g.size == 2) / 2000
    assert 0.35 < paired < 0.45
    share = Counter()
    for g in groups:
        share[g.split] += 1
    assert abs(share["test"] / len(groups) - 0.2) < 0.01 and abs(share["val"] / len(groups) - 0.1) < 0.01
    shards = shard_groups(groups, 300)
    assert all(sum(g.size for g in s) <= 301 for s in shards) and sum(len(s) for s in shards) == len(groups)
    tiny = plan_groups(SynthConfig(num_images=3, hard_pair_fraction=0.0))
    assert sorted(g.split for g in tiny) == ["test", "train", "val"]  # every split, even at 3 rows
