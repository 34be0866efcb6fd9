"""Frozen dataclass configs for both models, and their presets.

One config object fully determines a model's architecture, so ``config.json`` plus the
weights is a complete checkpoint. Presets:

* ``tiny``: for tests (ResNet widths <= 32, 2 decoder layers, 32 px images, seconds on CPU);
* ``small``: the CPU demo (64 px, a few minutes of training on 2 cores on the generated corpus);
* ``paper``: ResNet-50 at 224 px as in Miech et al. 2021, weights from ``vision.pretrained``
  (a hub id such as ``microsoft/resnet-50`` or a local directory), MiniLM (or any BERT-style
  model) as the fast text tower.

``tiny`` and ``small`` use a word tokenizer built from the corpus, so their ``vocab_size``
is a placeholder until ``with_vocab_size`` is applied (``from_preset`` does it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from thinkfast.errors import CheckpointError, ThinkfastError

PRESETS = ("tiny", "small", "paper")

# strides of the four ResNet stages (stage1..stage4) for the standard stem (conv s2 + pool s2)
STAGE_STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class VisionConfig:
    """ResNet backbone (``transformers.ResNetModel``): the same fields as ``ResNetConfig``
    that matter for the architecture, stored explicitly so a checkpoint never needs the hub."""

    embedding_size: int = 64  # channels of the stem convolution
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)  # output channels of stage1..stage4
    depths: tuple[int, ...] = (3, 4, 6, 3)  # residual blocks per stage
    layer_type: Literal["basic", "bottleneck"] = "bottleneck"  # ResNet-18/34 vs ResNet-50 blocks
    downsample_in_bottleneck: bool = False  # stride in the 1x1 (v1) instead of the 3x3 (v1.5)
    pretrained: str | None = None  # hub id or local dir of ResNet weights loaded when built fresh

    def __post_init__(self) -> None:
        if len(self.hidden_sizes) != 4 or len(self.depths) != 4:
            raise ThinkfastError("vision.hidden_sizes and vision.depths need 4 stages (strides 4/8/16/32)")
        if self.layer_type not in ("basic", "bottleneck"):
            raise ThinkfastError(f"vision.layer_type must be basic or bottleneck, got {self.layer_type!r}")


@dataclass(frozen=True)
class TextConfig:
    """Fast text tower: bag-of-words (mean of token embeddings + MLP) or a HF transformer."""

    kind: Literal["bow", "hf"] = "bow"  # which encoder
    vocab_size: int = 0  # bow only: rows of the embedding table (= tokenizer.vocab_size)
    hidden_size: int = 256  # bow only: token embedding width and MLP output width
    mlp_hidden_size: int = 512  # bow only: MLP inner width
    hf_name_or_path: str | None = None  # hf only: hub id or local dir (weights loaded when built fresh)
    pooling: Literal["mean", "cls"] = "mean"  # hf only: masked mean of tokens, or the first token
    dropout: float = 0.0  # dropout on the pooled text feature

    def __post_init__(self) -> None:
        if self.kind not in ("bow", "hf"):
            raise ThinkfastError(f"text.kind must be bow or hf, got {self.kind!r}")
        if self.pooling not in ("mean", "cls"):
            raise ThinkfastError(f"text.pooling must be mean or cls, got {self.pooling!r}")
        if self.kind == "hf" and not self.hf_name_or_path:
            raise ThinkfastError("text.kind='hf' needs text.hf_name_or_path")


@dataclass(frozen=True)
class DecoderConfig:
    """One captioning decoder (the slow model has two: forward and backward)."""

    num_layers: int = 4  # layers of (masked self-attn -> cross-attn -> FFN)
    num_heads: int = 8  # attention heads (width must be divisible by it)
    ffn_size: int = 2048  # feed-forward inner width
    dropout: float = 0.1  # dropout in attention outputs and FFN (training only)


@dataclass(frozen=True)
class FastConfig:
    """The dual encoder f(x), g(y)."""

    vision: VisionConfig = field(default_factory=VisionConfig)  # image tower backbone
    text: TextConfig = field(default_factory=TextConfig)  # text tower
    embed_dim: int = 256  # d: the joint embedding size (what the FAISS index stores)
    image_size: int = 224  # input side in pixels (multiple of 32)
    max_text_length: int = 32  # tokens per caption (longer ones are truncated)

    def __post_init__(self) -> None:
        _check_image_size(self.image_size)


@dataclass(frozen=True)
class SlowConfig:
    """The cross-attention captioning scorer: phi(x) + forward and backward decoders."""

    vision: VisionConfig = field(default_factory=VisionConfig)  # backbone under the FPN
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # each of the two decoders
    width: int = 512  # D: FPN channels = visual token size = decoder width (divisible by 4)
    levels: tuple[int, ...] = (32, 16)  # FPN strides kept as tokens (32 -> 7x7 at 224 px, 16 -> 14x14, 8 -> 28x28)
    max_frames: int = 16  # rows of the frame (time) embedding: most frames a video may have
    vocab_size: int = 0  # decoder vocabulary (= tokenizer.vocab_size)
    image_size: int = 224  # input side in pixels (multiple of 32)
    max_text_length: int = 32  # tokens per caption (also the decoders' position table size)
    hf_tokenizer: str | None = None  # HF tokenizer used when none is passed (paper: MiniLM's); None = word vocabulary

    def __post_init__(self) -> None:
        _check_image_size(self.image_size)
        if not self.levels or any(s not in STAGE_STRIDES for s in self.levels):
            raise ThinkfastError(f"levels must be a non-empty subset of {STAGE_STRIDES}, got {self.levels}")
        if len(set(self.levels)) != len(self.levels):
            raise ThinkfastError(f"levels must not repeat, got {self.levels}")
        if self.width % 4 != 0 or self.width % self.decoder.num_heads != 0:
            raise ThinkfastError(f"width {self.width} must be divisible by 4 and by num_heads {self.decoder.num_heads}")

    @property
    def sorted_levels(self) -> tuple[int, ...]:
        """Levels coarse to fine (32, 16, 8): the token order inside each frame."""
        return tuple(sorted(self.levels, reverse=True))


def _check_image_size(size: int) -> None:
    if size <= 0 or size % 32 != 0:
        raise ThinkfastError(f"image_size must be a positive multiple of 32, got {size}")


# ---------------------------------------------------------------- presets

_TINY_VISION = VisionConfig(embedding_size=8, hidden_sizes=(8, 16, 16, 32), depths=(1, 1, 1, 1), layer_type="basic")
_SMALL_VISION = VisionConfig(embedding_size=16, hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1), layer_type="basic")
# ResNet-50 exactly as microsoft/resnet-50 (v1.5: stride in the 3x3 conv)
_PAPER_VISION = VisionConfig(pretrained="microsoft/resnet-50")


def fast_preset(name: str) -> FastConfig:
    """The FastConfig of a preset (``vocab_size`` of a bow tower still to be set)."""
    if name == "tiny":
        return FastConfig(vision=_TINY_VISION, text=TextConfig(kind="bow", hidden_size=32, mlp_hidden_size=32),
                          embed_dim=32, image_size=32, max_text_length=32)
    if name == "small":
        return FastConfig(vision=_SMALL_VISION, text=TextConfig(kind="bow", hidden_size=128, mlp_hidden_size=256),
                          embed_dim=128, image_size=64, max_text_length=32)
    if name == "paper":
        from thinkfast.data.tokenizer import minilm_path

        return FastConfig(vision=_PAPER_VISION, text=TextConfig(kind="hf", hf_name_or_path=minilm_path(), pooling="mean"),
                          embed_dim=256, image_size=224, max_text_length=32)
    raise ThinkfastError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def slow_preset(name: str) -> SlowConfig:
    """The SlowConfig of a preset (``vocab_size`` still to be set from the tokenizer)."""
    if name == "tiny":
        return SlowConfig(vision=_TINY_VISION, decoder=DecoderConfig(num_layers=2, num_heads=2, ffn_size=64, dropout=0.0),
                          width=32, levels=(32, 16, 8), max_frames=8, image_size=32, max_text_length=32)
    if name == "small":
        return SlowConfig(vision=_SMALL_VISION, decoder=DecoderConfig(num_layers=2, num_heads=4, ffn_size=256, dropout=0.1),
                          width=64, levels=(32, 16, 8), max_frames=16, image_size=64, max_text_length=32)
    if name == "paper":
        from thinkfast.data.tokenizer import minilm_path

        return SlowConfig(vision=_PAPER_VISION, decoder=DecoderConfig(num_layers=4, num_heads=8, ffn_size=2048, dropout=0.1),
                          width=512, levels=(32, 16), max_frames=16, image_size=224, max_text_length=32,
                          hf_tokenizer=minilm_path())
    raise ThinkfastError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


# ---------------------------------------------------------------- (de)serialisation

_NESTED = {"vision": VisionConfig, "text": TextConfig, "decoder": DecoderConfig}


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config; unknown keys are an error so a newer checkpoint is not
    silently misread by older code. Missing keys take their defaults."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise CheckpointError(f"unknown {cls.__name__} fields {unknown} (checkpoint from a newer thinkfast?)")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in _NESTED:
            value = config_from_dict(_NESTED[key], value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ThinkfastError) as exc:
        raise CheckpointError(f"invalid {cls.__name__} in checkpoint: {exc}") from exc
