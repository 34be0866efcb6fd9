"""``thinkfast search QUERY --url URL`` (or ``--image PATH``): ask a running service and
print its results.

The HTTP work is :class:`thinkfast.client.Client` (also the Python API); this module adds
the command line and the result table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, TextIO

from thinkfast.client import DEFAULT_URL, TOKEN_ENV, Client  # noqa: F401 - TOKEN_ENV re-exported

logger = logging.getLogger(__name__)


def search(query: str | None = None, url: str = DEFAULT_URL, k: int = 10, rerank: int | None = None,
           timeout_s: float = 60.0, token: str | None = None, *, image: str | bytes | None = None,
           beta: float | None = None, explain: bool = False) -> dict[str, Any]:
    """One query with :class:`thinkfast.client.Client` (see there for the arguments)."""
    with Client(url, token=token, timeout_s=timeout_s) as client:
        return client.search(query, k=k, rerank=rerank, image=image, beta=beta, explain=explain)


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
    parser.add_argument("--url", default=DEFAULT_URL, help="base URL of `thinkfast serve`")
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
