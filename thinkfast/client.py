"""A Python client for a running ``thinkfast serve``.

    from thinkfast import Client

    client = Client("http://127.0.0.1:8000")
    hits = client.search("a zebra", k=5, rerank=20)
    for r in hits["results"]:
        print(r["key"], r["score"], r["caption"])
    png = client.media(hits["results"][0]["key"])

The service's own refusals (a 4xx with a ``detail``) become one :class:`ThinkfastError`
line, as on the command line (``thinkfast search`` uses this class); an unreachable URL
says so instead of a connection traceback. One ``requests.Session`` per client, so a loop
of queries reuses its connection.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from thinkfast.errors import ThinkfastError

logger = logging.getLogger(__name__)

TOKEN_ENV = "THINKFAST_API_TOKEN"  # the same variable a protected service reads its token from
DEFAULT_URL = "http://127.0.0.1:8000"


class Client:
    """HTTP client of ``POST /search``, ``GET /media/KEY`` and ``GET /healthz``.

    ``token`` (default ``$THINKFAST_API_TOKEN``) is sent as ``Authorization: Bearer`` to a
    service that requires one; it is never logged, printed or part of ``repr``."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout_s: float = 60.0) -> None:
        import requests

        self.url = url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self._token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self._session = requests.Session()
        if self._token:
            self._session.headers["Authorization"] = f"Bearer {self._token}"

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def search(self, query: str | None = None, k: int = 10, rerank: int | None = None, *,
               image: str | bytes | None = None, beta: float | None = None,
               explain: bool = False) -> dict[str, Any]:
        """The service's JSON answer: ``{"query", "k", "rerank", "results": [{"key", "score",
        "fast_score", "slow_score", "caption", ...}], "timings_ms": {stage: ms}}``.

        ``rerank`` None is the service's default K, 0 fast-only; ``beta`` weighs s_fast in
        ``h + beta * s_fast``. ``image`` (a file path, or its bytes) instead of ``query``
        searches by image, fast-only; it is sent as ``multipart/form-data`` (the raw file,
        not 4/3 of it as base64)."""
        if (query is None) == (image is None):
            raise ThinkfastError("give a query text or an image (exactly one)")
        options: dict[str, Any] = {"k": k}
        for name, value in (("rerank", rerank), ("beta", beta)):
            if value is not None:
                options[name] = value
        if explain:
            options["explain"] = True
        if image is not None:
            data = image if isinstance(image, bytes) else _read_image(image)
            name = "image" if isinstance(image, bytes) else os.path.basename(image)
            form = {key: str(value).lower() if isinstance(value, bool) else str(value)
                    for key, value in options.items()}
            send: dict[str, Any] = {"files": {"image": (name, data, "application/octet-stream")}, "data": form}
        else:
            send = {"json": {"query": query, **options}}
        return self._json(self._request("POST", "/search", **send))

    def media(self, key: str) -> bytes:
        """The stored image (or video) bytes of ``key``, as the search page shows them."""
        import urllib.parse

        resp = self._request("GET", "/media/" + urllib.parse.quote(key, safe=""))
        if resp.status_code != 200:
            self._json(resp)  # raises with the service's detail
        return resp.content

    def health(self) -> dict[str, Any]:
        """``{"status": "ok", "shards": N}`` from a service that is up."""
        return self._json(self._request("GET", "/healthz"))

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import requests

        endpoint = self.url + path
        try:
            return self._session.request(method, endpoint, timeout=self.timeout_s, **kwargs)
        except requests.Timeout:
            raise ThinkfastError(f"{endpoint} did not answer within {self.timeout_s:g} s") from None
        except requests.RequestException as exc:
            raise ThinkfastError(f"no search service reachable at {endpoint}: {type(exc).__name__}") from None

    def _json(self, resp: Any) -> dict[str, Any]:
        try:
            data = resp.json()
        except ValueError:
            raise ThinkfastError(f"{resp.url} answered HTTP {resp.status_code} without JSON") from None
        if resp.status_code == 401:
            hint = "the token was refused" if self._token else f"it needs an access token: set {TOKEN_ENV}"
            raise ThinkfastError(f"the service refused the request (HTTP 401): {hint}")
        if resp.status_code != 200:
            raise ThinkfastError(f"the service refused the request (HTTP {resp.status_code}): {_detail(data)}")
        return data


def _read_image(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ThinkfastError(f"cannot read the query image {path}: {exc.strerror or type(exc).__name__}") from None


def _detail(data: Any) -> str:
    """FastAPI's ``detail``: a string, or a validation list of ``{"loc", "msg"}`` items."""
    detail = data.get("detail") if isinstance(data, dict) else data
    if isinstance(detail, list):
        parts = []
        for item in detail:
            where = ".".join(map(str, item.get("loc", []))) if isinstance(item, dict) else ""
            msg = str(item.get("msg", "")) if isinstance(item, dict) else str(item)
            parts.append(f"{where}: {msg}" if where else msg)
        return "; ".join(parts)
    return str(detail)
