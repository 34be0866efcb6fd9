"""Every subcommand with relative paths, from a working directory that is not the one Ray
workers run in. Before paths were made absolute at the boundary, ``distill --init
fast_nce`` failed inside the Train worker ("fast_nce is not a model directory"), which is
how the README's first command broke for every newcomer while tests with absolute
temporary paths stayed green."""

from __future__ import annotations

import json

import pytest

from thinkfast_pipelines.cli import main


@pytest.mark.slow
@pytest.mark.ray
def test_the_pipeline_runs_from_relative_paths(ray_session, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train = ["--preset", "tiny", "--epochs", "1", "--batch-size", "8", "--workers", "1"]
    steps = [
        ["synth", "--out", "corpus", "--images", "40", "--captions-per-image", "2", "--image-size", "32"],
        ["train-slow", "--corpus", "corpus", "--out", "models/slow", *train],
        ["train-fast", "--corpus", "corpus", "--out", "models/fast_nce", *train],
        ["distill", "--corpus", "corpus", "--out", "models/fast", "--teacher", "models/slow",
         "--init", "models/fast_nce", *train],
        ["embed", "--corpus", "corpus", "--fast", "models/fast", "--slow", "models/slow", "--out", "emb"],
        ["index", "--embeddings", "emb", "--out", "index", "--shards", "2"],
        ["eval", "--corpus", "corpus", "--fast", "models/fast", "--slow", "models/slow", "--index", "index",
         "--embeddings", "emb", "--rerank", "5", "--out", "report.json"],
    ]
    for argv in steps:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 0, f"thinkfast {' '.join(argv)} exited {code}: {err[-2000:]}"
    for path in ("models/slow/config.json", "models/fast/config.json", "emb/manifest.json", "index/manifest.json"):
        assert (tmp_path / path).is_file(), path
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_queries"] > 0
    # what was recorded names absolute paths, so a later run from elsewhere finds them
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["corpus"] == str(tmp_path / "corpus")
