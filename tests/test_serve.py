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


_needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None and not os.environ.get("THINKFAST_REQUIRE_CHROMIUM"),
    reason="Debian's chromium is not installed (.ci/run installs it and sets THINKFAST_REQUIRE_CHROMIUM=1, "
           "so CI fails instead of skipping)")


@pytest.fixture(scope="module")
def chromium_browser():
    """Playwright driving the system chromium (Debian's package): no downloaded browser, so
    ``playwright install`` is never needed."""
    if not os.environ.get("THINKFAST_REQUIRE_CHROMIUM"):
        pytest.importorskip("playwright.sync_api")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def search_page(chromium_browser):
    context = chromium_browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors  # no uncaught JavaScript error on the page


def _shown_keys(page, column: str, count: int) -> list[str]:
    """Waits for ``count`` result cards in ``column`` with every thumbnail decoded from /media
    (a 32-px image, alt text = caption); returns their keys in order."""
    from playwright.sync_api import expect

    # the page marks #columns aria-busy from the moment a search starts (synchronously, in the
    # submit / click / change / drop handler) until its answers are on screen
    page.wait_for_selector("#columns:not([aria-busy])", state="attached")
    cards = page.locator(f"#{column} li.result")
    expect(cards).to_have_count(count)
    page.wait_for_function(
        "sel => [...document.querySelectorAll(sel)].every(img => img.dataset.loaded)", arg=f"#{column} img.thumb")
    thumbs = cards.locator("img.thumb").evaluate_all(
        "imgs => imgs.map(img => [img.dataset.loaded, img.alt, img.closest('li').querySelector('.caption').textContent])")
    assert all(loaded == "32" for loaded, _, _ in thumbs), thumbs
    assert all(caption.endswith(alt) and alt for _, alt, caption in thumbs), thumbs
    return cards.evaluate_all("els => els.map(e => e.dataset.key)")


def _api_keys(service: str, query: str, k: int, rerank: int) -> list[str]:
    return [r["key"] for r in _post(service, {"query": query, "k": k, "rerank": rerank}).json()["results"]]


@_needs_chromium
def test_page_query_more_results_and_compare_in_headless_chromium(service, artifacts, search_page) -> None:
    """Type a query and press Enter; "More results"; the fast-only toggle. Every column shows
    what the API answers for the same request, with its own per-stage timings."""
    from playwright.sync_api import expect

    page, query = search_page, artifacts.captions[4]
    page.goto(service + "/")
    page.get_by_label("Results (k)").fill("4")
    page.get_by_label("Re-rank top K").fill("8")
    page.get_by_label("Query").fill(query)
    page.get_by_label("Query").press("Enter")
    assert _shown_keys(page, "col-reranked", 4) == _api_keys(service, query, 4, 8)
    for stage in ("encode", "retrieve", "rerank", "total"):
        expect(page.locator("#col-reranked .timings")).to_contain_text(stage)
    expect(page.locator("#col-fast")).to_have_count(0)
    assert "k=4" in page.url and "rerank=8" in page.url
    # more results: k doubles (K grows with it, the service refuses K below k)
    page.get_by_role("button", name="More results").click()
    assert _shown_keys(page, "col-reranked", 8) == _api_keys(service, query, 8, 8)
    expect(page.get_by_label("Results (k)")).to_have_value("8")
    # the toggle: fast only next to re-ranked, same query and k
    page.get_by_label("Re-rank top K").fill("24")
    page.get_by_label("Query").press("Enter")
    assert _shown_keys(page, "col-reranked", 8) == _api_keys(service, query, 8, 24)
    page.get_by_label("Compare with fast-only results").check()
    fast_keys = _shown_keys(page, "col-fast", 8)
    assert fast_keys == _api_keys(service, query, 8, 0)
    reranked_keys = _shown_keys(page, "col-reranked", 8)
    assert reranked_keys == _api_keys(service, query, 8, 24) and "compare=1" in page.url
    expect(page.locator("#col-fast .timings")).to_contain_text("total")
    # what re-ranking changed: fast-only results it pushed out of the top k are marked
    dropped = page.locator("#col-fast li.dropped").evaluate_all("els => els.map(e => e.dataset.key)")
    assert dropped == [key for key in fast_keys if key not in reranked_keys]
    shot = os.environ.get("THINKFAST_SEARCH_PAGE_SCREENSHOT")  # docs/search_page.png is made this way
    png = page.screenshot(path=shot, full_page=True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    page.get_by_label("Compare with fast-only results").uncheck()
    expect(page.locator("#col-fast")).to_have_count(0)
    assert _shown_keys(page, "col-reranked", 8) == reranked_keys


@_needs_chromium
def test_page_url_parameters_and_bad_queries_show_the_services_message(service, artifacts, search_page) -> None:
    """?q=&k=&rerank= runs on load; a refused query shows the service's own `detail` in the
    aria-live status region (a string or a validation list), never a blank page."""
    from playwright.sync_api import expect

    page, query = search_page, artifacts.captions[4]
    page.goto(f"{service}/?q={urllib.parse.quote(query)}&k=4&rerank=8")
    assert _shown_keys(page, "col-reranked", 4) == _api_keys(service, query, 4, 8)
    status = page.get_by_role("status")
    expect(status).to_have_attribute("aria-live", "polite")
    # k out of range via the URL: the service's validation message, then the page recovers
    page.goto(f"{service}/?q={urllib.parse.quote(query)}&k=500&rerank=8")
    bad = _post(service, {"query": query, "k": 500, "rerank": 8})
    assert bad.status_code == 422 and isinstance(bad.json()["detail"], list)
    expect(status).to_contain_text("Error 422")
    expect(status).to_contain_text(bad.json()["detail"][0]["msg"])
    expect(status).to_have_class("error")
    expect(page.locator("li.result")).to_have_count(0)
    # a 1001-character query typed into the box
    long_query = "a" * 1001
    detail = _post(service, {"query": long_query, "k": 4, "rerank": 8}).json()["detail"]
    page.get_by_label("Results (k)").fill("4")
    page.get_by_label("Query").fill(long_query)
    page.get_by_label("Query").press("Enter")
    expect(status).to_contain_text("Error 422")
    expect(status).to_contain_text(detail if isinstance(detail, str) else detail[0]["msg"])
    page.get_by_label("Query").fill(query)
    page.get_by_label("Query").press("Enter")
    assert _shown_keys(page, "col-reranked", 4) == _api_keys(service, query, 4, 8)
    expect(status).not_to_have_class("error")


@_needs_chromium
def test_page_searches_by_picked_and_dropped_image(service, artifacts, search_page) -> None:
    """The file picker and a drop on the page send the image as multipart (fast only); the
    cards are the API's answer to the same upload and the image finds itself."""
    import base64

    from playwright.sync_api import expect

    page = search_page
    page.goto(service + "/")
    page.get_by_label("Results (k)").fill("5")
    for i, (key, png) in enumerate(list(artifacts.media.items())[5:7]):
        expected = requests.post(service + "/search", files={"image": ("q.png", png, "image/png")},
                                 data={"k": "5", "rerank": "0"}, timeout=60).json()["results"]
        if i == 0:
            page.get_by_label("Search by image file").set_input_files(
                {"name": "q.png", "mimeType": "image/png", "buffer": png})
        else:
            data_transfer = page.evaluate_handle(
                """b64 => { const dt = new DataTransfer();
                            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                            dt.items.add(new File([bytes], "dropped.png", { type: "image/png" })); return dt; }""",
                base64.b64encode(png).decode())
            page.dispatch_event("#drop-zone", "drop", {"dataTransfer": data_transfer})
        keys = _shown_keys(page, "col-fast", 5)
        assert keys == [r["key"] for r in expected] and key in keys
        expect(page.get_by_role("status")).to_contain_text("q.png" if i == 0 else "dropped.png")
        expect(page.locator("#col-fast .timings")).to_contain_text("encode")
    # dropping something that is not an image says so
    not_image = page.evaluate_handle(
        "() => { const dt = new DataTransfer(); dt.items.add(new File(['hi'], 'notes.txt', { type: 'text/plain' })); return dt; }")
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": not_image})
    expect(page.get_by_role("status")).to_contain_text("Drop an image file")


@_needs_chromium
def test_page_controls_are_labelled_and_keyboard_usable(service, artifacts, search_page) -> None:
    """Tab reaches every control in order, each has an accessible name, Space flips the
    toggle (a real checkbox) and Enter in any field submits."""
    from playwright.sync_api import expect

    page, query = search_page, artifacts.captions[2]
    page.goto(service + "/")
    names = {"q": "Query", "k": "Results (k)", "rerank": "Re-rank top K", "compare": "Compare with fast-only results",
             "image": "Search by image file"}
    for element_id, name in names.items():
        assert page.get_by_label(name).get_attribute("id") == element_id
    expect(page.get_by_role("button", name="Search", exact=True)).to_be_visible()
    expect(page.get_by_role("checkbox", name="Compare with fast-only results")).not_to_be_checked()
    order = []
    for _ in range(6):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.textContent"))
    assert order == ["q", "k", "rerank", "compare", "Search", "image"]
    page.get_by_label("Query").focus()
    page.keyboard.type(query)
    page.keyboard.press("Tab")  # k
    page.keyboard.press("Tab")  # rerank
    page.keyboard.press("Tab")  # the toggle
    page.keyboard.press("Space")
    expect(page.get_by_label("Compare with fast-only results")).to_be_checked()
    page.get_by_label("Results (k)").press("Enter")
    assert _shown_keys(page, "col-reranked", 10) == _api_keys(service, query, 10, 50)
    assert _shown_keys(page, "col-fast", 10) == _api_keys(service, query, 10, 0)
    page.get_by_role("button", name="More results").focus()
    page.keyboard.press("Enter")
    assert _shown_keys(page, "col-reranked", 20) == _api_keys(service, query, 20, 50)


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


def test_serve_fast_path_env_keeps_explicit_values_and_never_breaks_sync_handles(monkeypatch) -> None:
    """``serve()`` puts Serve's fast-path settings into the environment before it starts Ray;
    a value the user set wins, and the router-loop setting that would break
    ``handle.remote().result()`` from sync code is never among them."""
    from thinkfast_pipelines.serve.run import SERVE_FAST_PATH_ENV, set_serve_fast_path_env

    for key in SERVE_FAST_PATH_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE", "1")
    set_serve_fast_path_env()
    assert os.environ["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] == "1"
    assert os.environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP" not in SERVE_FAST_PATH_ENV
