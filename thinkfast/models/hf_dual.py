"""A Hugging Face CLIP or SigLIP checkpoint as thinkfast's fast model.

People who search photos start from CLIP-family models, so wherever thinkfast takes a
fast model (embed, index, eval, serve, distillation's student) it also takes a hub id
such as ``openai/clip-vit-base-patch32`` or a local directory of one. ``HFDualEncoder``
keeps ``FastModel``'s contract: ``tokenize`` / ``encode_image`` / ``encode_text`` (both
L2-normalised, ``(B, d)``), ``forward`` returning both, ``identity``, ``save_pretrained``
and ``from_pretrained``.

The checkpoint's own preprocessing is applied *inside* ``encode_image``. thinkfast's
decoders hand every model the same tensor (ImageNet mean/std normalised, side
``config.image_size``, which here is the checkpoint's crop size), so the encoder undoes
that normalisation and applies the checkpoint's mean/std (CLIP's, or SigLIP's 0.5/0.5).
Texts use the checkpoint's tokenizer with its training padding: SigLIP pools the last
position, so it pads to ``max_length`` as it was trained; CLIP pads to the longest text.

A video is the mean of its frame embeddings before normalisation, as in ``FastModel``.

As a student (``train-fast`` / ``distill --init``) the trainers call the same
``tokenize`` / ``encode_*`` on thinkfast's decoded batches and update every weight except
the checkpoint's own ``logit_scale`` / ``logit_bias`` (the objectives bring their own
temperature); ``save_pretrained`` then writes the trained model in the checkpoint's layout,
and ``identity`` (a hash of the weights) tells it from the checkpoint it started from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from thinkfast.errors import CheckpointError, ThinkfastError
from thinkfast.models.vision import check_pixels

logger = logging.getLogger(__name__)

SUPPORTED_TYPES = ("clip", "siglip")
PREPROCESSOR_FILE = "preprocessor_config.json"
# used when a checkpoint ships no preprocessor_config.json
DEFAULT_MEAN_STD = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class HFDualConfig:
    """What thinkfast needs to know about a CLIP-family checkpoint, read from its files."""

    source: str  # hub id or directory it was loaded from
    model_type: str  # "clip" | "siglip"
    embed_dim: int  # d of both embeddings
    image_size: int  # the checkpoint's input side; thinkfast's decoders resize to it
    max_text_length: int  # the text tower's positions
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    pad_to_max_length: bool  # SigLIP: pad every text to max_text_length (its pooling reads the last position)


def is_hf_dual_checkpoint(name_or_path: str) -> bool:
    """True when ``name_or_path`` is a local directory holding a CLIP/SigLIP ``config.json``
    (not a thinkfast one). Hub ids are recognised by the caller (no network here)."""
    path = os.path.join(str(name_or_path), "config.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and payload.get("model_type") in SUPPORTED_TYPES and "thinkfast_model" not in payload


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hf_dual_reference(ref: str, s3_endpoint: str | None = None) -> bool:
    """True when ``ref`` names a CLIP/SigLIP checkpoint rather than a thinkfast one: a local
    or ``s3://`` directory whose ``config.json`` has such a ``model_type``, or a hub id
    (``org/name``) that is not a local path. Reads at most one small file."""
    from thinkfast.utils import fs

    ref = str(ref)
    if fs.is_s3(ref):
        try:
            with fs.fsspec_fs(ref, s3_endpoint).open(fs.strip_scheme(fs.join(ref, "config.json")), "rb") as f:
                payload = json.loads(f.read(1 << 20))
        except (OSError, ValueError):
            return False  # let the thinkfast loader report what is wrong
        return isinstance(payload, dict) and payload.get("model_type") in SUPPORTED_TYPES \
            and "thinkfast_model" not in payload
    local = fs.strip_scheme(ref)
    if os.path.exists(local):
        return is_hf_dual_checkpoint(local)
    return bool(_HUB_ID.match(ref)) and not ref.startswith(("file://", ".", "~"))


def _read_preprocessor(name_or_path: str) -> dict[str, Any]:
    """``preprocessor_config.json`` of a directory or hub id (cached), or ``{}``."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, PREPROCESSOR_FILE)
    else:
        from transformers.utils import cached_file

        path = cached_file(name_or_path, PREPROCESSOR_FILE, _raise_exceptions_for_missing_entries=False)
    if not path or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_hf_dual_config(name_or_path: str) -> HFDualConfig:
    """The :class:`HFDualConfig` of a checkpoint (hub id, local or ``s3://`` directory) from
    its two small JSON files, without its weights: what a trainer needs before any worker
    starts (the side its data path decodes to, and that it is a dual encoder at all)."""
    from thinkfast.utils import fs

    if not fs.is_s3(name_or_path):
        local = fs.strip_scheme(name_or_path) if str(name_or_path).startswith("file://") else name_or_path
        return _describe(local, origin=name_or_path)
    with tempfile.TemporaryDirectory(prefix="thinkfast-hf-config-") as tmp:
        for name in ("config.json", PREPROCESSOR_FILE):
            uri = fs.join(name_or_path, name)
            try:
                if name == "config.json" or fs.exists(uri):
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(fs.read_bytes(uri))
            except OSError as exc:
                raise CheckpointError(f"cannot read {uri}: {exc}") from exc
        return _describe(tmp, origin=name_or_path)


def _describe(name_or_path: str, origin: str) -> HFDualConfig:
    """Config and preprocessor of a checkpoint -> :class:`HFDualConfig` (CheckpointError
    when it is not a CLIP / SigLIP model or its side does not suit thinkfast's decoders)."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{origin} is neither a local model directory nor a Hugging Face checkpoint "
                              f"that can be loaded here ({first[:200]})") from exc
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        raise CheckpointError(f"{origin}: model_type {model_type!r} is not a dual encoder thinkfast supports "
                              f"({', '.join(SUPPORTED_TYPES)})")
    try:
        processor = _read_preprocessor(name_or_path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the preprocessor of {model_type} checkpoint {origin!r}: {exc}") from exc
    vision, text = hf_config.vision_config, hf_config.text_config
    mean, std = DEFAULT_MEAN_STD[model_type]
    config = HFDualConfig(
        source=str(origin),
        model_type=model_type,
        embed_dim=int(getattr(hf_config, "projection_dim", None) or text.hidden_size),
        image_size=_side(processor.get("crop_size"), _side(processor.get("size"), int(vision.image_size))),
        max_text_length=int(text.max_position_embeddings),
        image_mean=tuple(float(v) for v in processor.get("image_mean", mean)),
        image_std=tuple(float(v) for v in processor.get("image_std", std)),
        pad_to_max_length=model_type == "siglip",
    )
    if config.image_size % 32:
        raise CheckpointError(f"{origin}: input side {config.image_size} is not a multiple of 32, "
                              "which thinkfast's decoders need")
    return config


def _side(value: Any, fallback: int) -> int:
    """A processor size entry: an int, or ``{"height", "width"}`` / ``{"shortest_edge"}``."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in ("height", "shortest_edge", "width"):
            if isinstance(value.get(key), int):
                return int(value[key])
    return fallback


class HFDualEncoder(nn.Module):
    """``s_fast(x, y) = f(x)^T g(y)`` with a CLIP/SigLIP model's towers; see the module docstring."""

    model_kind = "fast"

    def __init__(self, model: nn.Module, tokenizer: Any, config: HFDualConfig) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        # CLIP's logit_scale (and SigLIP's logit_bias) only scale the checkpoint's own
        # contrastive loss; thinkfast's objectives bring their temperature, so these get no
        # gradient, and an unused trainable parameter stops DDP at its second step
        for name in ("logit_scale", "logit_bias"):
            param = getattr(model, name, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(False)
        self.register_buffer("_in_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_in_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "HFDualEncoder":
        """A CLIP or SigLIP checkpoint (hub id, local directory or ``s3://`` directory), in eval mode."""
        from thinkfast.utils import fs

        if fs.is_s3(name_or_path):
            with tempfile.TemporaryDirectory(prefix="thinkfast-hf-") as tmp:
                fs.download_dir(name_or_path, tmp)
                return cls._load(tmp, origin=name_or_path)
        return cls._load(fs.strip_scheme(name_or_path) if str(name_or_path).startswith("file://") else name_or_path,
                         origin=name_or_path)

    @classmethod
    def _load(cls, name_or_path: str, origin: str) -> "HFDualEncoder":
        from transformers import AutoModel, AutoTokenizer

        config = _describe(name_or_path, origin)
        try:
            model = AutoModel.from_pretrained(name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load {config.model_type} checkpoint {origin!r}: {exc}") from exc
        encoder = cls(model, tokenizer, config).eval()
        logger.info("loaded %s dual encoder from %s (d=%d, %d px)", config.model_type, origin, config.embed_dim,
                    config.image_size)
        return encoder

    def save_pretrained(self, dir_or_uri: str) -> None:
        """The checkpoint in Hugging Face's own layout (model, tokenizer, preprocessor), so
        it loads back here and in ``transformers`` alike."""
        from thinkfast.utils import fs

        if fs.is_s3(dir_or_uri):
            with tempfile.TemporaryDirectory(prefix="thinkfast-hf-save-") as tmp:
                self._save_local(tmp)
                fs.upload_dir(tmp, dir_or_uri)
        else:
            self._save_local(fs.strip_scheme(dir_or_uri))

    def _save_local(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        side = self.config.image_size
        processor = {"image_mean": list(self.config.image_mean), "image_std": list(self.config.image_std),
                     "size": {"height": side, "width": side}, "crop_size": {"height": side, "width": side}}
        with open(os.path.join(directory, PREPROCESSOR_FILE), "w", encoding="utf-8") as f:
            json.dump(processor, f, indent=2, sort_keys=True)

    # ------------------------------------------------------------ encoders
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}`` ``(B, L)`` with the checkpoint's padding."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ThinkfastError("tokenize needs at least one text")
        padding = "max_length" if self.config.pad_to_max_length else True
        out = self.tokenizer(list(texts), padding=padding, truncation=True, max_length=self.config.max_text_length,
                             return_tensors="pt")
        mask = out.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(out["input_ids"])
        return {"input_ids": out["input_ids"].long(), "attention_mask": mask.long()}

    def _pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """thinkfast's ImageNet-normalised frames -> the checkpoint's normalisation and side."""
        frames = frames.to(device=self._mean.device, dtype=torch.float32)
        unit = frames * self._in_std + self._in_mean  # back to [0, 1]
        side = self.config.image_size
        if unit.shape[-2:] != (side, side):
            unit = F.interpolate(unit, size=(side, side), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return (unit - self._mean) / self._std

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """f(x): images ``(B, 3, H, W)`` or videos ``(B, F, 3, H, W)`` -> ``(B, d)``."""
        frames, b, f = check_pixels(pixel_values)
        feats = _features(self.model.get_image_features(pixel_values=self._pixels(frames)))  # (B*F, d)
        emb = feats.reshape(b, f, -1).mean(dim=1)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """g(y): token ids ``(B, L)`` with mask ``(B, L)`` -> ``(B, d)``."""
        device = self._mean.device
        feats = _features(self.model.get_text_features(input_ids=input_ids.to(device),
                                                       attention_mask=attention_mask.to(device)))
        return F.normalize(feats, dim=-1) if normalize else feats

    @staticmethod
    def score(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Pairwise ``s_fast``: ``(B, d)`` and ``(B, d)`` -> ``(B,)``."""
        return (image_embeddings * text_embeddings).sum(-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both embeddings in one call (what DDP wraps): ``((B, d) images, (B, d) texts)``."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)

    @property
    def text_encoder(self) -> nn.Module:
        """The text tower below its projection, what ``freeze_text`` freezes (as
        ``FastModel.text_encoder``): CLIP's ``text_model`` (``text_projection`` is outside
        it); SigLIP's without its ``head``, which is SigLIP's text projection."""
        tower = self.model.text_model
        if getattr(tower, "head", None) is None:
            return tower
        return nn.ModuleList([module for name, module in tower.named_children() if name != "head"])

    # ------------------------------------------------------------ identity
    @property
    def identity(self) -> str:
        """Stable hash of weights, config and tokenizer files (same role as ``FastModel.identity``)."""
        from thinkfast.models.io import digest_saved_files, state_dict_digest

        digest: hashlib._Hash = state_dict_digest(self.model)
        fields = dataclasses.asdict(self.config)
        fields.pop("source")  # the same weights loaded from another place are the same model
        digest.update(json.dumps(fields, sort_keys=True).encode())
        digest_saved_files(digest, self.tokenizer.save_pretrained)
        return f"fast-{digest.hexdigest()[:16]}"

    @property
    def device(self) -> torch.device:
        return self._mean.device

    def extra_repr(self) -> str:
        return f"{self.config.model_type}, embed_dim={self.config.embed_dim}, image_size={self.config.image_size}"


def _features(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output with the projected
    ``pooler_output`` in transformers 5."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output
