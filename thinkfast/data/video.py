"""Video bytes -> ``F`` frames sampled uniformly in *time*, with PyAV; and the mp4 encoder
the generated corpus uses.

Container metadata cannot be trusted: streams may carry no duration, a wrong one (the mp4
muxer reports less than the real span for variable-frame-rate clips, measured here), or
timestamps that are irregular. So the clip's span comes from the packets themselves (a
cheap demux pass, no decoding), ``F`` target times are spread uniformly over it, and the
decode pass keeps, for each target, the frame on screen at that time. Only the chosen
frames are converted to images, so long clips never sit in memory.

Too few frames: ``pad="repeat"`` (default) keeps time-uniform sampling, so frames repeat
where the clip has gaps; ``pad="pad"`` uses every frame once, in order, then repeats the
last one. ``VideoInfo.padding`` says which happened. Zero frames -> ``DecodeError("no_frames")``.
"""

from __future__ import annotations

import bisect
import io
import logging
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
from PIL import Image

from thinkfast.data.image import preprocess_image
from thinkfast.errors import DecodeError

if TYPE_CHECKING:  # torch loads on first preprocess, not for decoding or encoding
    import torch

logger = logging.getLogger(__name__)

PadMode = Literal["repeat", "pad"]

# fall-back frame interval when a stream carries no rate at all (25 fps, PAL)
_DEFAULT_FRAME_S = 1.0 / 25.0


@dataclass(frozen=True)
class VideoInfo:
    """What decoding found and did; goes into logs and the ``rejected/`` detail."""

    num_frames: int  # frames returned (= requested F)
    num_source_frames: int  # frames in the stream (packets with data)
    num_unique: int  # distinct source frames among the returned ones
    duration_s: float  # span covered by the frames' timestamps (or count / fps)
    duration_source: str  # "timestamps" (from packets) or "frame_count" (no timestamps)
    metadata_duration_s: float | None  # what the container claimed, None if nothing
    fps: float  # source frames / duration
    variable_frame_rate: bool  # frame intervals differ by more than 10 %
    padding: str  # "none" | "repeat" | "pad": how a shortfall of frames was filled
    width: int
    height: int
    frame_times: tuple[float, ...] = field(default=())  # source time (s) of each returned frame
    warnings: tuple[str, ...] = field(default=())  # recoverable problems met while decoding


def decode_video(data: bytes, num_frames: int, pad: PadMode = "repeat") -> tuple[list[Image.Image], VideoInfo]:
    """Decode encoded video bytes to ``num_frames`` RGB images sampled uniformly over time.

    Raises ``DecodeError`` with reason ``empty`` | ``corrupt`` | ``no_video_stream`` | ``no_frames``.
    """
    import av

    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if pad not in ("repeat", "pad"):
        raise ValueError(f"pad must be 'repeat' or 'pad', got {pad!r}")
    if data is None or len(data) == 0:
        raise DecodeError("empty", "video has zero bytes")
    data = bytes(data)

    times, metadata_duration, rate = _scan_packets(av, data)
    if not times:
        raise DecodeError("no_frames", "the video stream holds no frames")
    timed = all(t is not None for t in times)
    if timed:
        times_sorted = sorted(float(t) for t in times)  # presentation order
        intervals = np.diff(times_sorted) if len(times_sorted) > 1 else np.array([])
        step = float(np.median(intervals)) if intervals.size else (1.0 / rate if rate else _DEFAULT_FRAME_S)
        start = times_sorted[0]
        span = times_sorted[-1] - start + step
        vfr = bool(intervals.size > 1 and (intervals.max() - intervals.min()) > 0.1 * max(step, 1e-9))
        source = "timestamps"
    else:
        # no timestamps at all: frames are evenly spaced by definition
        step = 1.0 / rate if rate else _DEFAULT_FRAME_S
        times_sorted = [i * step for i in range(len(times))]
        start, span, vfr, source = 0.0, len(times) * step, False, "frame_count"

    chosen_idx, padding = _choose(times_sorted, start, span, num_frames, pad)
    wanted = set(chosen_idx)
    frames_by_idx, warnings, size = _decode_selected(av, data, wanted, timed, times_sorted)
    if not frames_by_idx:
        raise DecodeError("no_frames", "no frame of the video stream could be decoded")
    missing = wanted - set(frames_by_idx)
    if missing:
        # packets that did not decode: substitute the nearest decoded frame and say so
        warnings.append(f"{len(missing)} selected frames did not decode; nearest decoded frames used")
        have = sorted(frames_by_idx)
        for m in missing:
            frames_by_idx[m] = frames_by_idx[min(have, key=lambda h: abs(h - m))]
        if padding == "none":
            padding = "repeat"
    frames = [frames_by_idx[i] for i in chosen_idx]
    info = VideoInfo(
        num_frames=len(frames),
        num_source_frames=len(times),
        num_unique=len(set(chosen_idx) - missing) if missing else len(set(chosen_idx)),
        duration_s=float(span),
        duration_source=source,
        metadata_duration_s=metadata_duration,
        fps=float(len(times) / span) if span > 0 else 0.0,
        variable_frame_rate=vfr,
        padding=padding,
        width=size[0],
        height=size[1],
        frame_times=tuple(round(times_sorted[i], 6) for i in chosen_idx),
        warnings=tuple(warnings),
    )
    if padding != "none":
        logger.debug("video has %d frames < %d requested: %s", len(times), num_frames, padding)
    return frames, info


def _scan_packets(av, data: bytes) -> tuple[list[float | None], float | None, float | None]:
    """Demux only: each video packet's presentation time (s), the metadata duration, the rate."""
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.error.FFmpegError as exc:
        raise DecodeError("corrupt", f"cannot open video container: {exc}") from exc
    with container:
        if not container.streams.video:
            if not container.streams:  # e.g. an mp4 cut before its moov atom
                raise DecodeError("corrupt", "the container holds no streams (truncated or damaged file)")
            raise DecodeError("no_video_stream", "the container has no video stream")
        stream = container.streams.video[0]
        metadata = None
        if stream.duration is not None and stream.time_base is not None:
            metadata = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            metadata = float(container.duration) / 1_000_000.0  # AV_TIME_BASE
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        times: list[float | None] = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packet demux() ends with
                    continue
                if packet.pts is None or packet.time_base is None:
                    times.append(None)
                else:
                    times.append(float(packet.pts * packet.time_base))
        except av.error.FFmpegError as exc:
            if not times:
                raise DecodeError("corrupt", f"cannot read video packets: {exc}") from exc
            logger.warning("video packets unreadable after %d frames: %s", len(times), exc)
    return times, metadata, float(rate) if rate else None


def _choose(times: list[float], start: float, span: float, num_frames: int, pad: PadMode) -> tuple[list[int], str]:
    """Index (into ``times``, sorted) of the frame shown at each of ``num_frames`` uniform times."""
    n = len(times)
    if pad == "pad" and n < num_frames:
        return list(range(n)) + [n - 1] * (num_frames - n), "pad"
    targets = [start + (i + 0.5) * span / num_frames for i in range(num_frames)]
    # the frame on screen at time t is the last one that started at or before t
    chosen = [max(bisect.bisect_right(times, t + 1e-9) - 1, 0) for t in targets]
    padding = "repeat" if len(set(chosen)) < num_frames else "none"
    return chosen, padding


def _decode_selected(
    av, data: bytes, wanted: set[int], timed: bool, times_sorted: list[float]
) -> tuple[dict[int, Image.Image], list[str], tuple[int, int]]:
    """Decode forward, converting only the frames whose index is in ``wanted``."""
    frames: dict[int, Image.Image] = {}
    warnings: list[str] = []
    size = (0, 0)
    position = {round(t, 6): i for i, t in enumerate(times_sorted)} if timed else {}
    container = av.open(io.BytesIO(data), mode="r")
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        decoded = 0
        try:
            for frame in container.decode(stream):
                if timed and frame.time is not None:
                    idx = position.get(round(float(frame.time), 6))
                    if idx is None:  # a timestamp the demuxer did not report: nearest one
                        idx = min(range(len(times_sorted)), key=lambda i: abs(times_sorted[i] - frame.time))
                else:
                    idx = decoded
                decoded += 1
                size = (frame.width, frame.height)
                if idx in wanted and idx not in frames:
                    frames[idx] = frame.to_image().convert("RGB")
                if len(frames) == len(wanted):
                    break
        except av.error.FFmpegError as exc:
            if not frames:
                raise DecodeError("corrupt", f"video frames do not decode: {exc}") from exc
            warnings.append(f"decoding stopped after {decoded} frames: {exc}")
            logger.warning("video decoding stopped after %d frames: %s", decoded, exc)
    return frames, warnings, size


def preprocess_video(frames: Sequence[Image.Image], size: int) -> "torch.Tensor":
    """Frames -> float32 ``(F, 3, size, size)``, each as ``preprocess_image`` makes it."""
    import torch

    if not frames:
        raise DecodeError("no_frames", "no frames to preprocess")
    return torch.stack([preprocess_image(f, size) for f in frames])  # (F, 3, S, S)


def encode_video(
    frames: Sequence[np.ndarray | Image.Image],
    fps: float = 8.0,
    gop_size: int = 4,
    times: Sequence[float] | None = None,
    crf: int = 18,
) -> bytes:
    """Encode RGB frames (H, W, 3 uint8 arrays or PIL images) as H.264 mp4 bytes.

    A short GOP (``gop_size`` frames between keyframes) keeps seeking cheap; libx264's
    default would give a short clip a single keyframe. ``times`` (seconds, increasing)
    gives each frame its own timestamp: a variable-frame-rate clip.
    """
    import av

    if not frames:
        raise ValueError("cannot encode a video of zero frames")
    if times is not None and len(times) != len(frames):
        raise ValueError(f"{len(times)} timestamps for {len(frames)} frames")
    first = np.asarray(frames[0])
    height, width = first.shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    time_base = Fraction(1, 1000)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = time_base
        stream.codec_context.gop_size = gop_size
        stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency"}
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.asarray(frame, dtype=np.uint8)),
                                                     format="rgb24")
            t = times[i] if times is not None else i / fps
            video_frame.pts = int(round(t * 1000))
            video_frame.time_base = time_base
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
