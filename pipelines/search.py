"""``thinkfast search QUERY --url URL``: ask a running service and print its results.

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


def search(query: str, url: str = "http://127.0.0.1:8000", k: int = 10, rerank: int | None = None,
           timeout_s: float = 60.0, token: str | None = None) -> dict[str, Any]:
    """POST ``{"query", "k", "rerank"}`` to ``URL/search``; the decoded JSON response.

    ``token`` (default ``$THINKFAST_API_TOKEN``) is sent as ``Authorization: Bearer`` to a
    service that requires one; it is never logged or printed."""
    import os

    import requests

    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    body: dict[str, Any] = {"query": query, "k": k}
    if rerank is not None:
        body["rerank"] = rerank
    endpoint = url.rstrip("/") + "/search"
    try:
        resp = requests.post(endpoint, json=body, timeout=timeout_s, headers=headers)
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

    out.write(f"query: {data['query']}  (k={data['k']}, re-ranked {data['rerank']})\n")
    out.write(f"{'#':>3}  {'key':<20} {'score':>9} {'fast':>7} {'slow':>9}  caption\n")
    for i, r in enumerate(data["results"], 1):
        out.write(
            f"{i:>3}  {r['key']:<20} {num(r['score']):>9} {num(r['fast_score']):>7} {num(r['slow_score']):>9}"
            f"  {r['caption']}\n"
        )
    t = data["timings_ms"]
    out.write("ms: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help="text to search for")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of `thinkfast serve`")
    parser.add_argument("--k", type=int, default=10, help="results to return (1-100)")
    parser.add_argument("--rerank", type=int, default=None, help="candidates to re-rank (0 = fast only)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON response")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")


def run(ns: argparse.Namespace) -> int:
    data = search(ns.query, url=ns.url, k=ns.k, rerank=ns.rerank, timeout_s=ns.timeout)
    if ns.json:
        print(json.dumps(data, indent=2))
    else:
        print_results(data)
    return 0
