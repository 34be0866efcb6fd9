"""β chosen on val travels with the slow model (``rerank_config.json``) and is what the
service uses unless told otherwise: saved and read back, refused when unreadable, ignored
(with a warning) for other models, chosen by ``thinkfast eval --choose-beta`` on val while
the report is on test, and picked up by the Serve app builder."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from thinkfast.errors import ThinkfastError
from thinkfast.evaluation.rerank_config import (
    RERANK_CONFIG,
    RerankConfig,
    load_rerank_config,
    save_rerank_config,
    served_beta,
)
from thinkfast_pipelines.cli import main as cli_main

CFG = RerankConfig(beta=5.0, k=20, split="val", fast_identity="fast-aa", slow_identity="slow-bb",
                   r1_by_beta={"0": 10.0, "5": 12.5})


def test_saved_config_reads_back_and_applies_only_to_its_models(tmp_path, caplog):
    assert load_rerank_config(str(tmp_path)) is None
    assert served_beta(str(tmp_path), "fast-aa", "slow-bb")[0] == 0.0  # never chosen: eval's default
    save_rerank_config(str(tmp_path), CFG)
    assert load_rerank_config(str(tmp_path)) == CFG
    beta, why = served_beta(str(tmp_path), "fast-aa", "slow-bb")
    assert beta == 5.0 and "chosen on val at K=20" in why
    with caplog.at_level(logging.WARNING, logger="thinkfast.evaluation.rerank_config"):
        beta, why = served_beta(str(tmp_path), "fast-OTHER", "slow-bb")
    assert beta == 0.0 and "other models" in why and "fast-OTHER" in caplog.text


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not JSON"),
    (json.dumps({"beta": 1.0}), "not a thinkfast rerank config"),
    (json.dumps({**CFG.to_json(), "beta": "lots"}), "malformed"),
    (json.dumps({**CFG.to_json(), "beta": -1.0}), "not a finite non-negative number"),
])
def test_an_unreadable_config_is_one_line_not_a_silent_zero(tmp_path, text, message):
    (tmp_path / RERANK_CONFIG).write_text(text)
    with pytest.raises(ThinkfastError, match=message) as info:
        served_beta(str(tmp_path), "fast-aa", "slow-bb")
    assert "\n" not in str(info.value)


def test_saved_on_s3_reads_back(s3_bucket, s3_server):
    uri = f"{s3_bucket}/models/slow"
    save_rerank_config(uri, CFG, s3_server)
    assert load_rerank_config(uri, s3_server) == CFG


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A generated corpus with train/val/test and untrained tiny models (no Ray)."""
    from thinkfast import FastModel, SlowModel
    from thinkfast.data.reader import read_table
    from thinkfast.data.synth import SynthConfig, write_synth
    from thinkfast.data.tokenizer import WordTokenizer

    root = tmp_path_factory.mktemp("beta")
    corpus = str(root / "corpus")
    write_synth(corpus, SynthConfig(num_images=48, captions_per_image=2, image_size=32, val_fraction=0.25,
                                    test_fraction=0.25, seed=5))
    captions = [c for caps in read_table(corpus, columns=["captions"]).column("captions").to_pylist() for c in caps]
    tokenizer = WordTokenizer.build(captions)
    FastModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(str(root / "fast"))
    SlowModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(str(root / "slow"))
    return root


def test_eval_choose_beta_tunes_on_val_reports_test_and_saves_beside_the_slow_model(small, tmp_path, capsys):
    from thinkfast import FastModel, SlowModel
    from thinkfast.evaluate import evaluate

    slow = tmp_path / "slow"
    shutil.copytree(small / "slow", slow)
    argv = ["eval", "--corpus", str(small / "corpus"), "--fast", str(small / "fast"), "--slow", str(slow),
            "--rerank", "4", "--no-exhaustive", "--no-precision", "--max-queries", "12", "--out",
            str(tmp_path / "report.json")]
    assert cli_main([*argv, "--choose-beta"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    saved = load_rerank_config(str(slow))
    assert saved is not None and saved.split == "val" and saved.k == 4
    assert saved.fast_identity == FastModel.from_pretrained(str(small / "fast")).identity
    assert saved.slow_identity == SlowModel.from_pretrained(str(slow)).identity
    assert set(saved.r1_by_beta) == {"0", "1", "5", "20", "100"} and f"beta {saved.beta:g} chosen on val" in printed
    # the chosen beta is the best R@1 on val (ties: the smaller) ...
    best = max(saved.r1_by_beta.items(), key=lambda kv: (kv[1], -float(kv[0])))
    assert float(best[0]) == saved.beta
    # ... the R@1 on val of the saved beta is what evaluate() gives, and the report is on test with it
    again = evaluate(str(small / "corpus"), str(small / "fast"), str(slow), split="val", rerank=[4], exhaustive=False,
                     precision=False, beta=saved.beta, max_queries=12)
    assert again["methods"][-1]["R@1"] == pytest.approx(saved.r1_by_beta[f"{saved.beta:g}"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["split"] == "test" and report["beta"] == saved.beta
    # tuning on the reported split is refused, as is choosing with nothing to re-rank
    assert cli_main([*argv, "--choose-beta", "--split", "val"]) == 2
    assert "would flatter it" in capsys.readouterr().err
    assert cli_main(["eval", "--corpus", str(small / "corpus"), "--fast", str(small / "fast"), "--choose-beta"]) == 2
    assert "needs --slow" in capsys.readouterr().err


def test_the_serve_app_builder_serves_the_saved_beta_unless_given_one(small, tmp_path):
    """``build_app``'s β (also the ``serve run cluster/serve.yaml`` path) from an embed
    manifest naming the models: saved β for the same models, 0 for others, explicit wins."""
    from thinkfast.store.layout import EmbedCounts, EmbedManifest, FastModelRecord, SlowModelRecord, write_embed_manifest
    from thinkfast_pipelines.serve.app import resolve_beta
    from thinkfast_pipelines.serve.args import ServeArgs

    slow = tmp_path / "slow"
    shutil.copytree(small / "slow", slow)
    emb = tmp_path / "emb"
    write_embed_manifest(str(emb), EmbedManifest(
        corpus="c", corpus_files=1, image_size=32, num_frames=8, counts=EmbedCounts(rows_in=0),
        fast=FastModelRecord(uri="f", identity=CFG.fast_identity, dim=8),
        slow=SlowModelRecord(uri="s", identity=CFG.slow_identity, num_tokens=4, dim=8)))
    args = ServeArgs(fast="f", slow=str(slow), index="i", embeddings=str(emb), corpus="c")
    assert args.beta is None and resolve_beta(args).beta == 0.0
    save_rerank_config(str(slow), CFG)
    assert resolve_beta(args).beta == 5.0
    assert resolve_beta(args.model_copy(update={"beta": 0.5})).beta == 0.5
    save_rerank_config(str(slow), RerankConfig(**{**CFG.__dict__, "slow_identity": "slow-retrained"}))
    assert resolve_beta(args).beta == 0.0
