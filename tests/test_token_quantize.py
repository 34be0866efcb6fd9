"""int8 tokens with per-token scales: the formula on a hand-computed token, the error bound
on LayerNorm-like tokens, exact zeros, and the byte count."""

from __future__ import annotations

import numpy as np
import pytest

from thinkfast.store.quantize import bytes_per_item, dequantize_int8, quantize_int8


def test_hand_computed_token() -> None:
    token = np.array([[[0.5, -1.27, 0.0, 1.0]]], dtype=np.float16)  # absmax 1.27 -> scale 0.01
    codes, scales = quantize_int8(token)
    assert scales.dtype == np.float16 and codes.dtype == np.int8
    values = token.astype(np.float32)[0, 0]  # what float16 holds: -1.27 is -1.2695...
    scale = float(np.float16(abs(values[1]) / 127))
    assert float(scales[0, 0]) == scale and abs(scale - 0.01) < 1e-4
    np.testing.assert_array_equal(codes[0, 0], np.rint(values / np.float32(scale)).astype(np.int8))
    assert codes[0, 0, 1] == -127


def test_error_is_within_half_a_step_and_zeros_stay_zero() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 84, 256)).astype(np.float32)
    x = ((x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)).astype(np.float16)  # LayerNorm-like
    x[3, 5] = 0.0
    codes, scales = quantize_int8(x)
    back = dequantize_int8(codes, scales, np.float32)
    step = scales.astype(np.float32)[..., None]
    err = np.abs(back - x.astype(np.float32))
    assert (err <= step / 2 + 1e-3 * step + 1e-7).all()
    assert (back[3, 5] == 0).all() and scales[3, 5] == 0
    cos = (back * x).sum(-1) / (np.linalg.norm(back, axis=-1) * np.linalg.norm(x.astype(np.float32), axis=-1) + 1e-9)
    assert cos[np.arange(50) != 3].min() > 0.999  # direction barely moves


def test_bytes() -> None:
    assert bytes_per_item(84, 256) == 43008
    assert bytes_per_item(84, 256, "int8") == 84 * 258
    with pytest.raises(ValueError):
        bytes_per_item(1, 1, "int4")
