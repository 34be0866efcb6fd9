"""The serve contract without Ray: request validation, config files, CLI plumbing, result
merging and the search client's output. Fast (well under a second each)."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
import yaml

from thinkfast_pipelines.serve.args import ServeArgs
from thinkfast_pipelines.serve.http_api import MAX_BODY_BYTES, RequestError, parse_search_body
from thinkfast.errors import ThinkfastError

BAD_BODIES = {
    "empty": (b"", 400),
    "whitespace body": (b"  \n ", 400),
    "empty query": (b'{"query": ""}', 422),
    "whitespace query": (b'{"query": " \\t\\n "}', 422),
    "10 kB query": (b'{"query": "' + b"a" * 10_000 + b'"}', 422),
    "non-UTF-8": (b'{"query": "caf\xe9"}', 400),
    "bad JSON": (b'{"query": "x",', 400),
    "JSON array": (b'["x"]', 422),
    "query not a string": (b'{"query": 7}', 422),
    "k as string": (b'{"query": "x", "k": "5"}', 422),
    "k as float": (b'{"query": "x", "k": 5.0}', 422),
    "k as bool": (b'{"query": "x", "k": true}', 422),
    "k = 0": (b'{"query": "x", "k": 0}', 422),
    "k = 10^6": (b'{"query": "x", "k": 1000000}', 422),
    "negative rerank": (b'{"query": "x", "rerank": -1}', 422),
    "rerank > 1000": (b'{"query": "x", "rerank": 1001}', 422),
    "rerank < k": (b'{"query": "x", "k": 20, "rerank": 10}', 422),
    "unknown field": (b'{"query": "x", "filter": "red"}', 422),
    "lone surrogate": (b'{"query": "\\ud800"}', 422),
    "NUL in query": (b'{"query": "a\\u0000b"}', 422),
    "5000-digit int": (b'{"query": "x", "k": ' + b"9" * 5000 + b"}", 400),
    "oversized body": (b'{"query": "x", "pad": "' + b"p" * MAX_BODY_BYTES + b'"}', 413),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_bad_bodies_are_4xx_with_json_detail(name: str) -> None:
    body, status = BAD_BODIES[name]
    with pytest.raises(RequestError) as info:
        parse_search_body(body, "application/json")
    assert info.value.status == status
    assert info.value.detail  # str or a list of {loc, msg, type}
    assert len(str(info.value.detail)) < 2000  # the 10 kB query is not echoed back


def test_wrong_content_type_is_415() -> None:
    with pytest.raises(RequestError) as info:
        parse_search_body(b'{"query": "x"}', "multipart/form-data; boundary=x")
    assert info.value.status == 415


def test_good_bodies_and_candidate_counts() -> None:
    req = parse_search_body(b'{"query": "a red circle", "k": 5, "rerank": 20}', "application/json; charset=utf-8")
    assert (req.query, req.k, req.candidates(), req.fast_only) == ("a red circle", 5, 20, False)
    fast = parse_search_body(b'{"query": "x", "k": 7, "rerank": 0}')
    assert fast.fast_only and fast.candidates() == 7
    default = parse_search_body('{"query": "überall ✓"}'.encode())
    assert default.k == 10 and default.candidates() == 50 and not default.fast_only
    assert parse_search_body(b'{"query": "x", "k": 80}').candidates() == 80


def test_serve_yaml_is_a_valid_serve_config_for_our_builder() -> None:
    from ray.serve.schema import ServeDeploySchema

    from thinkfast_pipelines.serve.run import APP_IMPORT_PATH, load_serve_config

    doc = yaml.safe_load(open("cluster/serve.yaml", encoding="utf-8"))
    schema = ServeDeploySchema.model_validate(doc)
    assert [a.import_path for a in schema.applications] == [APP_IMPORT_PATH]
    cfg = load_serve_config("cluster/serve.yaml")
    assert cfg.args.reranker.max_replicas > cfg.args.reranker.min_replicas  # it can autoscale
    assert cfg.args.reranker.max_ongoing_requests >= cfg.args.reranker.max_batch_size
    assert cfg.port == 8000 and cfg.name == "thinkfast"


def test_serve_args_reject_typos_and_inconsistent_sizes() -> None:
    base = {"fast": "f", "slow": "s", "index": "i", "embeddings": "e", "corpus": "c"}
    ServeArgs.model_validate(base)
    with pytest.raises(Exception, match="extra"):
        ServeArgs.model_validate({**base, "rerankr": {}})
    with pytest.raises(Exception, match="max_replicas"):
        ServeArgs.model_validate({**base, "reranker": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(Exception, match="batches could never fill"):
        ServeArgs.model_validate({**base, "reranker": {"max_batch_size": 16, "max_ongoing_requests": 8}})


def _ns(**kw) -> argparse.Namespace:
    from thinkfast_pipelines.serve.run import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = []
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def test_cli_flags_and_config_fill_the_same_args(tmp_path) -> None:
    from thinkfast_pipelines.serve.run import args_from_cli

    args, host, port, name, prefix = args_from_cli(
        _ns(fast="F", slow="S", index="I", embeddings="E", corpus="C", port=9123, max_replicas=3, beta=0.5)
    )
    assert (args.fast, args.corpus, args.beta, args.reranker.max_replicas) == ("F", "C", 0.5, 3)
    assert (host, port, name, prefix) == ("127.0.0.1", 9123, "thinkfast", "/")
    cfg_args, host, port, _, _ = args_from_cli(_ns(config="cluster/serve.yaml", port=9000))
    assert cfg_args.index == "s3://thinkfast-data/index" and port == 9000 and host == "0.0.0.0"
    with pytest.raises(ThinkfastError, match="missing --slow"):
        args_from_cli(_ns(fast="F", index="I", embeddings="E", corpus="C"))
    with pytest.raises(ThinkfastError, match="not both"):
        args_from_cli(_ns(config="cluster/serve.yaml", fast="F"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - import_path: somewhere.else:app\n")
    with pytest.raises(ThinkfastError, match="exactly one application"):
        args_from_cli(_ns(config=str(bad)))


def test_check_inputs_names_the_missing_artifact(tmp_path) -> None:
    from thinkfast_pipelines.serve.run import check_inputs

    args = ServeArgs(fast=str(tmp_path / "nope"), slow="s", index="i", embeddings="e", corpus="c")
    with pytest.raises(ThinkfastError, match="--fast: .*nope.*does not exist"):
        check_inputs(args)


def test_merge_shard_results_is_a_global_top_k() -> None:
    from thinkfast.serving.merge import merge_shard_results

    shard_a = ([["a1", "a2", "a3"]], np.array([[0.9, 0.5, 0.1]], np.float32))
    shard_b = ([["b1", "b2", ""]], np.array([[0.7, 0.6, -np.inf]], np.float32))  # padded shard
    (merged,) = merge_shard_results([shard_a, shard_b], 4)
    assert merged.keys == ["a1", "b1", "b2", "a2"]
    np.testing.assert_allclose(merged.fast_scores, [0.9, 0.7, 0.6, 0.5])
    (short,) = merge_shard_results([shard_b], 10)
    assert short.keys == ["b1", "b2"]  # padding dropped, never returned as a result


def test_ingress_answers_serving_errors_as_4xx_json() -> None:
    """The ingress raises the ``ServingError`` a stage handed back; its handler answers the
    same status and ``detail`` the service always gave for these cases."""
    import asyncio
    import json

    from thinkfast.serving.errors import MediaUnavailable, UnknownMediaKey, UnscorableQuery
    from thinkfast_pipelines.serve.ingress import app

    cases = [
        (UnscorableQuery("fast"), 422, "the query has no tokens the fast model can encode"),
        (UnscorableQuery("slow"), 422, "the query has no tokens the slow model can score"),
        (UnknownMediaKey(), 404, "unknown media key"),
        (MediaUnavailable("empty"), 404, "media of this key is unavailable (empty)"),
    ]
    for error, status, detail in cases:
        handler = next(app.exception_handlers[c] for c in type(error).__mro__ if c in app.exception_handlers)  # FastAPI's lookup
        response = asyncio.run(handler(None, error))
        assert response.status_code == status and json.loads(response.body) == {"detail": detail}


def test_openapi_documents_every_status_the_routes_answer() -> None:
    """The schemathesis run in tests/test_serve.py fails on an undocumented status, so the
    spec lists each 4xx (and the 503 of an overloaded backend) on each route, with the
    JSON ``{"detail"}`` body every error carries."""
    from thinkfast_pipelines.serve.ingress import app

    spec = app.openapi()
    codes = {(path, method): set(op["responses"]) for path, ops in spec["paths"].items() for method, op in ops.items()}
    assert codes[("/search", "post")] >= {"200", "400", "401", "405", "413", "415", "422", "503"}
    assert codes[("/media/{key}", "get")] >= {"200", "401", "404", "405", "503"}
    assert codes[("/", "get")] >= {"200", "401", "405"}
    assert codes[("/login", "post")] >= {"303", "400", "401", "405", "413", "415"}
    assert "401" not in codes[("/healthz", "get")]  # probes never need the token
    error = spec["paths"]["/search"]["post"]["responses"]["413"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "detail" in spec["components"]["schemas"]["ErrorResponse"]["required"]


def test_serve_args_carry_a_token_file_path_never_a_token(tmp_path) -> None:
    assert ServeArgs(fast="f", slow="s", index="i", embeddings="e", corpus="c").api_token_file is None
    args = ServeArgs(fast="f", slow="s", index="i", embeddings="e", corpus="c", api_token_file="/run/secrets/token")
    assert args.api_token_file == "/run/secrets/token"
    assert not any("token" in name and name != "api_token_file" for name in ServeArgs.model_fields)


def test_search_client_prints_a_table() -> None:
    from thinkfast_pipelines.search import print_results

    data = {
        "query": "a red circle", "k": 2, "rerank": 10,
        "results": [
            {"key": "img1", "score": -3.25, "fast_score": 0.5, "slow_score": -3.5, "caption": "a red circle"},
            {"key": "img2", "score": -4.0, "fast_score": 0.4, "slow_score": None, "caption": "a blue square"},
        ],
        "timings_ms": {"encode": 1.0, "retrieve": 2.0, "rerank": 3.0, "total": 6.5},
    }
    out = io.StringIO()
    print_results(data, out)
    text = out.getvalue()
    assert "img1" in text and "-3.250" in text and "a blue square" in text and "total 6.5" in text
    lines = text.splitlines()
    assert lines[2].split()[:2] == ["1", "img1"] and lines[3].split()[:2] == ["2", "img2"]


def _png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _bmp(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="BMP")
    return buf.getvalue()


def test_catalog_serves_only_corpus_keys(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from thinkfast.serving.catalog import CorpusCatalog, MediaUnavailable, UnknownMediaKey
    from thinkfast.errors import DecodeError

    (tmp_path / "corpus").mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the web")
    rows_a = {"key": ["k0", "k1"], "captions": [["a red circle", "red round"], ["  ", "a blue square"]],
              "jpg": [_png((255, 0, 0)), _bmp((0, 0, 255))]}
    rows_b = {"key": ["k2", "k0"], "captions": [["a green triangle"], ["duplicate key, ignored"]], "jpg": [b"", _png((0, 0, 0))]}
    pq.write_table(pa.table(rows_a), tmp_path / "corpus" / "part-0.parquet", row_group_size=1)
    pq.write_table(pa.table(rows_b), tmp_path / "corpus" / "part-1.parquet")
    cat = CorpusCatalog.open(str(tmp_path / "corpus"), cache_groups=1)
    assert len(cat) == 3 and "k2" in cat and "../secret.txt" not in cat
    assert cat.captions(["k1", "k0", "missing"]) == ["a blue square", "a red circle", ""]
    red = cat.media("k0")
    assert red.content_type == "image/png" and red.data == rows_a["jpg"][0]  # first k0 wins
    blue = cat.media("k1")  # BMP is re-encoded for browsers
    assert blue.content_type == "image/png" and blue.data.startswith(b"\x89PNG")
    assert cat.media("k0").data == red.data  # after LRU eviction (cache of 1 row group)
    for bad in ("../secret.txt", str(secret), "k9", "", "k0/../k1"):
        with pytest.raises(UnknownMediaKey):
            cat.media(bad)
    with pytest.raises(DecodeError) as info:
        cat.media("k2")  # empty bytes: a clear error, not a 500
    assert isinstance(info.value, MediaUnavailable) and str(info.value) == f"media of this key is unavailable ({info.value.reason})"


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys) -> None:
    from conftest import free_port
    from thinkfast_pipelines.cli import main

    missing = str(tmp_path / "missing")
    argv = ["serve", "--fast", missing, "--slow", missing, "--index", missing, "--embeddings", missing, "--corpus", missing]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # a "logs in ..." notice, then the error
    errors = [line for line in err if ": error: " in line]
    assert len(errors) == 1 and err[-1] == errors[0] and errors[0].startswith("thinkfast serve: error: --fast:")
    assert "Traceback" not in "\n".join(err)
    assert main(["search", "a red circle", "--url", f"http://127.0.0.1:{free_port()}"]) == 2  # nothing listens there
    assert "no search service reachable" in capsys.readouterr().err


def test_catalog_on_s3_video_corpus_serves_first_frames(s3_bucket) -> None:
    """Corpus on S3 (moto on loopback), media = mp4 clips: /media answers a PNG poster frame."""
    from PIL import Image

    from thinkfast.serving.catalog import CorpusCatalog
    from thinkfast.data.synth import SynthConfig, write_synth

    corpus = f"{s3_bucket}/corpus"
    write_synth(corpus, SynthConfig(num_images=3, captions_per_image=2, image_size=32, video=True, num_frames=4), workers=1)
    cat = CorpusCatalog.open(corpus)
    assert len(cat) == 3 and cat.media_column == "mp4"
    key = cat.keys()[0]
    blob = cat.media(key)
    assert blob.content_type == "image/png"
    assert Image.open(io.BytesIO(blob.data)).size == (32, 32)
    assert cat.captions([key])[0]
