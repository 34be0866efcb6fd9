"""Clustered unit vectors for index tests and benchmarks.

Recall measured on uniform random vectors is meaningless (every neighbour is about as
far as any other), so tests and ``benchmarks/index_bench.py`` use points scattered
around random centres, the way real embeddings cluster by content."""

from __future__ import annotations

import numpy as np


def clustered_vectors(
    n: int, dim: int, clusters: int = 100, spread: float = 0.35, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` L2-normalised float32 vectors (n, dim) around ``clusters`` random centres, and
    the centres (clusters, dim); ``spread`` is the noise norm relative to a centre."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    assign = rng.integers(0, clusters, size=n)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 262_144):  # chunks keep peak memory near the output's size
        stop = min(n, start + 262_144)
        noise = rng.standard_normal((stop - start, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        out[start:stop] = centres[assign[start:stop]] + noise
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out, centres


def noisy_queries(vectors: np.ndarray, n: int, noise: float = 0.1, seed: int = 1) -> np.ndarray:
    """``n`` queries near random database vectors (normalised), as text embeddings land near images."""
    rng = np.random.default_rng(seed)
    picks = vectors[rng.integers(0, len(vectors), size=n)]
    q = picks + rng.standard_normal(picks.shape).astype(np.float32) * (noise / np.sqrt(vectors.shape[1]))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
