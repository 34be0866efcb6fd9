"""Pixels of generated scenes: background, shapes, noise, and the encoded bytes.

Drawing is plain Pillow + numpy (about a millisecond per 64 px image). Shapes are drawn
without anti-aliasing so that the colour at an object's centre is its palette colour plus
noise, which the tests check. JPEG is written at quality 95 with 4:4:4 chroma: the default
4:2:0 subsampling would smear a 6 px shape's colour into the background.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from thinkfast.data.synth_scene import Background, Obj, Scene
from thinkfast.data.video import encode_video

_JPEG_QUALITY = 95
# noise comes from slices of one fixed bank of N(0, 1) samples: drawing fresh Gaussians
# cost more than drawing and encoding the image; neighbouring images sharing bits of a
# 4M-sample bank at random offsets is irrelevant to any model
_NOISE_BANK_SIZE = 1 << 22


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    return np.random.default_rng(0x0015E).standard_normal(_NOISE_BANK_SIZE, dtype=np.float32)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return ys, xs


def render_background(bg: Background, size: int) -> np.ndarray:
    """The backdrop as float32 ``(S, S, 3)``."""
    c0 = np.asarray(bg.colours[0], dtype=np.float32)
    c1 = np.asarray(bg.colours[1], dtype=np.float32)
    if bg.kind == "plain":
        return np.broadcast_to(c0, (size, size, 3)).copy()
    ys, xs = _grid(size)
    if bg.kind == "gradient":
        t = {"horizontal": xs, "vertical": ys, "diagonal": (xs + ys) / 2}[bg.direction] / max(size - 1, 1)
        return c0 + (c1 - c0) * t[..., None]
    if bg.kind == "checker":
        mask = ((xs // bg.cell + ys // bg.cell) % 2)[..., None]
        return c0 + (c1 - c0) * mask
    raise ValueError(f"unknown background kind {bg.kind!r}")


def _polygon(obj: Obj, centre: tuple[float, float]) -> list[tuple[float, float]]:
    """Vertices of a non-circular shape, rotated by its angle about its centre."""
    r = obj.radius
    if obj.shape == "square":
        h = 0.8 * r
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif obj.shape == "triangle":
        pts = [(0.0, -r), (r, 0.75 * r), (-r, 0.75 * r)]
    elif obj.shape == "diamond":
        pts = [(0.0, -r), (r, 0.0), (0.0, r), (-r, 0.0)]
    elif obj.shape == "cross":
        t = max(0.35 * r, 1.5)
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    a = math.radians(obj.angle)
    ca, sa = math.cos(a), math.sin(a)
    cx, cy = centre
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def draw_objects(canvas: Image.Image, objects: tuple[Obj, ...], frame: int = 0) -> None:
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        cx, cy = obj.track[min(frame, len(obj.track) - 1)]
        if obj.shape == "circle":
            r = obj.radius
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=obj.rgb)
        else:
            draw.polygon(_polygon(obj, (cx, cy)), fill=obj.rgb)


def render_frames(scene: Scene) -> list[np.ndarray]:
    """uint8 ``(S, S, 3)`` per frame: background, shapes, then fresh noise on every pixel."""
    base = Image.fromarray(np.clip(render_background(scene.background, scene.size), 0, 255).astype(np.uint8))
    noise_rng = np.random.default_rng(scene.background.noise_seed)
    bank = _noise_bank()
    n = scene.size * scene.size * 3
    frames = []
    for f in range(scene.num_frames):
        canvas = base.copy()
        draw_objects(canvas, scene.objects, f)
        pixels = np.asarray(canvas, dtype=np.float32)  # (S, S, 3)
        offset = int(noise_rng.integers(_NOISE_BANK_SIZE - n))
        noise = bank[offset:offset + n].reshape(pixels.shape) * scene.background.noise
        frames.append(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    return frames


def encode_image(pixels: np.ndarray, fmt: str = "jpeg") -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(pixels)
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    elif fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        raise ValueError(f"image format must be 'jpeg' or 'png', got {fmt!r}")
    return buf.getvalue()


def encode_clip(frames: list[np.ndarray], fps: float) -> bytes:
    """H.264 mp4 with a keyframe every 4 frames, so a decoder can seek into the clip."""
    return encode_video(frames, fps=fps, gop_size=4)
