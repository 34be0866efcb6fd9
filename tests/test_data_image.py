"""Image decoding: every Pillow mode to the right RGB, EXIF orientation, typed failures."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from thinkfast.data.image import IMAGENET_MEAN, IMAGENET_STD, decode_image, denormalize, preprocess_image
from thinkfast.errors import DecodeError


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def rgb_at(img: Image.Image, xy=(2, 2)) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def close(a, b, tol=3) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def test_grey_and_bilevel_modes():
    assert rgb_at(decode_image(encode(Image.new("L", (8, 8), 100)))) == (100, 100, 100)
    assert rgb_at(decode_image(encode(Image.new("1", (8, 8), 1)))) == (255, 255, 255)


def test_palette_with_and_without_transparency():
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    assert rgb_at(decode_image(encode(p))) == (255, 0, 0)
    p.info["transparency"] = 1  # index 1 fully transparent -> composited on white
    assert rgb_at(decode_image(encode(p, transparency=1))) == (255, 255, 255)


def test_alpha_modes_composite_on_white():
    half_red = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    assert close(rgb_at(decode_image(encode(half_red))), (255, 127, 127), tol=2)
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert rgb_at(decode_image(encode(clear))) == (255, 255, 255)  # not black
    la = Image.new("LA", (8, 8), (0, 255))
    assert rgb_at(decode_image(encode(la))) == (0, 0, 0)


def test_cmyk():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in naive CMYK
    out = decode_image(encode(cmyk, "JPEG", quality=95))
    r, g, b = rgb_at(out)
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    img16 = Image.fromarray(arr)
    data = encode(img16)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    r, g, b = rgb_at(decode_image(data))
    assert r == g == b and 120 <= r <= 135  # 32768/65535 of white; PIL's convert would give 255


def test_float_and_int32_modes():
    f = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32))
    assert close(rgb_at(decode_image(encode(f, "TIFF"))), (128, 128, 128), tol=1)
    i = Image.fromarray(np.full((8, 8), 200, dtype=np.int32))
    assert rgb_at(decode_image(encode(i, "TIFF"))) == (200, 200, 200)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    out = decode_image(encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (20, 40)
    assert close(out.getpixel((10, 5)), (255, 0, 0), tol=40)  # left half went to the top
    assert close(out.getpixel((10, 35)), (0, 0, 255), tol=40)


def test_empty_corrupt_truncated():
    with pytest.raises(DecodeError) as e:
        decode_image(b"")
    assert e.value.reason == "empty"
    with pytest.raises(DecodeError) as e:
        decode_image(b"definitely not an image" * 10)
    assert e.value.reason == "corrupt"
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for fmt in ("JPEG", "PNG"):
        data = encode(noisy, fmt)
        with pytest.raises(DecodeError) as e:
            decode_image(data[: len(data) // 2])
        assert e.value.reason == "truncated", (fmt, e.value)


def test_truncated_stays_an_error_even_if_someone_flips_pil_global(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(DecodeError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_pixel_limit_and_pil_bomb_guard(monkeypatch):
    data = encode(Image.new("RGB", (40, 40)))
    with pytest.raises(DecodeError) as e:
        decode_image(data, max_pixels=40 * 40 - 1)
    assert e.value.reason == "too_large"
    assert decode_image(data, max_pixels=40 * 40).size == (40, 40)
    # PIL's own guard: a warning between MAX_IMAGE_PIXELS and 2x, an error above
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 50):  # 1600 px (warning zone), 2500 px (error zone)
        with pytest.raises(DecodeError) as e:
            decode_image(encode(Image.new("RGB", (side, side))), max_pixels=10**9)
        assert e.value.reason == "too_large"


def test_preprocess_resizes_crops_and_normalises():
    img = Image.new("RGB", (96, 32), (0, 255, 0))
    img.paste((255, 0, 0), (0, 0, 32, 32))
    img.paste((0, 0, 255), (64, 0, 96, 32))
    x = preprocess_image(img, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    pixels = denormalize(x)  # centre crop keeps only the green third
    assert torch.allclose(pixels[:, 4:12, 4:12].mean(dim=(1, 2)), torch.tensor([0.0, 1.0, 0.0]), atol=0.02)
    grey = preprocess_image(Image.new("L", (20, 30), 255), 8)
    expected = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(grey.mean(dim=(1, 2)), expected, atol=1e-4)
