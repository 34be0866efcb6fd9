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

