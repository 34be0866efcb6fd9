"""Paths are made absolute once, where the user hands them over (issue: the README's demo
failed because Ray Train workers opened ``runs/demo/fast_nce`` from another directory)."""

from __future__ import annotations

import os

import pytest

from thinkfast.utils.paths import absolute_model_ref, absolute_uri, user_paths


def test_absolute_uri_resolves_local_paths_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("runs/demo") == str(tmp_path / "runs" / "demo")
    assert absolute_uri("file://" + str(tmp_path / "x")) == str(tmp_path / "x")
    assert absolute_uri("s3://bucket/prefix") == "s3://bucket/prefix"
    assert absolute_uri("~/x") == os.path.join(os.path.expanduser("~"), "x")


def test_model_refs_keep_hub_ids_but_resolve_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "fast").mkdir(parents=True)
    assert absolute_model_ref("models/fast") == str(tmp_path / "models" / "fast")  # exists: local
    assert absolute_model_ref("./not-yet") == str(tmp_path / "not-yet")  # written as a path
    assert absolute_model_ref("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"  # hub id
    assert absolute_model_ref("s3://b/m") == "s3://b/m"


def test_user_paths_rewrites_named_arguments_however_passed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher").mkdir()

    @user_paths("corpus", "out", models=("teacher",))
    def job(corpus, out=None, *, teacher=None, epochs=1, model=None):
        return corpus, out, teacher, epochs, model

    sentinel = object()
    corpus, out, teacher, epochs, model = job("c", out="o", teacher="teacher", epochs=3, model=sentinel)
    assert (corpus, out, teacher) == (str(tmp_path / "c"), str(tmp_path / "o"), str(tmp_path / "teacher"))
    assert epochs == 3 and model is sentinel
    assert job("s3://b/c")[:2] == ("s3://b/c", None)  # None stays None


def test_user_paths_refuses_unknown_parameter_names():
    with pytest.raises(TypeError, match="no parameter"):
        @user_paths("corpus")
        def job(path):  # pragma: no cover - never called
            return path


def test_every_public_entry_point_is_marked():
    """The functions a user calls with paths all go through user_paths (functools.wraps
    leaves ``__wrapped__``)."""
    from thinkfast_pipelines import corpus, demo, evaluate, export, index, synth
    from thinkfast_pipelines.embed import embed
    from thinkfast_pipelines.train import distill, train_fast, train_slow
    from thinkfast_pipelines.train.teacher_scores import precompute_teacher_scores

    for fn in (demo.demo, evaluate.evaluate, index.build_index, index.append_to_index, index.remove_keys,
               synth.synth, embed, distill, train_fast, train_slow, precompute_teacher_scores,
               corpus.tuxpaint_corpus, corpus.karpathy_corpus, corpus.vatex_corpus, export.export):
        assert hasattr(fn, "__wrapped__"), fn.__qualname__


def test_serve_args_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    from thinkfast_pipelines.serve.args import ServeArgs
    from thinkfast_pipelines.serve.run import absolute_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "fast").mkdir()
    args = absolute_args(ServeArgs(fast="fast", slow="./slow", index="index", embeddings="s3://b/emb", corpus="corpus"))
    assert args.fast == str(tmp_path / "fast") and args.slow == str(tmp_path / "slow")
    assert args.index == str(tmp_path / "index") and args.corpus == str(tmp_path / "corpus")
    assert args.embeddings == "s3://b/emb"
    assert args.api_token_file is None
    with_token = absolute_args(ServeArgs(fast="fast", slow="slow", index="index", embeddings="emb", corpus="corpus",
                                         api_token_file="secrets/token"))
    assert with_token.api_token_file == str(tmp_path / "secrets" / "token")  # replicas run elsewhere
