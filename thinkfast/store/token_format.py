"""The record formats of the token store: how one item's ``(T, D)`` tokens become bytes.

``float16``: ``T*D`` float16, row-major, ``2TD`` bytes. ``int8``: ``T*D`` int8 codes then
``T`` float16 per-token scales (:mod:`thinkfast.store.quantize`), ``T(D+2)`` bytes. Records
are fixed-size, so a shard is an array of them and K records are one gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from thinkfast.store.errors import StoreError
from thinkfast.store.quantize import dequantize_int8, quantize_int8

TOKEN_DTYPE = np.float16
TOKEN_FORMATS = ("float16", "int8")
_DATA_SUFFIX = {"float16": ".f16", "int8": ".i8"}


def check_token_format(token_format: str) -> str:
    if token_format not in TOKEN_FORMATS:
        raise StoreError(f"unknown token format {token_format!r}; expected one of {', '.join(TOKEN_FORMATS)}")
    return token_format


@dataclass(frozen=True)
class TokenShape:
    """Shape of one record: ``T`` visual tokens of width ``D`` in ``token_format``."""

    num_tokens: int  # T: tokens per item (all levels, all frames)
    dim: int  # D: token width
    token_format: str = "float16"  # "float16" | "int8"

    @property
    def record_bytes(self) -> int:
        if self.token_format == "int8":
            return self.num_tokens * (self.dim + np.dtype(np.float16).itemsize)
        return self.num_tokens * self.dim * np.dtype(TOKEN_DTYPE).itemsize

    @property
    def data_suffix(self) -> str:
        return _DATA_SUFFIX[self.token_format]

    def encode(self, tokens: np.ndarray) -> bytes:
        """``(B, T, D)`` float16 -> ``B`` records of this format, concatenated."""
        if self.token_format == "float16":
            return np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes()
        codes, scales = quantize_int8(tokens)  # (B, T, D) int8, (B, T) float16
        b = tokens.shape[0]
        return np.concatenate([codes.reshape(b, -1).view(np.uint8), scales.reshape(b, -1).view(np.uint8)],
                              axis=1).tobytes()

    def decode(self, records: np.ndarray, out: np.ndarray) -> None:
        """``(K, record_bytes)`` uint8 records -> ``out`` ``(K, T, D)`` float16."""
        t, d = self.num_tokens, self.dim
        if self.token_format == "float16":
            out[...] = records.view(TOKEN_DTYPE).reshape(-1, t, d)
            return
        codes = np.ascontiguousarray(records[:, : t * d]).view(np.int8).reshape(-1, t, d)
        scales = np.ascontiguousarray(records[:, t * d:]).view(np.float16).reshape(-1, t)
        out[...] = dequantize_int8(codes, scales, TOKEN_DTYPE)


__all__ = ["TOKEN_DTYPE", "TOKEN_FORMATS", "TokenShape", "check_token_format"]
