"""Precision@5 on the generated corpus: the query grammar, scene checks against the same
geometry the captions were generated with, the metric on a hand-computed case, and the
agreement of the re-ranked path with exhaustive slow scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest

from thinkfast.evaluation.precision import (
    Constraints,
    parse_query,
    precision_at_k,
    query_set,
    satisfies,
    summary,
)


def _obj(size: str, colour: str, shape: str, x: float, y: float) -> dict:
    return {"size": size, "colour": colour, "shape": shape, "centre": [x, y]}


def test_parse_query_grammar() -> None:
    assert parse_query("a small green triangle") == Constraints("single", (("small", "green", "triangle"),))
    assert parse_query("A green triangle.") == Constraints("single", ((None, "green", "triangle"),))
    assert parse_query("a red circle to the left of a blue square") == Constraints(
        "relation", ((None, "red", "circle"), (None, "blue", "square")), "left of")
    assert parse_query("a small yellow diamond is right of a small yellow cross") == Constraints(
        "relation", (("small", "yellow", "diamond"), ("small", "yellow", "cross")), "right of")
    assert parse_query("a large red circle beneath the small blue square").relation == "below"
    assert parse_query("a red circle and a blue square").kind == "two"
    assert parse_query("an image of a small yellow cross under a small red cross") == Constraints(
        "relation", (("small", "yellow", "cross"), ("small", "red", "cross")), "below")
    assert parse_query("there is a small green triangle") == parse_query("a small green triangle")
    for outside in ("a zebra", "a red circle in the top left corner", "red", "a red circle and", ""):
        assert parse_query(outside) is None, outside


def test_satisfies_uses_caption_geometry() -> None:
    # y grows downwards; "left of" needs |dx| >= 2 |dy|
    scene = {"objects": [_obj("small", "red", "circle", 10, 30), _obj("large", "blue", "square", 40, 35)]}
    assert satisfies(parse_query("a red circle left of a blue square"), scene)
    assert satisfies(parse_query("a blue square to the right of a small red circle"), scene)
    assert not satisfies(parse_query("a red circle right of a blue square"), scene)
    assert not satisfies(parse_query("a red circle above a blue square"), scene)
    diagonal = {"objects": [_obj("small", "red", "circle", 10, 10), _obj("large", "blue", "square", 30, 30)]}
    assert not satisfies(parse_query("a red circle left of a blue square"), diagonal)  # no relation on a diagonal
    assert satisfies(parse_query("a small red circle"), scene) and not satisfies(parse_query("a large red circle"), scene)
    assert satisfies(parse_query("a red circle and a blue square"), scene)
    same = {"objects": [_obj("small", "red", "circle", 10, 30)]}
    assert not satisfies(parse_query("a red circle and a red circle"), same)  # two objects, not one twice


def test_generated_captions_satisfy_their_own_scene(tmp_path) -> None:
    """Every caption the grammar covers is true of its scene, and rarely of the others."""
    from thinkfast.data.reader import read_table
    from thinkfast.data.synth import SynthConfig, write_synth

    write_synth(str(tmp_path / "c"), SynthConfig(num_images=120, captions_per_image=5, image_size=64, seed=5),
                workers=1)
    table = read_table(str(tmp_path / "c"), columns=["captions", "scene"]).to_pylist()
    parsed = 0
    for row in table:
        scene = json.loads(row["scene"])
        for caption in row["captions"]:
            c = parse_query(caption)
            if c is not None:
                parsed += 1
                assert satisfies(c, scene), (caption, scene)
    assert parsed >= 150  # single-object and relational captions, with or without a lead-in


def test_precision_at_k_hand_computed() -> None:
    relevance = np.array([[True, False, True, False, False, True],
                          [False, False, False, False, True, False]])
    top = np.array([[0, 1, 2, 3, 4], [4, 0, -1, -1, -1]])
    np.testing.assert_allclose(precision_at_k(top, relevance, 5), [2 / 5, 1 / 5])
    np.testing.assert_allclose(precision_at_k(top, relevance, 1), [1.0, 1.0])
    s = summary(np.array([0.4, 0.2]), [Constraints("single", ()), Constraints("relation", ())])
    assert s["P@5"] == 30.0 and s["P@5_by_kind"] == {"single": 40.0, "relation": 20.0}
    assert s["P@5_queries"] == {"single": 1, "two": 0, "relation": 1}


def test_query_set_keeps_answerable_queries() -> None:
    scenes = [{"objects": [_obj("small", "red", "circle", 10 + i, 30), _obj("large", "blue", "square", 60, 30)]}
              for i in range(6)]
    texts, constraints, relevance = query_set(scenes, min_relevant=5, per_kind=10)
    assert "a small red circle" in texts and "a red circle" in texts and "a large blue square" in texts
    assert all(r.sum() >= 5 for r in relevance) and relevance.shape == (len(texts), 6)
    assert {c.kind for c in constraints} <= {"single", "two", "relation"}
    assert query_set(scenes, min_relevant=5, per_kind=10)[0] == texts  # deterministic


def test_reranking_everything_has_the_precision_of_exhaustive_slow(tmp_path) -> None:
    from thinkfast import FastModel, SlowModel, encode
    from thinkfast.data.reader import read_table
    from thinkfast.data.synth import SynthConfig, write_synth
    from thinkfast.data.tokenizer import WordTokenizer
    from thinkfast.evaluation.gallery import load_gallery
    from thinkfast.evaluation.run import _precision_by_method

    corpus = str(tmp_path / "c")
    write_synth(corpus, SynthConfig(num_images=60, captions_per_image=2, image_size=32, test_fraction=0.5, seed=3),
                workers=1)
    caps = [c for cs in read_table(corpus, columns=["captions"]).column("captions").to_pylist() for c in cs]
    tok = WordTokenizer.build(caps)
    fast, slow = FastModel.from_preset("tiny", tokenizer=tok).eval(), SlowModel.from_preset("tiny", tokenizer=tok).eval()
    gallery = load_gallery(corpus, "test", check_decode_size=32)
    assert gallery.scenes is not None and len(gallery.scenes) == len(gallery.keys)
    vectors = encode.image_vectors(fast, gallery.pixels(32))
    tokens = encode.visual_tokens(slow, gallery.pixels(32))
    pos = {k: i for i, k in enumerate(gallery.keys)}
    rows = _precision_by_method(fast, slow, gallery, vectors, lambda keys: tokens[[pos[k] for k in keys]], None,
                                [3, 1000], True, 0.0, "fast", "slow", min_relevant=2)
    assert set(rows) == {"fast", "slow", "fast+slow rerank@3", "fast+slow rerank@1000"}
    assert rows["fast+slow rerank@1000"] == rows["slow"]  # one scoring path, whole gallery re-ranked
    for row in rows.values():
        assert 0 <= row["P@5"] <= 100 and sum(row["P@5_queries"].values()) > 0
