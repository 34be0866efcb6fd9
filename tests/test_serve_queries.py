"""Query by image and the query-level options (``k``, ``rerank``, ``beta``, ``explain``)
without Ray: the request contract (JSON and multipart), the encoder's image tower on
corpus-style bytes and on bad bytes, the re-ranker's per-query beta, ``explain_hits``, and
the ingress' own query path run in process over the real stages (the deployment handles
replaced by direct calls). The served round trip is in tests/test_serve.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import pickle
import time

import numpy as np
import pytest
import urllib3
from PIL import Image

from thinkfast.rerank import ExactIndex, explain_hits, fast_hits, rerank_many, two_stage_search
from thinkfast.serving.errors import UnreadableImage
from thinkfast.serving.merge import merge_query
from thinkfast.serving.stages import CandidateReranker, QueryEncoder, RerankItem, ShardSearcher
from thinkfast_pipelines.serve.forms import parse_search_form
from thinkfast_pipelines.serve.http_api import RequestError, parse_search_body, request_error_of

N = 12
BETA = 0.5  # the "served" beta of the in-process ingress


def _png(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class _Store:
    def __init__(self, keys, tokens) -> None:
        self.rows, self.shape = dict(zip(keys, tokens)), tokens.shape

    def get(self, keys):
        return np.stack([self.rows[k] for k in keys])


@pytest.fixture(scope="module")
def corpus(models):
    """N noise PNGs of several sizes embedded the way embed does (``decode_rows``)."""
    import torch

    from thinkfast.data.decode import decode_rows
    from thinkfast.data.schema import CorpusColumns
    from thinkfast.encode import image_vectors, visual_tokens
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel

    fast = FastModel.from_pretrained(models[0]).eval()
    slow = SlowModel.from_pretrained(models[1]).eval()
    rng = np.random.default_rng(3)
    keys = [f"img{i:02d}" for i in range(N)]
    media = {k: _png(rng, (32 + 8 * (i % 3), 32 + 4 * (i % 4))) for i, k in enumerate(keys)}
    columns = CorpusColumns(media="png", captions="caption", has_split=False, has_width=False, has_height=False,
                            has_scene=False)
    rows = [{"key": k, "png": media[k], "caption": "a red circle"} for k in keys]
    decoded = decode_rows(rows, columns, fast.config.image_size, 1)
    assert decoded.keys == keys and not decoded.rejects
    pixels = torch.stack(decoded.pixels)
    vectors = image_vectors(fast, pixels)
    store = _Store(keys, visual_tokens(slow, pixels))
    shards = [ShardSearcher(ExactIndex(keys[:5], vectors[:5])), ShardSearcher(ExactIndex(keys[5:], vectors[5:]))]
    return fast, slow, keys, media, vectors, store, shards


def test_an_image_query_embeds_as_embed_does_and_finds_itself(corpus) -> None:
    fast, _, keys, media, vectors, _, shards = corpus
    encoder = QueryEncoder(fast)
    picked = [keys[1], keys[7], keys[10]]
    out = encoder.encode_images([media[k] for k in picked])
    for key, vector in zip(picked, out):
        np.testing.assert_allclose(vector, vectors[keys.index(key)], atol=1e-5)  # the embed pixels, exactly
        cands = merge_query([s.search([(vector, 4)])[0] for s in shards], 4)
        hits = fast_hits(cands.keys, cands.fast_scores, 4)
        assert hits[0].key == key and hits[0].fast_score == pytest.approx(1.0, abs=1e-4)
        assert all(h.slow_score is None for h in hits)


def test_bad_query_images_are_typed_errors_that_fail_alone(corpus) -> None:
    fast, _, keys, media, vectors, _, _ = corpus
    png = media[keys[2]]
    huge = io.BytesIO()
    Image.new("L", (300, 300)).save(huge, format="PNG")  # 90 000 pixels > the limit below
    batch = [png, b"", b"definitely not an image", png[: len(png) // 2], huge.getvalue(), png]
    out = QueryEncoder(fast).encode_images(batch, max_pixels=50_000)
    np.testing.assert_allclose(out[0], vectors[2], atol=1e-5)
    np.testing.assert_allclose(out[5], vectors[2], atol=1e-5)
    reasons = [o.reason for o in out[1:5]]
    assert all(type(o) is UnreadableImage for o in out[1:5]), out
    assert reasons[0] == "empty" and reasons[1] == "corrupt" and reasons[2] in ("truncated", "corrupt")
    assert reasons[3] == "too_large" and "300x300" in str(out[4])
    for error in out[1:5]:
        back = pickle.loads(pickle.dumps(error))  # how it leaves the encoder replica
        assert type(back) is UnreadableImage and str(back) == str(error) and back.reason == error.reason
        http = request_error_of(back)
        assert http.status == 422 and http.detail.startswith(f"the query image cannot be used ({error.reason})")


def _json(payload) -> bytes:
    return json.dumps(payload).encode()


def test_image_requests_in_json_and_form_are_one_request() -> None:
    png = _png(np.random.default_rng(0), (20, 10))
    b64 = base64.b64encode(png).decode()
    as_json = parse_search_body(_json({"image": b64, "k": 3, "beta": 2, "explain": True}), "application/json")
    as_url = parse_search_body(_json({"image": "data:image/png;base64," + b64, "k": 3, "beta": 2, "explain": True}))
    body, content_type = urllib3.encode_multipart_formdata(
        {"image": ("q.png", png, "image/png"), "k": "3", "beta": "2", "explain": "true", "rerank": "0"})
    as_form = parse_search_form(body, content_type)
    for req in (as_json, as_url, as_form):
        assert req.image_bytes() == png and req.fast_only and req.candidates() == 3
        assert req.k == 3 and req.beta == 2.0 and req.explain and req.query is None
    text = parse_search_body(_json({"query": "a red circle", "k": 5, "rerank": 20, "beta": 0.25, "explain": True}))
    assert not text.fast_only and text.candidates() == 20 and text.beta == 0.25
    assert parse_search_body(_json({"query": "a red circle"})).beta is None  # the service's beta


BAD = {
    "image and rerank": (_json({"image": "aGVsbG8=", "rerank": 50}), 422, "slow model scores captions"),
    "image and query": (_json({"image": "aGVsbG8=", "query": "x"}), 422, "exactly one of query"),
    "neither": (_json({"k": 3}), 422, "exactly one of query"),
    "not base64": (_json({"image": "not*base64!"}), 422, "not valid base64"),
    "data URL without base64": (_json({"image": "data:image/png,abc"}), 422, "data: URL"),
    "image too large": (_json({"image": base64.b64encode(b"x" * 3000).decode()}), 413, "limit is 2048"),
    "beta negative": (_json({"query": "x", "beta": -0.5}), 422, "greater than or equal to 0"),
    "beta above 100": (_json({"query": "x", "beta": 100.5}), 422, "less than or equal to 100"),
    "beta NaN": (b'{"query": "x", "beta": NaN}', 422, "finite"),
    "beta string": (_json({"query": "x", "beta": "1"}), 422, "number"),
    "explain not a bool": (_json({"query": "x", "explain": 1}), 422, "boolean"),
    "big text body": (_json({"query": "x", "pad": "p" * 20_000}), 413, "16384"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_query_options_are_4xx_naming_the_problem(name: str) -> None:
    body, status, words = BAD[name]
    with pytest.raises(RequestError) as info:
        parse_search_body(body, "application/json", max_image_bytes=2048)
    assert info.value.status == status and words in str(info.value.detail), info.value.detail


def test_bad_forms_are_4xx_naming_the_problem() -> None:
    png = _png(np.random.default_rng(1), (8, 8))

    def form(fields):
        return urllib3.encode_multipart_formdata(fields)

    body, ct = form({"image": ("q.png", png, "image/png")})
    cases = [
        (body[:-10], ct, 400, "closing boundary"),
        (body, "multipart/form-data", 400, "boundary"),
        (*form({"image": ("q.png", png, "image/png"), "k": "three"}), 422, "integer"),
        (*form({"image": ("q.png", png, "image/png"), "rerank": "20"}), 422, "image query is fast only"),
        (*form({"image": ("q.png", png, "image/png"), "explain": "maybe"}), 422, "true or false"),
        (*form([("image", ("a.png", png)), ("image", ("b.png", png))]), 422, "twice"),
        (*form({"image": ("q.png", b"", "image/png")}), 422, "empty"),
        (*form({"image": ("q.png", b"x" * 5000, "image/png")}), 413, "limit is 2048"),
        (*form({"k": "3"}), 422, "exactly one of query"),
    ]
    for body, content_type, status, words in cases:
        with pytest.raises(RequestError) as info:
            parse_search_form(body, content_type, max_image_bytes=2048)
        assert info.value.status == status and words in str(info.value.detail), (words, info.value.detail)


def test_per_query_beta_and_explain_show_what_reranking_changed(corpus) -> None:
    fast, slow, keys, _, vectors, store, _ = corpus
    exact = ExactIndex(keys, vectors)
    reranker = CandidateReranker(slow, store, beta=BETA)
    queries = ["a red circle", "the blue square left of a green triangle"]
    fast_lists = two_stage_search(queries, fast, slow, exact, store.get, k=N, rerank_k=0)
    results = {}
    for beta in (None, 40.0):
        items = [RerankItem(q, _cands(f), 6, beta=beta) for q, f in zip(queries, fast_lists)]
        got = reranker.rerank(items)
        want = rerank_many(slow, store.get, [slow.tokenize([q]) for q in queries], [[h.key for h in f] for f in fast_lists],
                           [[h.fast_score for h in f] for f in fast_lists], 6, beta=BETA if beta is None else beta)
        assert [[h.key for h in g] for g in got] == [[h.key for h in w] for w in want]
        np.testing.assert_allclose([h.score for h in got[0]], [h.score for h in want[0]], rtol=1e-6)
        results[beta] = got
    # a query mixing betas in one batch gets each one's own ranking
    mixed = reranker.rerank([RerankItem(queries[0], _cands(fast_lists[0]), 6, beta=40.0),
                             RerankItem(queries[0], _cands(fast_lists[0]), 6)])
    assert [h.key for h in mixed[0]] == [h.key for h in results[40.0][0]]
    assert [h.key for h in mixed[1]] == [h.key for h in results[None][0]]
    # explain: final ranks 1..k, fast ranks are places in the candidate list
    got = results[None]
    cand_keys = [h.key for h in fast_lists[0]]
    why = explain_hits(got[0], cand_keys, [h.fast_score for h in fast_lists[0]])
    assert [w.rank for w in why] == list(range(1, 7))
    assert [w.fast_rank for w in why] == [cand_keys.index(h.key) + 1 for h in got[0]]
    assert [(w.fast_score, w.slow_score) for w in why] == [(h.fast_score, h.slow_score) for h in got[0]]
    final = [w.slow_score + BETA * w.fast_score for w in why]  # the served beta's h + beta * s_fast
    np.testing.assert_allclose(final, [h.score for h in got[0]], rtol=1e-6)
    assert final == sorted(final, reverse=True)
    # with a huge beta, s_fast dominates: the final ranking is (nearly) the fast one
    big = explain_hits(results[40.0][0], cand_keys, [h.fast_score for h in fast_lists[0]])
    assert [w.fast_rank for w in big][:3] == [1, 2, 3]
    only_fast = explain_hits(fast_lists[0][:4], cand_keys, [h.fast_score for h in fast_lists[0]])
    assert [(w.rank, w.fast_rank, w.slow_score) for w in only_fast] == [(i, i, None) for i in range(1, 5)]
    with pytest.raises(Exception, match="not among the fast candidates"):
        explain_hits(got[0], cand_keys[:1], [0.5])


def _cands(hits):
    from thinkfast.serving.merge import Candidates

    return Candidates([h.key for h in hits], np.asarray([h.fast_score for h in hits], np.float32))


# ---- the ingress' query path, in process ---------------------------------------------------

class _Response:
    """What ``handle.method.remote(x)`` gives: awaitable, cancellable."""

    def __init__(self, value) -> None:
        self.value = value

    def __await__(self):
        async def value():
            return self.value

        return value().__await__()

    def cancel(self) -> None:
        pass


class _Method:
    def __init__(self, fn, batched: bool = True) -> None:
        self.fn, self.batched = fn, batched

    def remote(self, arg) -> _Response:
        return _Response(self.fn([arg])[0] if self.batched else self.fn(arg))


class _Handle:
    def __init__(self, **methods) -> None:
        self.__dict__.update(methods)


@pytest.fixture(scope="module")
def ingress(corpus):
    from thinkfast_pipelines.serve.args import ServeArgs
    from thinkfast_pipelines.serve.ingress import Ingress

    fast, slow, keys, _, _, store, shards = corpus
    real = Ingress.func_or_class  # the user class under Serve's wrapper: its methods are plain functions

    class InProcess:
        _stage, _query, run_query = real._stage, real._query, real.run_query

    encoder, reranker = QueryEncoder(fast), CandidateReranker(slow, store, beta=BETA)
    self = InProcess()
    self.args = ServeArgs(fast="f", slow="s", index="i", embeddings="e", corpus="c", beta=BETA,
                          limits={"max_image_pixels": 50_000})
    self.encoder = _Handle(encode=_Method(encoder.encode),
                           encode_image=_Method(lambda xs: encoder.encode_images(xs, self.args.limits.max_image_pixels)))
    self.retrievers = [_Handle(search=_Method(s.search)) for s in shards]
    self.reranker = _Handle(rerank=_Method(reranker.rerank))
    self.catalog = _Handle(captions=_Method(lambda ks: [f"caption of {k}" for k in ks], batched=False))
    return lambda body, form=None: asyncio.run(self.run_query(
        parse_search_form(*form) if form else parse_search_body(_json(body)), time.perf_counter()))


def test_ingress_answers_image_queries_and_explains_in_process(ingress, corpus) -> None:
    fast, slow, keys, media, vectors, store, _ = corpus
    exact = ExactIndex(keys, vectors)
    query = "a green triangle above the red square"
    served = ingress({"query": query, "k": 4, "rerank": 10, "explain": True})
    want = two_stage_search([query], fast, slow, exact, store.get, k=4, rerank_k=10, beta=BETA)[0]
    assert served.beta == BETA and served.rerank == 10 and not served.image
    assert [r.key for r in served.results] == [h.key for h in want]
    fast_keys = [h.key for h in two_stage_search([query], fast, slow, exact, store.get, k=10, rerank_k=0)[0]]
    assert [r.explain.fast_rank for r in served.results] == [fast_keys.index(r.key) + 1 for r in served.results]
    assert [r.explain.rank for r in served.results] == [1, 2, 3, 4]
    assert all(r.explain.slow_score == r.slow_score is not None for r in served.results)
    other = ingress({"query": query, "k": 4, "rerank": 10, "beta": 30.0})
    assert other.beta == 30.0 and all(r.explain is None for r in other.results)
    want30 = two_stage_search([query], fast, slow, exact, store.get, k=4, rerank_k=10, beta=30.0)[0]
    assert [r.key for r in other.results] == [h.key for h in want30]
    # by image: fast only, the image itself first; JSON and form alike
    b64 = base64.b64encode(media[keys[8]]).decode()
    by_json = ingress({"image": b64, "k": 3, "explain": True})
    by_form = ingress(None, urllib3.encode_multipart_formdata({"image": ("q.png", media[keys[8]]), "k": "3",
                                                               "explain": "true"}))
    for data in (by_json, by_form):
        assert data.image and data.query is None and data.rerank == 0 and data.beta is None
        assert data.results[0].key == keys[8] and data.results[0].caption == f"caption of {keys[8]}"
        assert [(r.explain.rank, r.explain.fast_rank, r.explain.slow_score) for r in data.results] == \
            [(1, 1, None), (2, 2, None), (3, 3, None)]
        assert data.timings_ms["rerank"] == 0.0
    assert [r.key for r in by_json.results] == [r.key for r in by_form.results]
    # bad bytes reach the encoder and come back as the typed error the app answers 422
    from thinkfast_pipelines.serve.ingress import app

    big = io.BytesIO()
    Image.new("RGB", (400, 200)).save(big, format="PNG")
    for data, reason in ((b"\x89PNG\r\n\x1a\n broken", "corrupt"), (big.getvalue(), "too_large")):
        with pytest.raises(UnreadableImage) as info:
            ingress({"image": base64.b64encode(data).decode()})
        assert info.value.reason == reason
        handler = next(app.exception_handlers[c] for c in type(info.value).__mro__ if c in app.exception_handlers)
        answer = asyncio.run(handler(None, info.value))
        assert answer.status_code == 422 and reason in json.loads(answer.body)["detail"]


def test_search_client_prints_fast_ranks_and_image_queries() -> None:
    from thinkfast_pipelines.search import print_results

    explained = {"query": None, "image": True, "k": 2, "rerank": 0, "beta": None, "timings_ms": {"total": 3.0},
                 "results": [{"key": "img7", "score": 0.9, "fast_score": 0.9, "slow_score": None, "caption": "a dog",
                              "explain": {"rank": 1, "fast_rank": 1, "fast_score": 0.9, "slow_score": None}}]}
    out = io.StringIO()
    print_results(explained, out)
    lines = out.getvalue().splitlines()
    assert "(an image)" in lines[0] and "fast#" in lines[1] and lines[2].split()[:2] == ["1", "img7"]
    reranked = {**explained, "image": False, "query": "a dog", "rerank": 10, "beta": 0.5,
                "results": [{**explained["results"][0], "slow_score": -2.0,
                             "explain": {"rank": 1, "fast_rank": 7, "fast_score": 0.9, "slow_score": -2.0}}]}
    out = io.StringIO()
    print_results(reranked, out)
    lines = out.getvalue().splitlines()
    assert "beta 0.5" in lines[0] and lines[2].split()[5] == "7"  # rank 1 came from fast rank 7
