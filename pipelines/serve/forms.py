"""``POST /search`` as ``multipart/form-data``: an ``image`` file part (what a browser's
file picker or ``curl -F image=@photo.jpg`` sends) plus the same options as text fields.

A form is turned into the JSON request it stands for (the file base64-encoded into
``image``, ``k`` / ``rerank`` / ``beta`` / ``explain`` converted from their text) and
validated by the same :class:`~thinkfast_pipelines.serve.http_api.SearchRequest`, so both
encodings have one set of rules and one set of answers. Parsed with the standard library
(RFC 7578 is a boundary split and a few headers; no ``python-multipart`` dependency); every
malformed form is a 400 or 422 with a ``detail``, never a 500.
"""

from __future__ import annotations

import base64
from email.message import Message
from typing import Any

from thinkfast_pipelines.serve.http_api import (
    DEFAULT_MAX_IMAGE_BYTES,
    MAX_BETA,
    MAX_K,
    RequestError,
    SearchRequest,
    body_limit,
    validate_search,
)

MAX_PARTS = 16  # a search form has at most six fields; more is not a search form
FILE_FIELD = "image"
_INT_FIELDS = ("k", "rerank")
_TRUE, _FALSE = ("true", "1", "on", "yes"), ("false", "0", "off", "no")


def is_form(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


def _params(header: str, name: str) -> Message:
    message = Message()
    message[name] = header
    return message


def _boundary(content_type: str) -> bytes:
    boundary = _params(content_type, "content-type").get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise RequestError(400, "multipart/form-data without a usable boundary parameter")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise RequestError(400, "multipart boundary is not ASCII") from None


def form_parts(body: bytes, content_type: str) -> list[tuple[str, bool, bytes]]:
    """``(field name, is a file, value bytes)`` per part of a multipart body, or 400."""
    delimiter = b"--" + _boundary(content_type)
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise RequestError(400, "multipart body is not terminated by its closing boundary")
    if len(chunks) - 2 > MAX_PARTS:
        raise RequestError(422, f"multipart body has {len(chunks) - 2} parts; a search form has at most {MAX_PARTS}")
    parts = []
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
            raise RequestError(400, "multipart part is not delimited by CRLF")
        head, sep, value = chunk[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise RequestError(400, "multipart part without a blank line after its headers")
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, field_value = line.partition(":")
            if not colon:
                raise RequestError(400, "multipart part has a malformed header line")
            headers[name.strip().lower()] = field_value.strip()
        disposition = headers.get("content-disposition", "")
        params = _params(disposition, "content-disposition")
        if params.get_content_disposition() != "form-data":
            raise RequestError(400, "multipart part without Content-Disposition: form-data")
        name = params.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise RequestError(422, "multipart part without a field name")
        is_file = params.get_param("filename", header="content-disposition") is not None
        parts.append((name, is_file, value))
    return parts


def _text(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"form field {name!r} is not valid UTF-8 (byte {exc.start})") from None


def _convert(name: str, text: str) -> Any:
    """A form field's text as the JSON type its ``SearchRequest`` field has."""
    try:
        if name in _INT_FIELDS:
            return int(text.strip())
        if name == "beta":
            return float(text.strip())
    except ValueError:
        kind = "an integer" if name in _INT_FIELDS else "a number"
        raise RequestError(422, [{"loc": [name], "msg": f"form field {name} must be {kind}", "type": "form"}]) from None
    if name == "explain":
        low = text.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise RequestError(422, [{"loc": [name], "msg": "form field explain must be true or false", "type": "form"}])
    return text


def parse_search_form(
    body: bytes, content_type: str, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> SearchRequest:
    """A multipart ``POST /search`` body -> a valid :class:`SearchRequest`, or :class:`RequestError`."""
    if len(body) > body_limit(max_image_bytes):
        raise RequestError(413, f"request body is {len(body)} bytes; the limit is {body_limit(max_image_bytes)}")
    payload: dict[str, Any] = {}
    for name, is_file, value in form_parts(body, content_type):
        if name in payload:
            raise RequestError(422, [{"loc": [name], "msg": f"form field {name} is given twice", "type": "form"}])
        if name == FILE_FIELD:
            if len(value) > max_image_bytes:
                raise RequestError(413, f"image is {len(value)} bytes; the limit is {max_image_bytes}")
            if not value:
                raise RequestError(422, "image is empty")
            payload[name] = base64.b64encode(value).decode("ascii")  # validated as the JSON field is
        elif is_file:
            raise RequestError(422, [{"loc": [name], "msg": f"only {FILE_FIELD} may be a file", "type": "form"}])
        else:
            payload[name] = _convert(name, _text(name, value))
    return validate_search(payload, max_image_bytes)


# the form as OpenAPI describes it (``format: binary``: a file part)
FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        FILE_FIELD: {"type": "string", "format": "binary", "description": "the image file to search by"},
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K},
        "rerank": {"type": "integer", "enum": [0], "description": "0 or absent: an image query is fast only"},
        "beta": {"type": "number", "minimum": 0, "maximum": MAX_BETA},
        "explain": {"type": "boolean"},
    },
    "required": [FILE_FIELD],
    "additionalProperties": False,
}
