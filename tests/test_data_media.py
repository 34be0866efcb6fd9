"""Rows to pixels: embedded bytes, url (path, file://, s3://) with retries, captions."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from thinkfast.data import media
from thinkfast.data.media import captions_of, fetch_bytes, load_pixels
from thinkfast.data.schema import CorpusColumns
from thinkfast.data.video import encode_video
from thinkfast.errors import DecodeError
from thinkfast.utils import fs as fsutil

JPG = CorpusColumns(media="jpg", captions="captions", has_split=False, has_width=False, has_height=False,
                    has_scene=False)
MP4 = CorpusColumns(media="mp4", captions="caption", has_split=False, has_width=False, has_height=False,
                    has_scene=False)
URL = CorpusColumns(media="url", captions="caption", has_split=False, has_width=False, has_height=False,
                    has_scene=False)


def png(colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, "PNG")
    return buf.getvalue()


def clip() -> bytes:
    return encode_video([np.full((32, 32, 3), 40 * i, dtype=np.uint8) for i in range(6)], fps=6)


def test_embedded_image_and_video():
    assert load_pixels({"jpg": png()}, JPG, 32).shape == (3, 32, 32)
    assert load_pixels({"mp4": clip()}, MP4, 32, num_frames=3).shape == (3, 3, 32, 32)
    with pytest.raises(DecodeError) as e:
        load_pixels({"jpg": None}, JPG, 32)
    assert e.value.reason == "missing_media"
    with pytest.raises(DecodeError) as e:
        load_pixels({"jpg": b"junk" * 9}, JPG, 32)
    assert e.value.reason == "corrupt"


def test_url_local_path_file_uri_and_video_by_extension_or_sniffing(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "b.mp4").write_bytes(clip())
    (tmp_path / "c.bin").write_bytes(clip())  # no telling extension: sniffed as mp4 ('ftyp')
    assert load_pixels({"url": str(tmp_path / "a.png")}, URL, 16).shape == (3, 16, 16)
    assert load_pixels({"url": f"file://{tmp_path}/a.png"}, URL, 16).shape == (3, 16, 16)
    assert load_pixels({"url": str(tmp_path / "b.mp4")}, URL, 16, num_frames=2).shape == (2, 3, 16, 16)
    assert load_pixels({"url": str(tmp_path / "c.bin")}, URL, 16, num_frames=2).shape == (2, 3, 16, 16)
    with pytest.raises(DecodeError) as e:
        load_pixels({"url": str(tmp_path / "missing.png")}, URL, 16)
    assert e.value.reason == "fetch_failed"
    with pytest.raises(DecodeError) as e:
        load_pixels({"url": "http://example.com/x.jpg"}, URL, 16)  # refused before any network use
    assert e.value.reason == "fetch_failed"


def test_url_on_s3(s3_bucket):
    fsutil.write_bytes(f"{s3_bucket}/img/a.png", png((0, 0, 255)))
    pixels = load_pixels({"url": f"{s3_bucket}/img/a.png"}, URL, 8)
    assert pixels.shape == (3, 8, 8) and pixels[2].mean() > pixels[0].mean()  # blue survives
    with pytest.raises(DecodeError) as e:
        fetch_bytes(f"{s3_bucket}/img/none.png", retries=0)
    assert e.value.reason == "fetch_failed"


def test_transient_errors_are_retried_then_reported(monkeypatch):
    calls = []

    def flaky(uri, endpoint=None):
        calls.append(uri)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return b"ok"

    monkeypatch.setattr(media.fsutil, "read_bytes", flaky)
    monkeypatch.setattr(media.time, "sleep", lambda s: None)
    assert fetch_bytes("s3://b/k", retries=3) == b"ok" and len(calls) == 3
    calls.clear()

    def down(uri, endpoint=None):
        calls.append(uri)
        raise TimeoutError("timed out")

    monkeypatch.setattr(media.fsutil, "read_bytes", down)
    with pytest.raises(DecodeError, match="after 3 attempts") as e:
        fetch_bytes("s3://b/k", retries=2)
    assert e.value.reason == "fetch_failed" and len(calls) == 3


def test_captions_of_both_layouts():
    assert captions_of({"captions": [" a ", "", None, "b"]}, JPG) == ["a", "b"]
    assert captions_of({"caption": "one"}, URL) == ["one"]
    assert captions_of({"caption": None}, URL) == []
