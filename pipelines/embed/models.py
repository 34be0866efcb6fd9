"""The models an embed run uses, probed once on the driver: a bad checkpoint fails before
any worker starts, and one forward pass on zeros gives the exact output shapes the
manifest records (and that an incremental run must match)."""

from __future__ import annotations

from dataclasses import dataclass

from thinkfast.store.layout import FastModelRecord, SlowModelRecord
from thinkfast_pipelines.embed.config import EmbedConfig, EmbedError

DEFAULT_NUM_FRAMES = 8


@dataclass(frozen=True)
class ModelInfo:
    """Identity and output shapes of the models, probed once on the driver."""

    image_size: int  # input side both models share
    num_frames: int  # frames per video the decoder samples
    fast: FastModelRecord | None
    slow: SlowModelRecord | None


def probe_models(fast: str | None, slow: str | None, media: str, config: EmbedConfig) -> ModelInfo:
    """Load each model once on the driver: a bad checkpoint fails here, and one forward
    pass on zeros gives the exact output shapes for the manifest."""
    import torch

    fast_model = slow_model = None
    if fast:
        from thinkfast.models.fast import FastModel

        fast_model = FastModel.from_pretrained(fast).eval()
    if slow:
        from thinkfast.models.slow import SlowModel

        slow_model = SlowModel.from_pretrained(slow).eval()
    sizes = {m.config.image_size for m in (fast_model, slow_model) if m is not None}
    if len(sizes) != 1:
        raise EmbedError(
            f"the fast and slow models expect different image sizes {sorted(sizes)}; "
            "run embed once with --fast and once with --slow"
        )
    image_size = sizes.pop()
    num_frames = config.num_frames or DEFAULT_NUM_FRAMES
    if slow_model is not None and num_frames > slow_model.config.max_frames:
        if config.num_frames:
            raise EmbedError(f"--frames {num_frames} exceeds the slow model's max_frames {slow_model.config.max_frames}")
        num_frames = slow_model.config.max_frames
    shape = (1, num_frames, 3, image_size, image_size) if media == "mp4" else (1, 3, image_size, image_size)
    pixels = torch.zeros(shape)
    info_fast = info_slow = None
    with torch.inference_mode():
        if fast_model is not None:
            dim = int(fast_model.encode_image(pixels).shape[-1])
            info_fast = FastModelRecord(uri=str(fast), identity=fast_model.identity, dim=dim)
        if slow_model is not None:
            _, t, d = slow_model.encode_visual(pixels).shape
            info_slow = SlowModelRecord(uri=str(slow), identity=slow_model.identity, num_tokens=int(t), dim=int(d))
    return ModelInfo(image_size=image_size, num_frames=num_frames, fast=info_fast, slow=info_slow)


__all__ = ["DEFAULT_NUM_FRAMES", "ModelInfo", "probe_models"]
