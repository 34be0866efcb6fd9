"""The HTTP contract of ``POST /search`` (DESIGN.md section 3) and its input validation.

The body is parsed here by hand rather than by FastAPI's automatic body binding so that
every way a body can be wrong (too large, not UTF-8, not JSON, not an object, unknown
fields, wrong types, out-of-range values, lone surrogates that would crash the JSON
encoder later) maps to one 4xx with a JSON ``detail`` and never reaches a model. Pure
Python + pydantic: importable and testable without Ray or FastAPI.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from thinkfast.serving.errors import MediaUnavailable, ServingError, UnknownMediaKey

MAX_BODY_BYTES = 16 * 1024  # request bodies above this are refused before parsing (413)
MAX_QUERY_CHARS = 1000  # longest query accepted
MAX_K = 100  # most results one response may carry
MAX_RERANK = 1000  # most candidates the slow model may score for one query
DEFAULT_K = 10  # results returned when the body does not say
DEFAULT_RERANK = 50  # candidates re-ranked when the body does not say (raised to k if smaller)
MAX_MEDIA_KEY_CHARS = 1024  # longer /media keys are refused without a lookup


# a JSON ``detail``: a sentence, or pydantic's cleaned error list
Detail = str | list[dict[str, Any]]


class RequestError(Exception):
    """A client error: ``status`` (4xx) and a JSON-serialisable ``detail``."""

    def __init__(self, status: int, detail: Detail) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail


class SearchRequest(BaseModel):
    """``{"query", "k", "rerank"}``; strict types: ``"5"`` or ``5.0`` or ``true`` is not an int."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="the text to search for")
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="results to return")
    rerank: int | None = Field(
        None, ge=0, le=MAX_RERANK, description="K candidates the slow model re-scores; 0 = fast only"
    )

    @field_validator("query")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query must contain a non-whitespace character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates from "\ud800" JSON escapes
            raise ValueError("query is not valid Unicode (lone surrogate)") from exc
        if "\x00" in value:
            raise ValueError("query must not contain NUL characters")
        return value

    @model_validator(mode="after")
    def _rerank_covers_k(self) -> "SearchRequest":
        if self.rerank is not None and self.rerank != 0 and self.rerank < self.k:
            raise ValueError(f"rerank ({self.rerank}) must be 0 or >= k ({self.k})")
        return self

    def candidates(self) -> int:
        """K: how many fast candidates to fetch (and re-rank unless fast-only)."""
        if self.rerank is None:
            return max(self.k, DEFAULT_RERANK)
        return self.rerank if self.rerank > 0 else self.k

    @property
    def fast_only(self) -> bool:
        return self.rerank == 0


class SearchResult(BaseModel):
    key: str  # corpus key; its media is GET /media/{key}
    score: float  # final ranking score: h + beta * s_fast, or s_fast when fast only
    fast_score: float  # s_fast = f(x)^T g(y)
    slow_score: float | None  # h = h_fwd + h_bwd (<= 0); None when not re-ranked
    caption: str  # the corpus' first caption of this item (display only)


class ErrorResponse(BaseModel):
    """The body of every error answer: a sentence, or pydantic's cleaned error list."""

    detail: Detail


class SearchResponse(BaseModel):
    query: str
    k: int  # results asked for
    rerank: int  # candidates re-ranked (0 = fast only)
    results: list[SearchResult]
    timings_ms: dict[str, float]  # encode, retrieve, rerank, total


def _json_ok_media_type(content_type: str | None) -> bool:
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("application/json", "text/plain") or media.endswith("+json")


def _clean_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors without the offending input (a 10 kB query would be echoed back)."""
    return [
        {"loc": [str(p) for p in err.get("loc", ())], "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


def parse_search_body(body: bytes, content_type: str | None = None) -> SearchRequest:
    """Bytes of a ``POST /search`` body -> a valid :class:`SearchRequest`, or :class:`RequestError`."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    if not _json_ok_media_type(content_type):
        raise RequestError(415, f"content type {content_type!r} is not JSON; send application/json")
    if not body.strip():
        raise RequestError(400, "request body is empty; send a JSON object like {\"query\": \"a red circle\"}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (RecursionError, ValueError) as exc:  # deep nesting; ints over Python's 4300-digit limit
        raise RequestError(400, f"request body is not acceptable JSON: {type(exc).__name__}") from None
    if not isinstance(payload, dict):
        raise RequestError(422, f"request body must be a JSON object, not {type(payload).__name__}")
    try:
        return SearchRequest.model_validate(payload)
    except ValidationError as exc:
        raise RequestError(422, _clean_errors(exc)) from None


def check_media_key(key: str) -> str:
    """Cheap pre-check of a ``/media/{key}`` path parameter; the real check is the table lookup."""
    if not key or len(key) > MAX_MEDIA_KEY_CHARS:
        raise RequestError(404, "unknown media key")
    return key


def request_error_of(exc: ServingError) -> RequestError:
    """The HTTP answer to an error a serving stage reported: 404 for media the corpus
    lacks or cannot decode, 422 for a query the models cannot use."""
    status = 404 if isinstance(exc, (UnknownMediaKey, MediaUnavailable)) else 422
    return RequestError(status, str(exc))


# What each route answers besides its success, as the OpenAPI spec documents it (a fuzzer
# such as schemathesis fails on any status missing here). 401 is listed everywhere but
# /healthz whether or not a token is configured: the same spec fits both deployments.
# 405 is what Starlette answers for another method on a known path.
STATUS_DESCRIPTIONS: dict[int, str] = {
    400: "the body is not UTF-8 or not JSON, or Content-Length is not a number",
    401: "an access token is configured and the request lacks it (auth.py); WWW-Authenticate: Bearer",
    404: "no such media key in the corpus, or its media cannot be decoded",
    405: "another method than the one documented here",
    413: f"the body is larger than {MAX_BODY_BYTES} bytes",
    415: "the body's content type is not JSON (or, for /login, not a form)",
    422: "the JSON is well-formed but not a valid request (field types, ranges, unknown fields)",
    503: "a backend deployment is overloaded or not yet running: retry later",
}
DOCUMENTED_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("/search", "post"): (400, 401, 405, 413, 415, 422, 503),
    ("/media/{key}", "get"): (401, 404, 405, 503),
    ("/", "get"): (401, 405),
    ("/healthz", "get"): (405,),
    ("/login", "post"): (400, 401, 405, 413, 415),
}
# Success bodies FastAPI cannot infer from a route returning a plain Response.
SUCCESS_CONTENT: dict[tuple[str, str], dict[str, Any]] = {
    ("/media/{key}", "get"): {"image/*": {"schema": {"type": "string", "format": "binary"}}},
}
LOGIN_OPERATION: dict[str, Any] = {
    "summary": "Sign a browser in: sets an HttpOnly, SameSite=Strict session cookie",
    "operationId": "login",
    "requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {"type": "object", "properties": {"token": {"type": "string"}}, "required": ["token"]}
            }
        },
    },
    "responses": {
        "303": {"description": "signed in (or no token configured): back to the page, with the cookie"},
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def document_errors(spec: dict[str, Any], protected: bool, open_paths: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Add ``DOCUMENTED_ERRORS`` (and ``POST /login``) to a FastAPI OpenAPI ``spec`` in place.

    Done on the generated document rather than on each route decorator so the table of
    statuses lives next to the code that returns them. ``protected``: a token is
    configured, so the security schemes are declared on every path outside ``open_paths``."""
    paths = spec.setdefault("paths", {})
    paths.setdefault("/login", {})["post"] = json.loads(json.dumps(LOGIN_OPERATION))
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for (path, method), codes in DOCUMENTED_ERRORS.items():
        operation = paths.get(path, {}).get(method)
        if operation is None:
            continue
        responses = operation.setdefault("responses", {})
        if (path, method) in SUCCESS_CONTENT:
            responses.setdefault("200", {"description": "OK"})["content"] = SUCCESS_CONTENT[(path, method)]
        for code in codes:
            content: dict[str, Any] = {"application/json": {"schema": _ERROR_REF}}
            if code == 401 and path in ("/", "/login"):
                content["text/html"] = {"schema": {"type": "string"}}  # the sign-in form
            responses[str(code)] = {"description": STATUS_DESCRIPTIONS[code], "content": content}
        if 422 not in codes:
            responses.pop("422", None)  # FastAPI's default for path parameters: never answered
    if protected:
        spec["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        for path, operations in paths.items():
            if path in open_paths:
                continue
            for operation in operations.values():
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
    return spec
