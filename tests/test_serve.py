"""The search service end to end on local Ray: artifacts made by the real pipeline (synth ->
tiny untrained models -> embed -> 2-shard index), the app started with ``serve(...)`` on a
free loopback port, then HTTP checked against the offline two-stage search
(``thinkfast.rerank``), the bad-input list, media, the CLI client and the page in
headless Chromium. One app for the module; deleted (and Serve shut down) at the end."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.ray

APP = "thinkfast-test"
BETA = 0.5  # non-zero so the combined score h + beta * s_fast is exercised
N_IMAGES = 32


@dataclass(frozen=True)
class Artifacts:
    corpus: str
    fast: str
    slow: str
    embeddings: str
    index: str
    captions: list[str]  # one caption per item, used as queries
    media: dict[str, bytes]  # key -> stored image bytes


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, ray_session) -> Artifacts:
    import torch

    from thinkfast_pipelines.embed import EmbedConfig, embed
    from thinkfast_pipelines.index import build_index
    from thinkfast_pipelines.synth import synth
    from thinkfast import FastModel, SlowModel
    from thinkfast.data.reader import read_table
    from thinkfast.data.tokenizer import WordTokenizer

    root = tmp_path_factory.mktemp("serve")
    corpus, emb, index = str(root / "corpus"), str(root / "emb"), str(root / "index")
    synth(corpus, images=N_IMAGES, captions_per_image=2, image_size=32, seed=7, image_format="png", workers=1)
    table = read_table(corpus, columns=["key", "captions", "jpg"])
    captions = [caps[0] for caps in table.column("captions").to_pylist()]
    tokenizer = WordTokenizer.build([c for caps in table.column("captions").to_pylist() for c in caps])
    torch.manual_seed(0)
    FastModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(str(root / "fast"))
    SlowModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(str(root / "slow"))
    embed(corpus, emb, fast=str(root / "fast"), slow=str(root / "slow"), config=EmbedConfig(batch_size=16, progress=False))
    manifest = build_index(emb, index, shards=2, factory="Flat")
    assert manifest.num_shards == 2 and manifest.count == N_IMAGES
    media = dict(zip(table.column("key").to_pylist(), table.column("jpg").to_pylist()))
    return Artifacts(corpus, str(root / "fast"), str(root / "slow"), emb, index, captions, media)


@pytest.fixture(scope="module")
def service(artifacts):
    from ray import serve as ray_serve

    from conftest import free_port
    from thinkfast_pipelines.serve import serve

    args = {
        "fast": artifacts.fast, "slow": artifacts.slow, "index": artifacts.index,
        "embeddings": artifacts.embeddings, "corpus": artifacts.corpus, "beta": BETA,
        "ingress": {"num_cpus": 0.1}, "encoder": {"num_cpus": 0.1}, "retriever": {"num_cpus": 0.1},
        "catalog": {"num_cpus": 0.1},
        "reranker": {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 1, "max_batch_size": 4,
                     "batch_wait_timeout_s": 0.05, "max_ongoing_requests": 16},
    }
    url = serve(args, host="127.0.0.1", port=free_port(), name=APP)
    yield url
    ray_serve.delete(APP)
    ray_serve.shutdown()


@pytest.fixture(scope="module")
def offline(artifacts):
    """The offline two-stage search over the same artifacts (what ``thinkfast eval`` runs)."""
    from thinkfast import FastModel, SlowModel, TokenStore
    from thinkfast.rerank import ExactIndex, two_stage_search
    from thinkfast.store import read_embeddings

    fast = FastModel.from_pretrained(artifacts.fast).eval()
    slow = SlowModel.from_pretrained(artifacts.slow).eval()
    keys, vectors = read_embeddings(artifacts.embeddings)
    exact = ExactIndex(keys, vectors)
    store = TokenStore.open(artifacts.embeddings)

    def run(query: str, k: int, rerank: int) -> list:
        return two_stage_search([query], fast, slow, exact, store.get, k=k, rerank_k=rerank, beta=BETA)[0]

    return run


def _post(url: str, body: dict) -> requests.Response:
    return requests.post(url + "/search", json=body, timeout=60)


def _assert_same(http_results: list[dict], hits: list) -> None:
    assert [r["key"] for r in http_results] == [h.key for h in hits]
    np.testing.assert_allclose([r["score"] for r in http_results], [h.score for h in hits], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose([r["fast_score"] for r in http_results], [h.fast_score for h in hits], atol=1e-5)
    if hits and hits[0].slow_score is None:
        assert all(r["slow_score"] is None for r in http_results)
    else:
        np.testing.assert_allclose([r["slow_score"] for r in http_results], [h.slow_score for h in hits], rtol=1e-4, atol=1e-4)


def test_http_results_equal_offline_two_stage_search(service, artifacts, offline) -> None:
    queries = [artifacts.captions[0], artifacts.captions[5], "a purple zebra above the moon"]
    for query in queries:
        resp = _post(service, {"query": query, "k": 5, "rerank": 12})
        assert resp.status_code == 200, resp.text
        data = resp.json()
        assert data["rerank"] == 12 and len(data["results"]) == 5
        assert set(data["timings_ms"]) >= {"encode", "retrieve", "rerank", "total"}
        _assert_same(data["results"], offline(query, 5, 12))
        assert all(r["slow_score"] <= 0 for r in data["results"])  # h is a sum of log-probabilities
        by_key = {r["key"]: r["caption"] for r in data["results"]}
        assert all(by_key.values())  # every result carries its corpus caption


def test_concurrent_requests_share_batches_without_changing_results(service, artifacts, offline) -> None:
    queries = artifacts.captions[:8]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda q: _post(service, {"query": q, "k": 3, "rerank": 10}), queries))
    for query, resp in zip(queries, responses):
        assert resp.status_code == 200, resp.text
        _assert_same(resp.json()["results"], offline(query, 3, 10))


def test_rerank_zero_is_the_fast_ranking(service, artifacts, offline) -> None:
    query = artifacts.captions[3]
    data = _post(service, {"query": query, "k": 7, "rerank": 0}).json()
    assert data["rerank"] == 0 and data["timings_ms"]["rerank"] == 0
    _assert_same(data["results"], offline(query, 7, 0))
    assert all(r["score"] == r["fast_score"] and r["slow_score"] is None for r in data["results"])
    # k larger than the corpus: every item once, best first
    everything = _post(service, {"query": query, "k": 100, "rerank": 0}).json()["results"]
    assert sorted(r["key"] for r in everything) == sorted(artifacts.media)


def test_typed_errors_cross_replicas_as_values(service) -> None:
    """What the ingress relies on: a batch item's ``ServingError`` comes back through a
    handle as itself (type, fields, message), next to the other items' results."""
    from ray import serve as ray_serve

    from thinkfast.serving.errors import MediaUnavailable, UnscorableQuery, raise_if_error

    @ray_serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Stage:
        @ray_serve.batch(max_batch_size=4, batch_wait_timeout_s=0.2)
        async def run(self, xs: list[int]) -> list:
            return [UnscorableQuery("slow") if x < 0 else x * 10 for x in xs]

        def media(self, reason: str) -> MediaUnavailable:
            return MediaUnavailable(reason)

    handle = ray_serve.run(Stage.bind(), name="thinkfast-errors", route_prefix=None)
    try:
        responses = [handle.run.remote(x) for x in (1, -1, 2)]
        out = [r.result(timeout_s=60) for r in responses]
        assert out[0] == 10 and out[2] == 20
        assert type(out[1]) is UnscorableQuery and out[1].model == "slow"
        with pytest.raises(UnscorableQuery, match="slow model can score"):
            raise_if_error(out[1])
        media = handle.media.remote("corrupt").result(timeout_s=60)
        assert type(media) is MediaUnavailable and media.reason == "corrupt"
    finally:
        ray_serve.delete("thinkfast-errors")


def _raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         chunked: bool = False) -> tuple[int, dict]:
    """One request with exact bytes (no client-side normalisation of paths or bodies)."""
    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        if chunked:
            conn.putrequest(method, path)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for start in range(0, len(body or b""), 4096):
                piece = body[start : start + 4096]
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        else:
            conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, json.loads(payload) if payload else {}
    finally:
        conn.close()


JSON = {"Content-Type": "application/json"}
BAD_REQUESTS = [
    ("empty body", "POST", "/search", b"", JSON, False),
    ("empty query", "POST", "/search", b'{"query": ""}', JSON, False),
    ("whitespace query", "POST", "/search", b'{"query": "   \\t "}', JSON, False),
    ("10 kB query", "POST", "/search", b'{"query": "' + b"x" * 10_000 + b'"}', JSON, False),
    ("non-UTF-8", "POST", "/search", b'{"query": "\xff\xfe red"}', JSON, False),
    ("bad JSON", "POST", "/search", b'{"query": "a red circle"', JSON, False),
    ("wrong type query", "POST", "/search", b'{"query": ["a"]}', JSON, False),
    ("wrong type k", "POST", "/search", b'{"query": "a", "k": "ten"}', JSON, False),
    ("k = 0", "POST", "/search", b'{"query": "a", "k": 0}', JSON, False),
    ("k = 10^6", "POST", "/search", b'{"query": "a", "k": 1000000}', JSON, False),
    ("negative rerank", "POST", "/search", b'{"query": "a", "rerank": -5}', JSON, False),
    ("rerank below k", "POST", "/search", b'{"query": "a", "k": 10, "rerank": 5}', JSON, False),
    ("unknown field", "POST", "/search", b'{"query": "a", "limit": 3}', JSON, False),
    ("oversized body", "POST", "/search", b'{"query": "a", "x": "' + b"y" * 20_000 + b'"}', JSON, False),
    ("oversized chunked body", "POST", "/search", b'{"query": "a", "x": "' + b"y" * 40_000 + b'"}', JSON, True),
    ("not JSON content type", "POST", "/search", b"query=a", {"Content-Type": "application/x-www-form-urlencoded"}, False),
    ("unknown media key", "GET", "/media/no-such-key", None, {}, False),
    ("../ in media key", "GET", "/media/../../etc/passwd", None, {}, False),
    ("encoded ../ in media key", "GET", "/media/..%2F..%2Fetc%2Fpasswd", None, {}, False),
    ("absolute path media key", "GET", "/media/%2Fetc%2Fpasswd", None, {}, False),
    ("GET /search", "GET", "/search", None, {}, False),
]


def test_bad_inputs_are_4xx_with_json_detail_and_the_service_survives(service, artifacts) -> None:
    prefix = urllib.parse.urlparse(service).path.rstrip("/")
    for name, method, path, body, headers, chunked in BAD_REQUESTS:
        status, payload = _raw(service, method, prefix + path, body, headers, chunked)
        assert 400 <= status < 500, f"{name}: HTTP {status} {payload}"
        assert payload.get("detail"), f"{name}: no JSON detail in {payload}"
    good = _post(service, {"query": artifacts.captions[1], "k": 2})
    assert good.status_code == 200 and len(good.json()["results"]) == 2
    assert requests.get(service + "/healthz", timeout=30).json()["status"] == "ok"


def test_media_serves_exactly_the_corpus_bytes(service, artifacts) -> None:
    key, data = next(iter(artifacts.media.items()))
    resp = requests.get(f"{service}/media/{urllib.parse.quote(key)}", timeout=30)
    assert resp.status_code == 200 and resp.content == data
    assert resp.headers["content-type"] == "image/png"


def test_search_cli_prints_results(service, artifacts, capsys) -> None:
    from thinkfast_pipelines.cli import main

    from thinkfast_pipelines.search import print_results

    # --json: the raw response, which is the service's answer to exactly this body
    assert main(["search", artifacts.captions[2], "--url", service, "--k", "3", "--rerank", "6", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["query"] == artifacts.captions[2] and len(data["results"]) == 3
    assert {r["key"] for r in data["results"]} <= set(artifacts.media)
    # the table: every result row of that response, with the timings line
    print_results(data)
    table = capsys.readouterr().out
    assert all(r["key"] in table and r["caption"] in table for r in data["results"]) and "total" in table
    # and the plain CLI prints such a table for a live query
    assert main(["search", artifacts.captions[2], "--url", service, "--k", "3", "--rerank", "6"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and sum(line.strip().startswith(("1 ", "2 ", "3 ")) for line in out.splitlines()) == 3
    assert main(["search", "a", "--url", service, "--k", "0"]) == 2
    assert "HTTP 422" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("THINKFAST_REQUIRE_CHROMIUM"),
                    reason="Debian's chromium is not installed (.ci/run installs it and sets THINKFAST_REQUIRE_CHROMIUM=1, "
                           "so CI fails instead of skipping)")
def test_page_shows_thumbnails_in_headless_chromium(service, artifacts) -> None:
    query = urllib.parse.quote(artifacts.captions[4])
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--virtual-time-budget=30000", "--dump-dom", f"{service}/?q={query}&k=4&rerank=8"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert dom.count('class="card result"') == 4, dom[-3000:]
    assert dom.count('class="thumb"') == 4 and 'data-loaded="error"' not in dom
    assert dom.count('data-loaded="32"') == 4  # every thumbnail decoded: a 32-px image from /media
    expected = _post(service, {"query": artifacts.captions[4], "k": 4, "rerank": 8}).json()["results"]
    for r in expected:
        assert f'data-key="{r["key"]}"' in dom


def test_serve_config_args_go_through_serves_own_builder_validation(artifacts) -> None:
    """What `serve run cluster/serve.yaml` does with `args:`: Serve validates the dict into
    the builder's pydantic annotation (ServeArgs) and calls it; typos fail there."""
    from pydantic import ValidationError
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from thinkfast_pipelines.serve.app import build_app

    args = {"fast": artifacts.fast, "slow": artifacts.slow, "index": artifacts.index,
            "embeddings": artifacts.embeddings, "corpus": artifacts.corpus, "reranker": {"max_replicas": 4}}
    assert isinstance(call_user_app_builder_with_args_if_necessary(build_app, args), Application)
    with pytest.raises(ValidationError, match="reranker_typo"):
        call_user_app_builder_with_args_if_necessary(build_app, {**args, "reranker_typo": {}})


FUZZ_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
FUZZ_EXAMPLES = 20  # per operation and mode: bounded (about 150 requests in all), and derandomized
NO_INVALID_INPUT = {("GET", "/"), ("GET", "/healthz"), ("GET", "/media/{key}")}  # any path string is a valid key


def test_fuzzed_requests_get_documented_answers(service) -> None:
    """Schemathesis over every operation of the live service's own /openapi.json, with
    valid and invalid inputs: never a 5xx, and every status, content type and body one
    the spec documents, so a status the service starts answering without documenting it
    fails here. (Schemathesis' pytest plugin needs a private pytest attribute that pytest
    9 removed, so the operations are driven by Hypothesis directly.)"""
    from collections import Counter

    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(service.rstrip("/") + "/openapi.json")
    statuses: Counter = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        name = (operation.method.upper(), operation.path)
        for mode in schemathesis.GenerationMode:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                response = case.call_and_validate(checks=FUZZ_CHECKS, timeout=60)
                statuses[(*name, mode.value, response.status_code)] += 1

            try:
                run()
            except Unsatisfiable:
                if not (mode is schemathesis.GenerationMode.NEGATIVE and name in NO_INVALID_INPUT):
                    failures.append(f"{name} {mode.value}: no inputs could be generated")
            except Exception as exc:  # a failed check: collect every operation's, then report
                failures.append(f"{name} {mode.value}: {exc}"[:3000])
    assert not failures, "\n\n".join(failures)
    seen = {key[:3] for key in statuses}
    assert {("POST", "/search", "positive"), ("POST", "/search", "negative"), ("POST", "/login", "negative"),
            ("GET", "/media/{key}", "positive"), ("GET", "/", "positive")} <= seen, statuses
    search = {code for (method, path, _, code) in statuses if path == "/search"}
    assert 200 in search and search & {400, 413, 415, 422}, statuses  # both answers were exercised


def test_access_token_end_to_end(service, artifacts, tmp_path) -> None:
    """The real Ingress with ``api_token_file`` set, on the running service's own stages
    (one cheap extra replica, no models loaded): the token is read in the replica from
    the file, /healthz stays open, everything else needs the header or the cookie."""
    from ray import serve as ray_serve

    from thinkfast_pipelines.serve.args import ServeArgs
    from thinkfast_pipelines.serve.ingress import Ingress

    token = "e2e-" + os.urandom(16).hex()
    token_file = tmp_path / "api-token"
    token_file.write_text(token + "\n")
    args = ServeArgs(fast=artifacts.fast, slow=artifacts.slow, index=artifacts.index, embeddings=artifacts.embeddings,
                     corpus=artifacts.corpus, beta=BETA, api_token_file=str(token_file))
    handle = ray_serve.get_deployment_handle
    ingress = Ingress.options(name="AuthIngress", ray_actor_options={"num_cpus": 0.1}).bind(
        args, handle("TextEncoder", APP), [handle("Retriever_0", APP), handle("Retriever_1", APP)],
        handle("Reranker", APP), handle("Catalog", APP))
    ray_serve.run(ingress, name="thinkfast-auth", route_prefix="/auth-check")
    try:
        url = service.rstrip("/") + "/auth-check"
        body = {"query": artifacts.captions[6], "k": 3, "rerank": 6}
        key, data = next(iter(artifacts.media.items()))
        assert requests.get(url + "/healthz", timeout=30).json()["status"] == "ok"
        refused = requests.post(url + "/search", json=body, timeout=30)
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.json()["detail"] and token not in refused.text
        assert requests.get(f"{url}/media/{urllib.parse.quote(key)}", timeout=30).status_code == 401
        assert requests.post(url + "/search", json=body, headers={"X-API-Key": "x" * 40}, timeout=30).status_code == 401
        ok = requests.post(url + "/search", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert ok.status_code == 200 and [r["key"] for r in ok.json()["results"]] == \
            [r["key"] for r in _post(service, body).json()["results"]]
        media = requests.get(f"{url}/media/{urllib.parse.quote(key)}", headers={"X-API-Key": token}, timeout=30)
        assert media.status_code == 200 and media.content == data
        # a browser: the sign-in form, then the cookie opens the page and the thumbnails
        browser = requests.Session()
        form = browser.get(url + "/", headers={"Accept": "text/html"}, timeout=30)
        assert form.status_code == 401 and 'name="token"' in form.text
        signed_in = browser.post(url + "/login", data={"token": token}, allow_redirects=False, timeout=30)
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/auth-check/"
        assert browser.get(url + "/", timeout=30).text.startswith("<!doctype html>")
        assert browser.get(f"{url}/media/{urllib.parse.quote(key)}", timeout=30).content == data
        spec = requests.get(url + "/openapi.json", headers={"X-API-Key": token}, timeout=30).json()
        assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
        # the Python / CLI client sends the token of THINKFAST_API_TOKEN (or token=)
        from thinkfast.errors import ThinkfastError
        from thinkfast_pipelines.search import search

        assert [r["key"] for r in search(body["query"], url, k=3, rerank=6, token=token)["results"]] == \
            [r["key"] for r in ok.json()["results"]]
        with pytest.raises(ThinkfastError, match="needs an access token"):
            search(body["query"], url, k=3, rerank=6, token="")
    finally:
        ray_serve.delete("thinkfast-auth")


def test_image_queries_and_explain_over_http(service, artifacts, offline, tmp_path, capsys) -> None:
    """Query by image (JSON base64, and the CLI's multipart upload) and ``explain`` on the
    running app; the library-level checks are in tests/test_serve_queries.py."""
    import base64

    from thinkfast_pipelines.cli import main

    key, png = list(artifacts.media.items())[5]
    resp = _post(service, {"image": base64.b64encode(png).decode(), "k": 3, "explain": True})
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["image"] and data["query"] is None and data["rerank"] == 0 and data["beta"] is None
    assert key in [r["key"] for r in data["results"] if r["fast_score"] > 0.9999]  # the image finds itself
    assert [(r["explain"]["rank"], r["explain"]["fast_rank"], r["slow_score"]) for r in data["results"]] == \
        [(1, 1, None), (2, 2, None), (3, 3, None)]
    (tmp_path / "q.png").write_bytes(png)
    assert main(["search", "--image", str(tmp_path / "q.png"), "--url", service, "--k", "3", "--json"]) == 0
    assert [r["key"] for r in json.loads(capsys.readouterr().out)["results"]] == [r["key"] for r in data["results"]]
    # a text query explained: final order as offline, fast ranks as the fast-only order
    query = artifacts.captions[9]
    text = _post(service, {"query": query, "k": 4, "rerank": 12, "explain": True, "beta": BETA}).json()
    fast_keys = [h.key for h in offline(query, 12, 0)]
    assert [r["key"] for r in text["results"]] == [h.key for h in offline(query, 4, 12)] and text["beta"] == BETA
    assert [r["explain"]["fast_rank"] for r in text["results"]] == [fast_keys.index(r["key"]) + 1 for r in text["results"]]
    for body, words in (({"image": base64.b64encode(png[:40]).decode()}, "query image cannot be used"),
                        ({"image": base64.b64encode(png).decode(), "rerank": 10}, "slow model scores captions")):
        bad = _post(service, body)
        assert bad.status_code == 422 and words in bad.text, bad.text
