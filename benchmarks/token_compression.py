"""What int8 tokens (``thinkfast.store.quantize``) cost in ranking quality, and what they save.

Over a trained demo's artifacts (``thinkfast demo --workdir W`` leaves ``W/slow``,
``W/fast``, ``W/emb``, ``W/corpus``), the test split is ranked twice with the same slow
model: from the float16 token store as embedded, and from the same tokens after an int8
round trip. Rows: slow exhaustive and fast + slow re-ranked at each K, with R@1, the
paired sign test per query at R@1 (``benchmarks/accuracy.py``'s), and bytes per item.

    python benchmarks/token_compression.py --workdir runs/demo [--rerank 10 50]

Prints a table, writes ``benchmarks/results/token_compression.json`` (load average at
start and end included; a run started at load >= 2 is flagged).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from accuracy import sign_test  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "token_compression.json")


def run(workdir: str, split: str, rerank: list[int], beta: float) -> dict[str, Any]:
    from thinkfast import SlowModel, metrics
    from thinkfast.evaluation.gallery import load_gallery, make_queries
    from thinkfast.evaluation.ranking import exact_candidates, rerank_ranks, slow_exhaustive_scores
    from thinkfast.models.fast import FastModel
    from thinkfast.store import TokenStore, read_embeddings
    from thinkfast.store.layout import fast_dir
    from thinkfast.store.quantize import bytes_per_item, dequantize_int8, quantize_int8
    from thinkfast import encode

    emb = os.path.join(workdir, "emb")
    slow = SlowModel.from_pretrained(os.path.join(workdir, "slow")).eval()
    fast = FastModel.from_pretrained(os.path.join(workdir, "fast")).eval()
    gallery = load_gallery(os.path.join(workdir, "corpus"), split)
    keys, vectors = read_embeddings(fast_dir(emb))
    pos = {k: i for i, k in enumerate(keys)}
    gallery.drop({k for k in gallery.keys if k not in pos}, "embed", "not_in_embeddings")
    gallery_vectors = vectors[[pos[k] for k in gallery.keys]]
    store = TokenStore.open(emb)
    fp16 = np.asarray(store.get(gallery.keys))  # (N, T, D) float16
    codes, scales = quantize_int8(fp16)
    int8 = dequantize_int8(codes, scales)
    err = np.abs(int8.astype(np.float32) - fp16.astype(np.float32))
    queries = make_queries(gallery)
    fast_scores = encode.text_vectors(fast, queries.texts) @ gallery_vectors.T
    position = {k: i for i, k in enumerate(gallery.keys)}
    rows: list[dict[str, Any]] = []
    for name, tokens in (("float16", fp16), ("int8", int8)):
        t0 = time.perf_counter()
        ranks = metrics.ranks_from_scores(slow_exhaustive_scores(slow, tokens, queries.texts), queries.target)
        rows.append({"tokens": name, "method": "slow", "R@1": metrics.recall_at_k(ranks, (1,))["R@1"],
                     "ranks": ranks.astype(int).tolist(), "seconds": round(time.perf_counter() - t0, 2)})
        getter = (lambda t: (lambda ks: t[[position[k] for k in ks]]))(tokens)
        for k in rerank:
            t0 = time.perf_counter()
            cands = exact_candidates(fast_scores, min(k, len(gallery.keys)))
            ranks, _ = rerank_ranks(slow, queries, gallery.keys, fast_scores, getter, cands, beta)
            rows.append({"tokens": name, "method": f"rerank@{k}", "R@1": metrics.recall_at_k(ranks, (1,))["R@1"],
                         "ranks": ranks.astype(int).tolist(), "seconds": round(time.perf_counter() - t0, 2)})
    comparisons = []
    for method in dict.fromkeys(r["method"] for r in rows):
        a = next(r for r in rows if r["method"] == method and r["tokens"] == "int8")
        b = next(r for r in rows if r["method"] == method and r["tokens"] == "float16")
        comparisons.append({"method": method, "R@1_float16": round(b["R@1"], 2), "R@1_int8": round(a["R@1"], 2),
                            "delta": round(a["R@1"] - b["R@1"], 2), "sign_test": sign_test(a["ranks"], b["ranks"]),
                            "same_ranks": a["ranks"] == b["ranks"]})
    t, d = fp16.shape[1:]
    return {
        "workdir": workdir, "split": split, "gallery_size": len(gallery.keys), "queries": len(queries.texts),
        "tokens_per_item": int(t), "token_dim": int(d), "beta": beta,
        "bytes_per_item": {"float16": bytes_per_item(t, d), "int8": bytes_per_item(t, d, "int8")},
        "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
        "comparisons": comparisons, "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="a finished thinkfast demo's workdir")
    parser.add_argument("--split", default="test")
    parser.add_argument("--rerank", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]
    if load_start >= 2:
        print(f"warning: load average {load_start:.1f} >= 2 at start; timings are not comparable", file=sys.stderr)
    report = run(args.workdir, args.split, args.rerank, args.beta)
    report["load_avg_start"], report["load_avg_end"] = load_start, os.getloadavg()[0]
    b = report["bytes_per_item"]
    print(f"gallery {report['gallery_size']}, {report['queries']} queries; {report['tokens_per_item']} tokens x "
          f"{report['token_dim']}: {b['float16']} B (float16) vs {b['int8']} B (int8) per item "
          f"({100 * b['int8'] / b['float16']:.1f}%); max |error| {report['max_abs_error']:.4f}")
    print("| method | R@1 float16 | R@1 int8 | delta | won / lost (sign test p) | identical ranks |")
    print("|---|---:|---:|---:|---|---|")
    for c in report["comparisons"]:
        s = c["sign_test"]
        print(f"| {c['method']} | {c['R@1_float16']:.2f} | {c['R@1_int8']:.2f} | {c['delta']:+.2f} | "
              f"{s['won']} / {s['lost']} (p {s['p']:g}) | {c['same_ranks']} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out} (load {report['load_avg_start']:.1f} -> {report['load_avg_end']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
