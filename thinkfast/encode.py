"""Batched, gradient-free model passes that return numpy: what indexing, evaluation,
validation and the service all need from a model, written once.

Shapes: ``text_vectors`` (N, d) float32; ``image_vectors`` (N, d) float32;
``visual_tokens`` (N, T, D) float16 (the token store's precision).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def batches(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` covering ``range(n)``."""
    return [slice(i, min(i + size, n)) for i in range(0, n, max(1, size))]


def text_vectors(fast: Any, texts: Sequence[str], batch_size: int = 256, device: Any = None) -> np.ndarray:
    """``g(y)`` of each text, L2-normalised, (N, d) float32."""
    import torch

    out = []
    with torch.inference_mode():
        for s in batches(len(texts), batch_size):
            tok = fast.tokenize(list(texts[s]))
            ids, mask = tok["input_ids"], tok["attention_mask"]
            if device is not None:
                ids, mask = ids.to(device), mask.to(device)
            out.append(fast.encode_text(ids, mask).float().cpu().numpy())
    if not out:
        return np.zeros((0, int(getattr(fast.config, "embed_dim", 0))), np.float32)
    return np.concatenate(out)


def image_vectors(fast: Any, pixels: Any, batch_size: int = 64) -> np.ndarray:
    """``f(x)`` of each image or video in ``pixels`` ((N,3,H,W) or (N,F,3,H,W)), (N, d) float32."""
    import torch

    with torch.inference_mode():
        out = [fast.encode_image(pixels[s]).float().cpu().numpy() for s in batches(len(pixels), batch_size)]
    return np.concatenate(out)


def visual_tokens(slow: Any, pixels: Any, batch_size: int = 32) -> np.ndarray:
    """``φ(x)`` of each image or video, (N, T, D) float16."""
    import torch

    with torch.inference_mode():
        out = [slow.encode_visual(pixels[s]).to(torch.float16).cpu().numpy() for s in batches(len(pixels), batch_size)]
    return np.concatenate(out)
