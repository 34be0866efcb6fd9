"""Image bytes -> RGB PIL image -> normalised tensor, with every failure typed.

Web-scale corpora hold every kind of file: palette GIFs, 16-bit PNGs, CMYK JPEGs, phone
photos stored sideways with an EXIF orientation tag, truncated downloads and
decompression bombs. Each must become either a correct RGB image or a ``DecodeError``
whose ``reason`` lands in ``rejected/``; never a crash and never a silently grey or black
image (hence ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False).
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from thinkfast.errors import DecodeError

if TYPE_CHECKING:  # torch loads on first preprocess: decoding-only processes skip its import
    import torch

logger = logging.getLogger(__name__)

# images above this many pixels are rejected before their pixels are decoded
# (below PIL's own MAX_IMAGE_PIXELS, ~89 MP, so our reason wins over PIL's warning)
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

# ImageNet statistics: what ResNet-style backbones (and their pretrained weights) expect
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# alpha is composited on white: transparent logos/drawings are drawn on white in browsers
_BACKGROUND = (255, 255, 255)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes (any format Pillow reads) to an RGB, EXIF-oriented image.

    Raises ``DecodeError`` with reason ``empty`` | ``too_large`` | ``truncated`` |
    ``corrupt`` | ``unsupported``.
    """
    if data is None or len(data) == 0:
        raise DecodeError("empty", "image has zero bytes")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # someone flipped the global; a truncated file would then decode to grey padding
        logger.warning("PIL ImageFile.LOAD_TRUNCATED_IMAGES was True; resetting it to False")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) between MAX_IMAGE_PIXELS and 2x; make that an error too.
            # (catch_warnings swaps process-global filters: fine for Ray's one-task-per-process
            # decoding; a caller decoding from many threads at once may see the filter leak.)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)))
            width, height = img.size
            if width * height > max_pixels:
                raise DecodeError("too_large", f"{width}x{height} = {width * height} pixels > limit {max_pixels}")
            img.load()
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise DecodeError("corrupt", f"not a recognised image format ({len(data)} bytes)") from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        message = str(exc) or type(exc).__name__
        reason = "truncated" if "truncat" in message.lower() or isinstance(exc, EOFError) else "corrupt"
        raise DecodeError(reason, message) from exc
    img = _apply_exif_orientation(img)
    return to_rgb(img)


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says (phones store photos sideways)."""
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError) as exc:
        # a malformed EXIF block must not cost the image; its pixels are intact
        logger.warning("ignoring unreadable EXIF orientation: %s", exc)
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha composited on white, 16-bit and float scaled, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBa", "La", "PA"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(img)).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise DecodeError("unsupported", f"cannot convert Pillow mode {mode} to RGB") from exc


def _to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a high-bit-depth single-channel image to 0..255 (PIL's convert('L') clips)."""
    arr = np.asarray(img).astype(np.float64)  # (H, W)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    elif arr.size:
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            arr = arr * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            pass
        elif lo >= 0.0 and hi <= 65535.0:
            arr = arr / 257.0
        else:
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic), then cut the central ``size`` square."""
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def preprocess_image(img: Image.Image, size: int) -> "torch.Tensor":
    """PIL image -> float32 ``(3, size, size)``: resize shorter side, centre crop, ImageNet norm."""
    import torch

    if size < 1:
        raise ValueError(f"image size must be positive, got {size}")
    img = resize_center_crop(to_rgb(img), size)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # (S, S, 3)
    pixels = pixels.permute(2, 0, 1).float().div_(255.0)  # (3, S, S)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


def denormalize(pixels: "torch.Tensor") -> "torch.Tensor":
    """Inverse of the normalisation in ``preprocess_image`` (for display): values in 0..1."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, dtype=pixels.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=pixels.dtype).view(3, 1, 1)
    return (pixels * std + mean).clamp(0.0, 1.0)
