"""The HTTP face of the service: a FastAPI app served by the ``Ingress`` deployment.

``POST /search`` runs the two stages by composing deployment handles: encoder (the fast
model's text tower, or its image tower for a query by image) -> every retriever shard in
parallel -> merged top-K (``thinkfast.serving.merge``) -> re-ranker (with the captions of
the K candidates fetched from the catalog at the same time), or
``thinkfast.rerank.fast_hits`` when fast only (always, for an image query). The body is
JSON or ``multipart/form-data`` (``forms.py``); ``"explain": true`` adds each result's fast
and final rank (``thinkfast.rerank.explain_hits``). ``GET /media/{key}`` answers only
keys the catalog's table holds. Every client error is a 4xx JSON ``{"detail": ...}``: a
malformed request (``http_api.RequestError``) or a ``ServingError`` a stage handed back.
The ingress itself holds no model (nor torch), so it stays cheap to replicate.

Faults (issue 20): every stage call is bounded by a per-attempt timeout and by the
request's deadline (``ServeArgs.limits``), and retried when its replica died or did not
answer (``thinkfast.serving.deadline``): Serve's router then places it on another replica,
which is safe because the stages are pure functions of their input. What cannot be
answered in time is a 503 with ``Retry-After`` (``ServiceUnavailable``), as are Serve's own
overload and unavailability errors; a 500 is left only for bugs.

No ``from __future__ import annotations``: FastAPI reads the route signatures at runtime
(a string ``Request`` annotation through Serve's class wrapper becomes a query parameter).
"""

import asyncio
import logging
import math
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from thinkfast.rerank import SearchHit, explain_hits, fast_hits
from thinkfast.serving.deadline import Deadline, RetryPolicy, call_with_retries, within
from thinkfast.serving.errors import ServiceUnavailable, ServingError, raise_if_error
from thinkfast.serving.merge import merge_query
from thinkfast.serving.stages import RerankItem
from thinkfast_pipelines.serve.args import ServeArgs
from thinkfast_pipelines.serve import auth
from thinkfast_pipelines.serve.forms import FORM_SCHEMA, is_form, parse_search_form
from thinkfast_pipelines.serve.http_api import (
    MAX_BODY_BYTES,
    Explanation,
    RequestError,
    SearchRequest,
    SearchResponse,
    SearchResult,
    body_limit,
    check_media_key,
    parse_search_body,
    request_error_of,
)

logger = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_S = 2.0

app = FastAPI(
    title="thinkfast search",
    description="Two-stage text-to-visual search: fast dual encoder + FAISS, slow cross-attention re-ranking.",
)
auth.install(app)  # the optional access token: installed here, before @serve.ingress freezes the app


@app.exception_handler(RequestError)
async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"detail": exc.detail})


@app.exception_handler(ServingError)
async def _serving_error(_: Request, exc: ServingError) -> JSONResponse:
    """A request the stages could not answer (a query without tokens, an unknown key)."""
    error = request_error_of(exc)
    return JSONResponse(status_code=error.status, content={"detail": error.detail})


def _unavailable(detail: str, retry_after_s: float) -> JSONResponse:
    return JSONResponse(
        status_code=503, content={"detail": detail}, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))}
    )


@app.exception_handler(ServiceUnavailable)
async def _service_unavailable(_: Request, exc: ServiceUnavailable) -> JSONResponse:
    """A stage that died, hung or stayed overloaded past the deadline: retry later."""
    return _unavailable(str(exc), exc.retry_after_s)


@app.exception_handler(Exception)
async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    """A failure of the service itself (not of the request) still answers JSON: 503 with
    ``Retry-After`` when a backend deployment is overloaded or unavailable (retry later),
    500 otherwise (a bug: logged with its traceback)."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, (BackPressureError, DeploymentUnavailableError)) or is_replica_failure(exc):
        # stage calls convert these (with the configured Retry-After); this is the fallback
        return _unavailable(f"service busy or starting: {type(exc).__name__}", DEFAULT_RETRY_AFTER_S)
    logger.exception("search failed")
    return JSONResponse(status_code=500, content={"detail": f"internal error ({type(exc).__name__})"})


def is_replica_failure(exc: BaseException) -> bool:
    """True when ``exc`` says the replica serving a call died or could not be reached
    (not that the call itself failed): worth one more try on another replica.

    Ray reports it as ``RayActorError`` (``ActorDiedError``, ``ActorUnavailableError``),
    Serve as ``ReplicaUnavailableError``, possibly wrapped in a ``RayTaskError`` or a
    ``RayServeException`` whose cause is one of those."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    seen = 0
    while exc is not None and seen < 4:  # follow a short chain of wrappers
        if isinstance(exc, (RayActorError, ReplicaUnavailableError)):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return False


async def _result(response):
    """Await a ``DeploymentResponse`` (``asyncio.wait_for`` wants a coroutine)."""
    return await response


def _cancel(response) -> None:
    response.cancel()


async def read_body_limited(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes: a declared
    Content-Length is checked before reading, and a chunked body is counted as it streams."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, "Content-Length is not a number") from None
        if size > limit:
            raise RequestError(413, f"request body is {size} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _ms(since: float) -> float:
    """Milliseconds since ``since`` (a ``perf_counter`` value)."""
    return round((time.perf_counter() - since) * 1000.0, 3)


def _page_html() -> str:
    return resources.files("thinkfast_pipelines.serve").joinpath("static/index.html").read_text(encoding="utf-8")


@serve.deployment
@serve.ingress(app)
class Ingress:
    """Owns the handles of the other deployments and orchestrates one query."""

    def __init__(
        self,
        args: ServeArgs,
        encoder: DeploymentHandle,
        retrievers: list[DeploymentHandle],
        reranker: DeploymentHandle,
        catalog: DeploymentHandle,
    ) -> None:
        auth.configure(args.api_token_file)  # reads the token in the replica (file or env), never from args
        self.args = args
        self.encoder = encoder
        self.retrievers = retrievers
        self.reranker = reranker
        self.catalog = catalog
        self.page = _page_html()

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "shards": len(self.retrievers)}

    @app.post(
        "/search",
        response_model=SearchResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": SearchRequest.model_json_schema()},
                    "multipart/form-data": {"schema": FORM_SCHEMA},
                },
            }
        },
    )
    async def search(self, request: Request) -> SearchResponse:
        start = time.perf_counter()
        max_image_bytes = self.args.limits.max_image_bytes
        body = await read_body_limited(request, body_limit(max_image_bytes))
        content_type = request.headers.get("content-type")
        if is_form(content_type):
            req = parse_search_form(body, content_type, max_image_bytes)
        else:
            req = parse_search_body(body, content_type, max_image_bytes)
        return await self.run_query(req, start)

    async def _stage(self, stage: str, method: DeploymentHandle, arg, deadline: Deadline, timeout_s: float):
        """``method.remote(arg)``, bounded and retried (``thinkfast.serving.deadline``); Serve's
        overload / unavailability errors become ``ServiceUnavailable`` (503 + Retry-After)."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        limits = self.args.limits
        policy = RetryPolicy(timeout_s, limits.stage_retries, limits.retry_after_s)
        try:
            return await call_with_retries(
                stage, lambda: method.remote(arg), _result, _cancel, is_replica_failure, policy, deadline
            )
        except (BackPressureError, DeploymentUnavailableError) as exc:
            raise ServiceUnavailable(stage, type(exc).__name__, limits.retry_after_s) from None

    async def run_query(self, req: SearchRequest, start: float) -> SearchResponse:
        limits = self.args.limits
        deadline = Deadline.after(limits.request_timeout_s)
        return await within(deadline, self._query(req, start, deadline), "search", limits.retry_after_s)

    async def _query(self, req: SearchRequest, start: float, deadline: Deadline) -> SearchResponse:
        timings: dict[str, float] = {}
        big_k = req.candidates()
        stage_s, rerank_s = self.args.limits.stage_timeout_s, self.args.limits.rerank_timeout_s

        t = time.perf_counter()
        if req.image is not None:  # f(x) of the query image: the index holds f(x) of the corpus
            image = req.image_bytes(self.args.limits.max_image_bytes)
            outcome = await self._stage("encoder", self.encoder.encode_image, image, deadline, stage_s)
        else:
            outcome = await self._stage("encoder", self.encoder.encode, req.query, deadline, stage_s)
        vector = raise_if_error(outcome)  # (d,)
        timings["encode"] = _ms(t)

        t = time.perf_counter()
        replies = await asyncio.gather(
            *(self._stage(f"retriever {i}", r.search, (vector, big_k), deadline, stage_s)
              for i, r in enumerate(self.retrievers))
        )
        cands = merge_query(replies, big_k)
        timings["retrieve"] = _ms(t)

        t = time.perf_counter()
        if req.fast_only or not cands.keys:
            hits: list[SearchHit] = fast_hits(cands.keys, cands.fast_scores, req.k)
            timings["rerank"] = 0.0
            captions = await self._stage("catalog", self.catalog.captions, [h.key for h in hits], deadline, stage_s)
            timings["captions"] = _ms(t)
        else:
            # overlaps with slow scoring; abandoned if the re-ranker fails
            caption_call = asyncio.ensure_future(
                self._stage("catalog", self.catalog.captions, cands.keys, deadline, stage_s)
            )
            try:
                item = RerankItem(req.query, cands, req.k, beta=req.beta)
                ranked = await self._stage("re-ranker", self.reranker.rerank, item, deadline, rerank_s)
            except BaseException:
                caption_call.cancel()
                raise
            hits = raise_if_error(ranked)
            timings["rerank"] = _ms(t)
            t = time.perf_counter()
            by_key = dict(zip(cands.keys, await caption_call))
            timings["captions"] = _ms(t)  # what is left of the overlapped catalog call
            captions = [by_key.get(h.key, "") for h in hits]
        explained = explain_hits(hits, cands.keys, cands.fast_scores) if req.explain else [None] * len(hits)
        results = [
            SearchResult(caption=caption, explain=None if why is None else Explanation(**why.to_dict()), **h.to_dict())
            for h, caption, why in zip(hits, captions, explained)
        ]
        timings["total"] = _ms(start)
        reranked = not req.fast_only and bool(cands.keys)
        return SearchResponse(
            query=req.query,
            image=req.image is not None,
            k=req.k,
            rerank=len(cands.keys) if reranked else 0,
            beta=(self.args.beta if req.beta is None else req.beta) if reranked else None,
            results=results,
            timings_ms=timings,
        )

    @app.get("/media/{key:path}")
    async def media(self, key: str) -> Response:
        check_media_key(key)
        limits = self.args.limits
        deadline = Deadline.after(limits.request_timeout_s)
        blob = raise_if_error(await self._stage("catalog", self.catalog.media, key, deadline, limits.stage_timeout_s))
        return Response(
            content=blob.data, media_type=blob.content_type, headers={"Cache-Control": "public, max-age=3600"}
        )
