"""Vision side of both models: a ResNet (or EfficientNet-Lite) backbone and the FPN
fine-grained tokens phi(x).

The backbone is ``transformers.ResNetModel`` (no torchvision): ``output_hidden_states``
returns the stem and the four stages; stages 1..4 have strides 4/8/16/32. Any depth and
width can be configured, down to a tiny one for tests; ResNet-50 weights come from a hub id
or a local directory (``VisionConfig.pretrained``) when a model is built fresh, and from the
thinkfast checkpoint otherwise.

Fine-grained tokens (slow model): the stride-32 map (7x7 at 224 px) is too coarse for
cross-attention, so an FPN top-down path upsamples it x2 and fuses it with the next finer
stage: ``P_k = lateral_k(C_k) + up2(P_{k+1})``, then a 3x3 conv per kept level. Each kept
level's cells become tokens, with:

* a fixed 2-D sine-cosine position code of the cell *centre in normalised image coordinates*
  (so the same spot gets the same code at every level and at any image size, which is what
  lets a model trained at 64 px run at 96 px);
* a learned level embedding (which stride the token came from);
* a learned frame embedding; an image is a one-frame video (frame 0), so
  ``encode(x) == encode(x[:, None])``.

A final LayerNorm bounds the token values, which keeps their fp16 cache exact enough.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from thinkfast.errors import CheckpointError, ThinkfastError
from thinkfast.models.config import STAGE_STRIDES, VisionConfig
from thinkfast.models.freezing import FrozenStagesMixin

logger = logging.getLogger(__name__)


def check_pixels(pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Flatten images ``(B, 3, H, W)`` / videos ``(B, F, 3, H, W)`` to frames ``(B*F, 3, H, W)``.

    Returns the frames, B and F (F=1 for images). Raises ``ThinkfastError`` on any other shape,
    so a wrong tensor fails with a sentence rather than deep inside a convolution."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ThinkfastError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim == 4:
        b, f = pixel_values.shape[0], 1
        frames = pixel_values
    elif pixel_values.ndim == 5:
        b, f = pixel_values.shape[:2]
        frames = pixel_values.reshape(b * f, *pixel_values.shape[2:])
    else:
        raise ThinkfastError(f"pixel_values must be (B,3,H,W) or (B,F,3,H,W), got shape {tuple(pixel_values.shape)}")
    _, c, h, w = frames.shape
    if c != 3:
        raise ThinkfastError(f"pixel_values need 3 colour channels, got {c} (shape {tuple(pixel_values.shape)})")
    if h % 32 or w % 32 or h == 0 or w == 0:
        raise ThinkfastError(f"image height and width must be positive multiples of 32, got {h}x{w}")
    if b == 0 or f == 0:
        raise ThinkfastError(f"pixel_values is empty (shape {tuple(pixel_values.shape)})")
    return frames, b, f


class ResNetBackbone(FrozenStagesMixin):
    """ResNet feature pyramid: ``forward(frames) -> [C1, C2, C3, C4]`` at strides 4/8/16/32."""

    def __init__(self, config: VisionConfig, load_pretrained: bool = True) -> None:
        super().__init__()
        from transformers import ResNetConfig, ResNetModel

        self.config = config
        hf_config = ResNetConfig(
            num_channels=3,
            embedding_size=config.embedding_size,
            hidden_sizes=list(config.hidden_sizes),
            depths=list(config.depths),
            layer_type=config.layer_type,
            downsample_in_bottleneck=config.downsample_in_bottleneck,
        )
        self.resnet = ResNetModel(hf_config)
        self.channels = tuple(config.hidden_sizes)  # channels of C1..C4
        self.frozen_stages = config.frozen_stages
        if load_pretrained and config.pretrained:
            self._load_pretrained(config.pretrained)
        self.freeze()

    def frozen_modules(self) -> list[nn.Module]:
        """The stem and the first ``frozen_stages`` stages."""
        if self.frozen_stages == 0:
            return []
        return [self.resnet.embedder, *self.resnet.encoder.stages[: self.frozen_stages]]

    def _load_pretrained(self, name_or_path: str) -> None:
        """Copy weights of a transformers ResNet (hub id or local dir) into this backbone.
        The architecture must match exactly: a partial load would silently train from scratch."""
        from transformers import ResNetModel

        try:
            source = ResNetModel.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot load pretrained ResNet {name_or_path!r} ({exc}); offline machines need a local "
                "directory, or set vision.pretrained=None to start from random weights"
            ) from exc
        try:
            self.resnet.load_state_dict(source.state_dict(), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"pretrained ResNet {name_or_path!r} does not match vision config: {exc}") from exc
        logger.info("loaded pretrained ResNet weights from %s", name_or_path)

    def forward(self, frames: torch.Tensor) -> list[torch.Tensor]:
        out = self.resnet(frames, output_hidden_states=True, return_dict=True)
        # hidden_states = (stem, stage1, stage2, stage3, stage4)
        return list(out.hidden_states[1:])


def build_backbone(config: VisionConfig, load_pretrained: bool = True) -> nn.Module:
    """The backbone ``config.backbone`` names: ``forward(frames) -> [C1..C4]``, ``.channels``."""
    if config.backbone == "resnet":
        return ResNetBackbone(config, load_pretrained=load_pretrained)
    from thinkfast.models.efficientnet import EfficientNetBackbone

    pretrained = config.pretrained if load_pretrained else None
    return EfficientNetBackbone(config.backbone, pretrained=pretrained, frozen_stages=config.frozen_stages)


def sincos_2d(height: int, width: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed 2-D position code ``(height*width, dim)`` of cell centres in [0, 1] coordinates:
    half the channels encode y, half x, each as sin/cos at geometric frequencies."""
    quarter = dim // 4
    freqs = torch.exp(torch.arange(quarter, device=device, dtype=torch.float32) * (-math.log(1000.0) / max(quarter, 1)))
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height  # (h,)
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width  # (w,)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w)
    ay = gy.reshape(-1, 1) * freqs * (2 * math.pi * 16)  # (h*w, quarter)
    ax = gx.reshape(-1, 1) * freqs * (2 * math.pi * 16)
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)  # (h*w, dim)


class FineGrainedTokens(nn.Module):
    """FPN top-down path over backbone stages -> tokens ``(B*F, T1, D)`` for one frame each."""

    def __init__(self, in_channels: tuple[int, ...], width: int, levels: tuple[int, ...], max_frames: int) -> None:
        super().__init__()
        self.levels = tuple(sorted(levels, reverse=True))  # coarse to fine, e.g. (32, 16, 8)
        finest = min(self.levels)
        # the top-down path runs from stride 32 down to the finest kept level
        self.path = tuple(s for s in sorted(STAGE_STRIDES, reverse=True) if s >= finest)
        self.lateral = nn.ModuleDict(
            {str(s): nn.Conv2d(in_channels[STAGE_STRIDES.index(s)], width, kernel_size=1) for s in self.path}
        )
        self.smooth = nn.ModuleDict({str(s): nn.Conv2d(width, width, kernel_size=3, padding=1) for s in self.levels})
        self.level_embedding = nn.Embedding(len(self.levels), width)
        self.frame_embedding = nn.Embedding(max_frames, width)
        self.norm = nn.LayerNorm(width)
        self.width = width
        self.max_frames = max_frames
        nn.init.normal_(self.level_embedding.weight, std=0.02)
        nn.init.normal_(self.frame_embedding.weight, std=0.02)

    def forward(self, stages: list[torch.Tensor], num_frames: int) -> torch.Tensor:
        """``stages`` = [C1..C4] of ``B*F`` frames -> ``(B, F*T1, D)`` tokens, frame-major."""
        if num_frames > self.max_frames:
            raise ThinkfastError(f"video has {num_frames} frames, the model supports at most {self.max_frames}")
        level_tokens: list[torch.Tensor] = []
        top_down: torch.Tensor | None = None
        for stride in self.path:
            lateral = self.lateral[str(stride)](stages[STAGE_STRIDES.index(stride)])  # (N, D, h, w)
            if top_down is not None:
                lateral = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            top_down = lateral
            if stride in self.levels:
                level = self.levels.index(stride)
                fmap = self.smooth[str(stride)](lateral)  # (N, D, h, w)
                n, d, h, w = fmap.shape
                tokens = fmap.flatten(2).transpose(1, 2)  # (N, h*w, D)
                tokens = tokens + sincos_2d(h, w, d, fmap.device).to(tokens.dtype) + self.level_embedding.weight[level]
                level_tokens.append(tokens)
        frame_tokens = torch.cat(level_tokens, dim=1)  # (B*F, T1, D)
        nf, t1, d = frame_tokens.shape
        b = nf // num_frames
        frame_tokens = frame_tokens.reshape(b, num_frames, t1, d)
        frame_tokens = frame_tokens + self.frame_embedding.weight[:num_frames].reshape(1, num_frames, 1, d)
        return self.norm(frame_tokens.reshape(b, num_frames * t1, d))  # (B, F*T1, D)


def feature_map_side(image_side: int, stride: int) -> int:
    """Side of a stage's feature map: every stride-2 step of a ResNet rounds up."""
    side = image_side
    for _ in range(int(math.log2(stride))):
        side = (side + 1) // 2
    return side
