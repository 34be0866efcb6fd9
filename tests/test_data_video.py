"""Video decoding: uniform-in-time sampling, VFR, streams without timestamps, too few and
zero frames, broken files."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch

from thinkfast.data.video import decode_video, encode_video, preprocess_video
from thinkfast.errors import DecodeError

LEVELS = [0, 30, 60, 90, 120, 150, 180, 210]  # frame i is uniformly grey LEVELS[i]


def grey_frames(n: int = 8) -> list[np.ndarray]:
    return [np.full((32, 32, 3), LEVELS[i], dtype=np.uint8) for i in range(n)]


def level(frame) -> int:
    """Index of the source frame a decoded frame shows (nearest grey level)."""
    value = float(np.asarray(frame).mean())
    return int(np.argmin([abs(value - v) for v in LEVELS]))


def test_normal_clip_samples_uniformly_in_order():
    frames, info = decode_video(encode_video(grey_frames(), fps=8), 4)
    assert [level(f) for f in frames] == [1, 3, 5, 7]  # centres of 4 equal time bins over 1 s
    assert info.num_source_frames == 8 and info.padding == "none" and not info.variable_frame_rate
    assert info.duration_s == pytest.approx(1.0) and frames[0].size == (32, 32) and frames[0].mode == "RGB"
    assert preprocess_video(frames, 16).shape == (4, 3, 16, 16)


def test_variable_frame_rate_samples_by_time_not_index():
    times = [0.0, 0.05, 0.1, 0.15, 0.2, 1.0, 1.5, 1.9]  # dense start, sparse end
    frames, info = decode_video(encode_video(grey_frames(), times=times), 4)
    assert info.variable_frame_rate
    # targets at 0.25, 0.75, 1.25, 1.75 s: the frames on screen then are 4, 4, 5, 6
    assert [level(f) for f in frames] == [4, 4, 5, 6]
    assert info.frame_times == (0.2, 0.2, 1.0, 1.5)
    assert info.metadata_duration_s is not None  # the muxer's claim, not what sampling used
    assert info.duration_source == "timestamps"


def test_stream_without_timestamps_or_duration():
    buf = io.BytesIO()
    with av.open(buf, "w", format="h264") as c:  # raw elementary stream: no container, no pts
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i, arr in enumerate(grey_frames()):
            f = av.VideoFrame.from_ndarray(arr, format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    frames, info = decode_video(buf.getvalue(), 4)
    assert info.metadata_duration_s is None and info.duration_source == "frame_count"
    assert [level(f) for f in frames] == [1, 3, 5, 7]


def test_one_frame_repeats_or_pads_and_says_so():
    data = encode_video(grey_frames(1))
    frames, info = decode_video(data, 4)
    assert len(frames) == 4 and info.padding == "repeat" and info.num_unique == 1
    data3 = encode_video(grey_frames(3))
    frames, info = decode_video(data3, 5, pad="pad")
    assert [level(f) for f in frames] == [0, 1, 2, 2, 2] and info.padding == "pad"
    frames, info = decode_video(data3, 6)
    assert [level(f) for f in frames] == [0, 0, 1, 1, 2, 2] and info.padding == "repeat"


def test_zero_frames_is_no_frames():
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as c:  # a video stream header, then nothing
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        c.start_encoding()
    with pytest.raises(DecodeError) as e:
        decode_video(buf.getvalue(), 4)
    assert e.value.reason == "no_frames"


def test_empty_corrupt_truncated():
    with pytest.raises(DecodeError) as e:
        decode_video(b"", 4)
    assert e.value.reason == "empty"
    with pytest.raises(DecodeError) as e:
        decode_video(b"not a video at all" * 50, 4)
    assert e.value.reason == "corrupt"
    data = encode_video(grey_frames())
    with pytest.raises(DecodeError) as e:
        decode_video(data[: len(data) // 2], 4)  # mp4 cut before its index
    assert e.value.reason == "corrupt"


def test_encoder_writes_short_gop():
    frames = []
    for i in range(16):  # a small square sliding over grey: no scene cuts to force keyframes
        f = np.full((32, 32, 3), 100, dtype=np.uint8)
        f[10:16, i:i + 6] = 200
        frames.append(f)
    data = encode_video(frames, fps=8, gop_size=4)
    with av.open(io.BytesIO(data)) as c:
        keys = [i for i, p in enumerate(p for p in c.demux(c.streams.video[0]) if p.size) if p.is_keyframe]
    assert keys[0] == 0 and len(keys) >= 4
    assert max(b - a for a, b in zip(keys, keys[1:] + [16])) <= 4  # a keyframe at least every 4 frames


def test_seek_lands_near_target_thanks_to_short_gop():
    data = encode_video(grey_frames(), fps=8, gop_size=4)
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        c.seek(int(0.6 / stream.time_base), stream=stream, backward=True, any_frame=False)
        first = next(c.decode(stream))
    assert level(first.to_ndarray(format="rgb24")) == 4  # the keyframe at 0.5 s, not frame 0


def test_preprocess_video_rejects_empty():
    with pytest.raises(DecodeError):
        preprocess_video([], 8)
    assert isinstance(preprocess_video(decode_video(encode_video(grey_frames(2)), 2)[0], 8), torch.Tensor)
