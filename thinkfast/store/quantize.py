"""Compressed slow tokens: int8 with one scale per token.

The token store dominates the disk and memory budget of re-ranking: at the ``small``
preset it is 84 tokens x 256 x 2 bytes = 43 KB per image (43 GB per million). The tokens
leave the vision tower through a LayerNorm, so each token's values sit in a narrow,
zero-centred range, and symmetric int8 with a per-token absmax scale keeps them to within
``scale / 2`` per value::

    scale_t = max_i |x_ti| / 127            (float16, one per token)
    q_ti    = round(x_ti / scale_t)         (int8 in [-127, 127])
    x'_ti   = q_ti * scale_t

That is ``D + 2`` bytes per token instead of ``2 D``: 49.6% of float16 at D = 256.
What it costs in ranking quality is measured, not assumed (``benchmarks/token_compression.py``).
"""

from __future__ import annotations

import numpy as np

INT8_MAX = 127


def quantize_int8(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(..., T, D)`` float -> codes ``(..., T, D)`` int8 and scales ``(..., T)`` float16.

    An all-zero token gets scale 0 and codes 0 (it dequantizes to zeros exactly). The
    scale is rounded to float16 *before* the codes are computed, so dequantization uses
    exactly the scale the codes were made with."""
    x = np.asarray(tokens, dtype=np.float32)
    absmax = np.abs(x).max(axis=-1)  # (..., T)
    scales = (absmax / INT8_MAX).astype(np.float16)
    safe = np.where(scales > 0, scales.astype(np.float32), 1.0)[..., None]
    codes = np.clip(np.rint(x / safe), -INT8_MAX, INT8_MAX).astype(np.int8)
    return codes, scales


def dequantize_int8(codes: np.ndarray, scales: np.ndarray, dtype: type = np.float16) -> np.ndarray:
    """Codes ``(..., T, D)`` int8 and scales ``(..., T)`` -> tokens ``(..., T, D)`` in ``dtype``."""
    return (codes.astype(np.float32) * scales.astype(np.float32)[..., None]).astype(dtype)


def bytes_per_item(num_tokens: int, dim: int, fmt: str = "float16") -> int:
    """Stored bytes of one item's tokens: ``float16`` (2 T D) or ``int8`` (T (D + 2))."""
    if fmt == "float16":
        return 2 * num_tokens * dim
    if fmt == "int8":
        return num_tokens * (dim + 2)
    raise ValueError(f"unknown token format {fmt!r}; expected float16 or int8")
