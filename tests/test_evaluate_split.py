"""A corpus without a ``split`` column: evaluation and the reader select the rows training
holds out by key hash (``thinkfast.data.splits``), so the hashed test rows can be evaluated
on their own; and the library's evaluation never needs Ray. No Ray here."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def unsplit(tmp_path_factory):
    """A 120-image generated corpus written again without its ``split`` column, and an
    untrained tiny fast model."""
    from thinkfast import FastModel
    from thinkfast.data.reader import read_table, write_table
    from thinkfast.data.synth import SynthConfig, write_synth
    from thinkfast.data.tokenizer import WordTokenizer

    root = tmp_path_factory.mktemp("unsplit")
    write_synth(str(root / "with_split"), SynthConfig(num_images=120, captions_per_image=2, image_size=32, seed=5))
    table = read_table(str(root / "with_split"))
    corpus = str(root / "corpus")
    write_table(table.drop_columns(["split"]), f"{corpus}/part-00000.parquet")
    captions = [c for caps in table.column("captions").to_pylist() for c in caps]
    fast = FastModel.from_preset("tiny", tokenizer=WordTokenizer.build(captions))
    return {"corpus": corpus, "keys": table.column("key").to_pylist(), "fast": fast}


def test_reader_filters_hashed_split_without_split_column(unsplit):
    from thinkfast.data.reader import iter_batches, read_table
    from thinkfast.data.splits import split_of_key
    from thinkfast.errors import ThinkfastError

    for split in ("train", "val", "test"):
        want = [k for k in unsplit["keys"] if split_of_key(k) == split]
        got = read_table(unsplit["corpus"], columns=["captions"], filter_split=split)
        assert got.column_names == ["captions"] and got.num_rows == len(want)
        streamed = [k for b in iter_batches(unsplit["corpus"], columns=["key"], batch_size=7, filter_split=split)
                    for k in b.column("key").to_pylist()]
        assert streamed == want
    with pytest.raises(ThinkfastError, match="unknown split"):
        read_table(unsplit["corpus"], filter_split="tset")


def test_eval_on_corpus_without_split_column_uses_hashed_test_keys(unsplit):
    from thinkfast.data.splits import split_of_key
    from thinkfast.evaluate import EvalError, evaluate, load_gallery

    test_keys = [k for k in unsplit["keys"] if split_of_key(k) == "test"]
    assert 0 < len(test_keys) < len(unsplit["keys"]) // 4
    gallery = load_gallery(unsplit["corpus"], "test")
    assert gallery.keys == test_keys and gallery.split_by == "key_hash"
    report = evaluate(unsplit["corpus"], unsplit["fast"], None, rerank=[], split="test")
    assert report["gallery_size"] == len(test_keys) and report["num_queries"] == 2 * len(test_keys)
    assert report["split_by"] == "key_hash" and report["rejected_count"] == 0
    assert evaluate(unsplit["corpus"], unsplit["fast"], None, rerank=[], split=None)["gallery_size"] == 120
    with pytest.raises(EvalError, match="unknown split"):
        load_gallery(unsplit["corpus"], "tset")


def test_cli_flags_come_from_eval_config():
    import argparse

    from thinkfast.evaluate import EvalConfig
    from thinkfast.utils.options import config_from_args
    from thinkfast_pipelines import evaluate as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--corpus", "c", "--fast", "f"])
    assert config_from_args(EvalConfig, args) == EvalConfig()
    args = parser.parse_args(["--corpus", "c", "--fast", "f", "--rerank", "--split", "all", "--no-exhaustive",
                              "--max-queries", "9"])
    kwargs = config_from_args(EvalConfig, args).evaluate_kwargs()
    assert kwargs["rerank"] == [] and kwargs["split"] is None and kwargs["exhaustive"] is False
    assert kwargs["max_queries"] == 9
    assert config_from_args(EvalConfig, parser.parse_args(["--corpus", "c", "--fast", "f", "--rerank", "3", "7"])).rerank == (3, 7)
    assert cli.evaluate is __import__("thinkfast.evaluate", fromlist=["evaluate"]).evaluate


def test_library_evaluation_does_not_import_ray():
    code = "import sys, thinkfast.evaluate; assert 'ray' not in sys.modules and 'thinkfast_pipelines' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
