"""Clustered unit vectors for index tests and benchmarks.

Recall measured on uniform random vectors is meaningless (every neighbour is about as
far as any other), and so is recall on isotropic noise around centres in 256-d, for the
same reason. Real embeddings cluster by content and vary along few directions, so the
points here are centres plus low-dimensional variation (``intrinsic_dim`` directions)
plus a little isotropic noise."""

from __future__ import annotations

import numpy as np


def clustered_vectors(
    n: int,
    dim: int,
    clusters: int = 100,
    spread: float = 0.6,
    intrinsic_dim: int = 16,
    noise: float = 0.05,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` L2-normalised float32 vectors (n, dim) and the ``clusters`` centres (clusters, dim).

    Each point is ``centre + spread * (variation in a random intrinsic_dim-d subspace)
    + noise * isotropic``, normalised; both scales are norms relative to a unit centre."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    k = max(1, min(intrinsic_dim, dim))
    basis = rng.standard_normal((k, dim)).astype(np.float32) / np.sqrt(dim)  # (k, dim), rows ~unit norm
    assign = rng.integers(0, clusters, size=n)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 262_144):  # chunks keep peak memory near the output's size
        stop = min(n, start + 262_144)
        m = stop - start
        local = rng.standard_normal((m, k)).astype(np.float32) @ basis * (spread / np.sqrt(k))  # (m, dim)
        iso = rng.standard_normal((m, dim)).astype(np.float32) * (noise / np.sqrt(dim))
        out[start:stop] = centres[assign[start:stop]] + local + iso
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out, centres


def noisy_queries(vectors: np.ndarray, n: int, noise: float = 0.1, seed: int = 1) -> np.ndarray:
    """``n`` queries near random database vectors (normalised), as text embeddings land near images."""
    rng = np.random.default_rng(seed)
    picks = vectors[rng.integers(0, len(vectors), size=n)]
    q = picks + rng.standard_normal(picks.shape).astype(np.float32) * (noise / np.sqrt(vectors.shape[1]))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
