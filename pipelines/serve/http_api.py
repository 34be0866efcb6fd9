"""The HTTP contract of ``POST /search`` (DESIGN.md section 3) and its input validation.

The body is parsed here by hand rather than by FastAPI's automatic body binding so that
every way a body can be wrong (too large, not UTF-8, not JSON, not an object, unknown
fields, wrong types, out-of-range values, lone surrogates that would crash the JSON
encoder later) maps to one 4xx with a JSON ``detail`` and never reaches a model. Pure
Python + pydantic: importable and testable without Ray or FastAPI.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from thinkfast.serving.errors import MediaUnavailable, ServingError, UnknownMediaKey

MAX_BODY_BYTES = 16 * 1024  # request bodies above this are refused before parsing (413)
MAX_QUERY_CHARS = 1000  # longest query accepted
MAX_K = 100  # most results one response may carry
MAX_RERANK = 1000  # most candidates the slow model may score for one query
DEFAULT_K = 10  # results returned when the body does not say
DEFAULT_RERANK = 50  # candidates re-ranked when the body does not say (raised to k if smaller)
MAX_MEDIA_KEY_CHARS = 1024  # longer /media keys are refused without a lookup
MAX_BETA = 100.0  # largest per-query beta (s_fast is a cosine, h a sum of log-probabilities)
DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024  # ServiceLimits.max_image_bytes' default


# a JSON ``detail``: a sentence, or pydantic's cleaned error list
Detail = str | list[dict[str, Any]]


class RequestError(Exception):
    """A client error: ``status`` (4xx) and a JSON-serialisable ``detail``."""

    def __init__(self, status: int, detail: Detail) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail


class SearchRequest(BaseModel):
    """``{"query" | "image", "k", "rerank", "beta", "explain"}``; strict types: ``"5"`` or
    ``5.0`` or ``true`` is not an int. Exactly one of ``query`` (text) and ``image`` (base64
    of an image file, or a ``data:`` URL of one). An image query is fast only: the slow
    model scores captions against an image's tokens, and an image query has no caption."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        json_schema_extra={"oneOf": [{"required": ["query"]}, {"required": ["image"]}]},
    )

    query: str | None = Field(
        None, min_length=1, max_length=MAX_QUERY_CHARS, description="the text to search for (or send image)"
    )
    image: str | None = Field(
        None,
        min_length=1,
        description="query by image: base64 of an image file (PNG, JPEG, ...; a data: URL is accepted);"
        " fast only, so rerank must be 0 or absent",
        json_schema_extra={"contentEncoding": "base64"},
    )
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="results to return")
    rerank: int | None = Field(
        None, ge=0, le=MAX_RERANK, description="K candidates the slow model re-scores; 0 = fast only"
    )
    beta: float | None = Field(
        None,
        ge=0.0,
        le=MAX_BETA,
        allow_inf_nan=False,
        description="weight of s_fast in the final score h + beta * s_fast; default: the service's beta",
    )
    explain: bool = Field(False, description="add each result's fast rank and final rank (what re-ranking changed)")
    _image_data: bytes | None = PrivateAttr(None)  # ``image`` decoded, once

    @field_validator("query")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is None:
            return value
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
    def _consistent(self) -> "SearchRequest":
        if (self.query is None) == (self.image is None):
            raise ValueError("send exactly one of query (text) and image (base64 of an image file)")
        if self.image is not None and self.rerank:
            raise ValueError(
                f"rerank ({self.rerank}) must be 0 or absent for an image query: the slow model scores"
                " captions, not images, so an image query is fast only"
            )
        if self.rerank is not None and self.rerank != 0 and self.rerank < self.k:
            raise ValueError(f"rerank ({self.rerank}) must be 0 or >= k ({self.k})")
        return self

    def candidates(self) -> int:
        """K: how many fast candidates to fetch (and re-rank unless fast-only)."""
        if self.fast_only:
            return self.k
        return max(self.k, DEFAULT_RERANK) if self.rerank is None else self.rerank

    @property
    def fast_only(self) -> bool:
        return self.rerank == 0 or self.image is not None

    def image_bytes(self, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
        """The image file ``image`` carries: 413 when it would exceed ``max_image_bytes``
        (judged from the base64 length, before decoding), 422 when it is not base64.
        Decoded once (``parse_search_body`` checks it; the ingress then reuses it)."""
        if self.image is None:
            raise RequestError(422, "this is a text query; it has no image")
        if self._image_data is not None:
            if len(self._image_data) > max_image_bytes:
                raise RequestError(413, f"image is {len(self._image_data)} bytes; the limit is {max_image_bytes}")
            return self._image_data
        text = self.image
        if text.startswith("data:"):  # a browser's FileReader.readAsDataURL
            head, sep, text = text.partition(",")
            if not sep or not head.endswith(";base64"):
                raise RequestError(422, "image is a data: URL without ';base64,' data")
        text = "".join(text.split())  # line-wrapped base64 (MIME style) is still base64
        if len(text) // 4 * 3 > max_image_bytes + 2:
            raise RequestError(413, f"image is about {len(text) // 4 * 3} bytes; the limit is {max_image_bytes}")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(422, f"image is not valid base64 ({exc})") from None
        if not data:
            raise RequestError(422, "image is empty")
        if len(data) > max_image_bytes:
            raise RequestError(413, f"image is {len(data)} bytes; the limit is {max_image_bytes}")
        self._image_data = data
        return data


class Explanation(BaseModel):
    """What re-ranking did to one result (``"explain": true``)."""

    rank: int  # final position, 1-based
    fast_rank: int  # position by s_fast among the candidates, 1-based
    fast_score: float  # s_fast
    slow_score: float | None  # h; None when not re-ranked (fast only)


class SearchResult(BaseModel):
    key: str  # corpus key; its media is GET /media/{key}
    score: float  # final ranking score: h + beta * s_fast, or s_fast when fast only
    fast_score: float  # s_fast = f(x)^T g(y)
    slow_score: float | None  # h = h_fwd + h_bwd (<= 0); None when not re-ranked
    caption: str  # the corpus' first caption of this item (display only)
    explain: Explanation | None = None  # with "explain": true


class ErrorResponse(BaseModel):
    """The body of every error answer: a sentence, or pydantic's cleaned error list."""

    detail: Detail


class SearchResponse(BaseModel):
    query: str | None  # the text searched for; None for a query by image
    image: bool = False  # True: a query by image (fast only)
    k: int  # results asked for
    rerank: int  # candidates re-ranked (0 = fast only)
    beta: float | None = None  # the beta of the final score; None when fast only
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


def body_limit(max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> int:
    """Largest ``POST /search`` body read at all: a text query's limit plus the base64 of
    the largest image (4 characters per 3 bytes, line breaks and a data: URL prefix allowed
    for). A text query is still held to ``MAX_BODY_BYTES`` once the body is parsed."""
    return MAX_BODY_BYTES + (max_image_bytes + 2) // 3 * 4 * 77 // 76 + 1024


def parse_search_body(
    body: bytes, content_type: str | None = None, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> SearchRequest:
    """Bytes of a ``POST /search`` body -> a valid :class:`SearchRequest`, or :class:`RequestError`.

    A body with an ``image`` may be up to ``body_limit(max_image_bytes)``; any other is
    refused above ``MAX_BODY_BYTES`` (413) before its fields are validated."""
    limit = body_limit(max_image_bytes)
    if len(body) > limit:
        raise RequestError(413, f"request body is {len(body)} bytes; the limit is {limit} (with an image)")
    if not _json_ok_media_type(content_type):
        raise RequestError(
            415, f"content type {content_type!r} is not JSON; send application/json (or multipart/form-data with an image)"
        )
    if not body.strip():
        raise RequestError(400, "request body is empty; send a JSON object like {\"query\": \"a red circle\"}")
    if len(body) > MAX_BODY_BYTES and b'"image"' not in body:  # cheap: no image, no need to parse it
        raise RequestError(413, f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
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
    if len(body) > MAX_BODY_BYTES and payload.get("image") is None:
        raise RequestError(413, f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES} without an image")
    return validate_search(payload, max_image_bytes)


def validate_search(payload: dict[str, Any], max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> SearchRequest:
    """A decoded JSON object (or form) -> a :class:`SearchRequest` whose image, if any, is
    decoded and within ``max_image_bytes``; else :class:`RequestError` (422 / 413)."""
    try:
        req = SearchRequest.model_validate(payload)
    except ValidationError as exc:
        raise RequestError(422, _clean_errors(exc)) from None
    if req.image is not None:
        req.image_bytes(max_image_bytes)
    return req


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
    413: f"the body is larger than {MAX_BODY_BYTES} bytes (a text query), or the image than the service's"
    " max_image_bytes (a query by image)",
    415: "the body's content type is not JSON or multipart/form-data (or, for /login, not a form)",
    422: "the JSON is well-formed but not a valid request (field types, ranges, unknown fields), or the query"
    " image cannot be decoded or has more pixels than the service's max_image_pixels",
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
