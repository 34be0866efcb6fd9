"""``thinkfast search QUERY --url URL`` (or ``--image PATH``): ask a running service and
print its results.

A thin HTTP client (``requests``); the service's 4xx ``detail`` becomes one clear error
line, and an unreachable URL says so instead of printing a connection traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, TextIO

from thinkfast.errors import ThinkfastError

logger = logging.getLogger(__name__)


TOKEN_ENV = "THINKFAST_API_TOKEN"  # the same variable a protected service reads its token from


def search(query: str | None = None, url: str = "http://127.0.0.1:8000", k: int = 10, rerank: int | None = None,
           timeout_s: float = 60.0, token: str | None = None, *, image: str | bytes | None = None,
           beta: float | None = None, explain: bool = False) -> dict[str, Any]:
    """POST ``{"query", "k", "rerank", "beta", "explain"}`` to ``URL/search``; the decoded JSON response.

    ``image`` (a file path, or the file's bytes) instead of ``query``: a query by image,
    sent as ``multipart/form-data`` (the raw file, not 4/3 of it as base64); fast only.
    ``token`` (default ``$THINKFAST_API_TOKEN``) is sent as ``Authorization: Bearer`` to a
    service that requires one; it is never logged or printed."""
    import os

    import requests

    if (query is None) == (image is None):
        raise ThinkfastError("give a query text or --image PATH (exactly one)")
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    options: dict[str, Any] = {"k": k}
    for name, value in (("rerank", rerank), ("beta", beta)):
        if value is not None:
            options[name] = value
    if explain:
        options["explain"] = True
    endpoint = url.rstrip("/") + "/search"
    if image is not None:
        data = image if isinstance(image, bytes) else _read_image(image)
        name = "image" if isinstance(image, bytes) else os.path.basename(image)
        form = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in options.items()}
        send: dict[str, Any] = {"files": {"image": (name, data, "application/octet-stream")}, "data": form}
    else:
        send = {"json": {"query": query, **options}}
    try:
        resp = requests.post(endpoint, timeout=timeout_s, headers=headers, **send)
    except requests.RequestException as exc:
        raise ThinkfastError(f"no search service reachable at {endpoint}: {type(exc).__name__}") from None
    try:
        data = resp.json()
    except ValueError:
        raise ThinkfastError(f"{endpoint} answered HTTP {resp.status_code} without JSON") from None
    if resp.status_code == 401:
        hint = "the token was refused" if token else f"it needs an access token: set {TOKEN_ENV}"
        raise ThinkfastError(f"the service refused the query (HTTP 401): {hint}")
    if resp.status_code != 200:
        raise ThinkfastError(f"the service refused the query (HTTP {resp.status_code}): {_detail(data)}")
    return data


def _read_image(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ThinkfastError(f"cannot read the query image {path}: {exc.strerror or type(exc).__name__}") from None


def _detail(data: Any) -> str:
    detail = data.get("detail") if isinstance(data, dict) else data
    if isinstance(detail, list):
        parts = []
        for item in detail:
            where = ".".join(map(str, item.get("loc", []))) if isinstance(item, dict) else ""
            msg = str(item.get("msg", "")) if isinstance(item, dict) else str(item)
            parts.append(f"{where}: {msg}" if where else msg)
        return "; ".join(parts)
    return str(detail)


def print_results(data: dict[str, Any], out: TextIO | None = None) -> None:
    """A fixed-width table: rank, key, score, fast, slow, caption; then the stage timings.

    ``out`` defaults to the *current* ``sys.stdout`` (looked up at call time, so output
    redirected after import, e.g. by pytest's capture, is honoured)."""
    out = out if out is not None else sys.stdout

    def num(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    what = "(an image)" if data.get("image") else data["query"]
    beta = "" if data.get("beta") is None else f", beta {data['beta']:g}"
    out.write(f"query: {what}  (k={data['k']}, re-ranked {data['rerank']}{beta})\n")
    explained = any(r.get("explain") for r in data["results"])
    fast_rank = f" {'fast#':>5}" if explained else ""  # where the fast ranking had it: what re-ranking moved
    out.write(f"{'#':>3}  {'key':<20} {'score':>9} {'fast':>7} {'slow':>9}{fast_rank}  caption\n")
    for i, r in enumerate(data["results"], 1):
        moved = f" {(r.get('explain') or {}).get('fast_rank', '-'):>5}" if explained else ""
        out.write(
            f"{i:>3}  {r['key']:<20} {num(r['score']):>9} {num(r['fast_score']):>7} {num(r['slow_score']):>9}"
            f"{moved}  {r['caption']}\n"
        )
    t = data["timings_ms"]
    out.write("ms: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", nargs="?", default=None, help="text to search for (or --image)")
    parser.add_argument("--image", default=None, metavar="PATH",
                        help="search by this image file instead of a text (fast only)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of `thinkfast serve`")
    parser.add_argument("--k", type=int, default=10, help="results to return (1-100)")
    parser.add_argument("--rerank", type=int, default=None, help="candidates to re-rank (0 = fast only)")
    parser.add_argument("--beta", type=float, default=None,
                        help="weight of s_fast in h + beta * s_fast (0-100; default: the service's)")
    parser.add_argument("--explain", action="store_true",
                        help="show each result's fast rank next to its final rank")
    parser.add_argument("--json", action="store_true", help="print the raw JSON response")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")


def run(ns: argparse.Namespace) -> int:
    data = search(ns.query, url=ns.url, k=ns.k, rerank=ns.rerank, timeout_s=ns.timeout, image=ns.image,
                  beta=ns.beta, explain=ns.explain)
    if ns.json:
        print(json.dumps(data, indent=2))
    else:
        print_results(data)
    return 0
