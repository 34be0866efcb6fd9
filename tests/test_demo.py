"""``thinkfast demo --tiny`` end to end on the session's Ray: every stage runs, the summary
table has every stage, the evaluation has every row, and the service answered the example
queries over HTTP (then was deleted, so later tests see no demo app)."""

from __future__ import annotations

import json

import pytest

from thinkfast_pipelines import demo as demo_mod


@pytest.mark.slow
@pytest.mark.ray
def test_demo_tiny_end_to_end(ray_session, tmp_path):
    from conftest import free_port

    lines: list[str] = []
    summary = demo_mod.demo(str(tmp_path / "demo"), tiny=True, port=free_port(), echo=lines.append)

    stages = [s["stage"] for s in summary["stages"]]
    assert stages == demo_mod.STAGES
    assert all(s["seconds"] > 0 for s in summary["stages"])
    printed = "\n".join(lines)
    for i, stage in enumerate(demo_mod.STAGES, 1):  # progress line per stage, then the summary table
        assert f"[{i}/{len(stages)}] {stage}:" in printed
    table = printed[printed.index("stage "):]
    assert all(stage in table for stage in stages) and "total" in table

    methods = [m["method"] for m in summary["eval"]["methods"]]
    assert methods[:3] == ["fast (NCE)", "fast distilled", "slow"]
    assert [m for m in methods if "rerank@" in m] == [f"fast distilled+slow rerank@{k}" for k in demo_mod.TINY.rerank]

    assert len(summary["queries"]) >= 3
    for answer in summary["queries"]:
        assert answer["top"] and set(answer["timings_ms"]) >= {"encode", "retrieve", "rerank", "total"}
    # the free-form queries are in the precision grammar: their results are checked against the scenes
    free = [a for a in summary["queries"] if a["query"] in demo_mod.FREE_QUERIES]
    assert free and all(0 <= a["correct_in_top"] <= len(a["top"]) for a in free)
    assert "of these show what the query asks" in printed
    saved = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert saved["stages"] == summary["stages"]

    from ray import serve

    assert demo_mod.APP_NAME not in serve.status().applications


def test_demo_cli_rejects_bad_sizes(capsys):
    from thinkfast_pipelines.cli import main

    assert main(["demo", "--tiny", "--images", "5"]) == 2
    assert "thinkfast demo: error:" in capsys.readouterr().err


def _photo_stamps(root) -> str:
    """A Tux Paint layout of real photographs (scikit-image's samples, cropped into variants):
    concept names chosen so that train, val and test each get some (the split is by concept)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    photos = {"chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee(), "astronaut": skimage.data.astronaut(),
              "rocket": skimage.data.rocket(), "hubble": skimage.data.hubble_deep_field(),
              "tissue": skimage.data.immunohistochemistry(), "wheel": skimage.data.colorwheel()}
    stamps = {  # concept stem -> (photo, caption); split_of_stamp: train unless noted
        "cat": ("chelsea", "A cat."), "coffee": ("coffee", "A cup of coffee."),
        "astronaut": ("astronaut", "An astronaut."), "rocket": ("rocket", "A rocket."),
        "galaxy": ("hubble", "A galaxy."), "tissue": ("tissue", "A stained tissue sample."),
        "wheel": ("wheel", "A colour wheel."),
        "mug": ("coffee", "A mug of coffee."), "spaceman": ("astronaut", "A spaceman."),  # val
        "kitty": ("chelsea", "A kitty."), "missile": ("rocket", "A missile."),  # test
    }
    rng = np.random.default_rng(0)
    for stem, (photo, caption) in stamps.items():
        image = photos[photo]
        for variant in range(3):
            h, w = image.shape[:2]
            top, left = rng.integers(0, h // 4), rng.integers(0, w // 4)
            crop = np.ascontiguousarray(image[top:top + 3 * h // 4, left:left + 3 * w // 4])
            name = stem if variant == 0 else f"{stem}-{variant}"
            folder = root / "photos" / stem
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(crop).convert("RGBA").save(folder / f"{name}.png")
            (folder / f"{name}.txt").write_text(f"{caption}\nfr.utf8=...\n", encoding="utf-8")
    return str(root)


@pytest.mark.slow
@pytest.mark.ray
def test_demo_real_end_to_end_on_pretrained_parts(ray_session, tmp_path):
    """``demo --real`` on real photographs in the Tux Paint layout, 1 epoch per stage: the
    photo preset trains on cached frozen-trunk features in Ray Train, and leaves fast/,
    slow/ and fast_nce/ that load as models."""
    import dataclasses

    from conftest import free_port

    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel

    config = dataclasses.replace(demo_mod.REAL, slow_epochs=1, fast_epochs=1, distill_epochs=1, batch_size=8,
                                 rerank=(5,), serve_rerank=5)
    lines: list[str] = []
    work = tmp_path / "real"
    summary = demo_mod.demo(str(work), real=True, stamps_dir=_photo_stamps(tmp_path / "stamps"), port=free_port(),
                            config=config, echo=lines.append)
    assert [s["stage"] for s in summary["stages"]] == demo_mod.REAL_STAGES
    assert summary["corpus"]["rows"] == 33 and all(summary["corpus"]["splits"].get(s) for s in ("train", "val", "test"))
    methods = [m["method"] for m in summary["eval"]["methods"]]
    assert methods == ["fast (NCE)", "fast distilled", "slow", "fast distilled+slow rerank@5"]
    asked = [a["query"] for a in summary["queries"]]
    assert set(demo_mod.REAL_QUERIES) <= set(asked) and all(a["top"] for a in summary["queries"])
    for name in ("fast", "fast_nce"):
        model = FastModel.from_pretrained(str(work / name))
        assert model.config.vision.backbone == "efficientnet_lite0" and model.config.image_head == "concepts"
    assert SlowModel.from_pretrained(str(work / "slow")).config.vision.frozen_stages == 4
    training = json.loads((work / "slow" / "training.json").read_text())
    assert training["config"]["cache_frozen"] and training["steps"] >= 1
