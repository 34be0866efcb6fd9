"""FastModel: the indexable dual encoder ``s_fast(x, y) = f(x)^T g(y)``.

``f(x)``: ResNet -> global average pool of the stride-32 map -> linear -> L2 norm. For a video
the per-frame pooled features are averaged over frames *before* the projection (DESIGN.md),
so a video costs one projection and lives in the same space as images.
``g(y)``: bag-of-words or HF transformer (``thinkfast.models.text``) -> linear -> L2 norm.

``forward(pixel_values, input_ids, attention_mask)`` returns both embeddings so that
``DistributedDataParallel(model)(...)`` sees every parameter used in one call.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from thinkfast.errors import CheckpointError, ThinkfastError
from thinkfast.models.bounds import check_hf_text_config, check_param_budget
from thinkfast.models.concepts import ConceptHead
from thinkfast.models.config import FastConfig, fast_preset
from thinkfast.models.io import TEXT_ENCODER_DIR, PretrainedMixin
from thinkfast.models.text import HFTextEncoder, build_text_encoder
from thinkfast.models.vision import build_backbone, check_pixels

if TYPE_CHECKING:
    from thinkfast.models.hf_dual import HFDualEncoder

logger = logging.getLogger(__name__)


class FastModel(PretrainedMixin, nn.Module):
    """Dual encoder; see the module docstring. Build with ``from_preset`` / ``from_pretrained``."""

    model_kind = "fast"
    config_class = FastConfig

    def __init__(self, config: FastConfig, tokenizer: Any, load_pretrained: bool = True, hf_text_config: Any | None = None,
                 max_params: int | None = None) -> None:
        """``max_params``: the parameter limit checked (from the config arithmetic) before any
        module is allocated; default ``$THINKFAST_MAX_PARAMS``, else 10^9."""
        if not isinstance(config, FastConfig):
            raise ThinkfastError(f"FastModel needs a FastConfig, got {type(config).__name__}")
        hf_dict = _checked_hf_text_config(config, hf_text_config) if config.text.kind == "hf" else None
        check_param_budget(config, hf_dict, max_params)
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.backbone = build_backbone(config.vision, load_pretrained=load_pretrained)
        linear_head = config.image_head == "linear"
        if linear_head:  # created before the text tower: the seeded initialisation order of earlier versions
            self.image_proj = nn.Linear(self.backbone.channels[-1], config.embed_dim)
        self.text_encoder = build_text_encoder(config.text, hf_config=hf_text_config, load_pretrained=load_pretrained)
        self.text_dropout = nn.Dropout(config.text.dropout)
        self.text_proj = nn.Linear(self.text_encoder.output_dim, config.embed_dim)
        self.concepts: ConceptHead | None = None
        if not linear_head:
            self.concepts = self._concept_head(fresh=load_pretrained)
            self.image_proj = nn.Linear(self.text_encoder.output_dim, config.embed_dim)
            with torch.no_grad():  # both sides start as the same map of the text space: ConSE's zero-shot ranking
                self.image_proj.load_state_dict(self.text_proj.state_dict())

    def _concept_head(self, fresh: bool) -> ConceptHead:
        """The ConSE bridge over the backbone's ImageNet classifier. Built fresh, the class
        names are embedded with this model's own text tower (before projection); loaded from
        a checkpoint, the embeddings are placeholders that the saved weights replace."""
        classifier = self.backbone.net._fc
        if fresh:
            from thinkfast.models.concepts import class_prompts, concept_embeddings, imagenet_classes

            def encode(texts: list[str]) -> torch.Tensor:
                with torch.no_grad():
                    return torch.cat([self.text_encoder(**self.tokenizer(texts[i:i + 256], max_length=self.config.max_text_length))
                                      for i in range(0, len(texts), 256)])

            embeddings = concept_embeddings(encode, class_prompts(imagenet_classes(), synonyms=1))
        else:
            embeddings = torch.ones(classifier.out_features, self.text_encoder.output_dim)
        return ConceptHead(classifier, embeddings, top_k=self.config.concept_top_k)

    @classmethod
    def from_pretrained(cls, dir_or_uri: str, max_params: int | None = None) -> "FastModel | HFDualEncoder":
        """A thinkfast fast model, or a Hugging Face CLIP / SigLIP checkpoint (hub id or
        directory) behind the same contract (``thinkfast.models.hf_dual``)."""
        from thinkfast.models.hf_dual import HFDualEncoder, is_hf_dual_reference

        if is_hf_dual_reference(dir_or_uri):
            return HFDualEncoder.from_pretrained(dir_or_uri)
        return super().from_pretrained(dir_or_uri, max_params=max_params)

    # ------------------------------------------------------------ construction hooks
    @classmethod
    def preset_config(cls, name: str) -> FastConfig:
        return fast_preset(name)

    @classmethod
    def _default_tokenizer(cls, config: FastConfig) -> Any:
        if config.text.kind == "hf":
            from thinkfast.data.tokenizer import HFTokenizer

            return HFTokenizer(config.text.hf_name_or_path, max_length=config.max_text_length)
        return super()._default_tokenizer(config)

    @classmethod
    def _with_vocab(cls, config: FastConfig, tokenizer: Any) -> FastConfig:
        if config.text.kind == "bow":
            return dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=int(tokenizer.vocab_size)))
        return config

    @classmethod
    def _build(cls, config: FastConfig, tokenizer: Any, load_pretrained: bool, directory: str | None,
               max_params: int | None = None) -> "FastModel":
        hf_config = None
        if directory is not None and config.text.kind == "hf":
            from transformers import AutoConfig

            try:
                hf_config = AutoConfig.from_pretrained(os.path.join(directory, TEXT_ENCODER_DIR))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{directory} lacks a readable {TEXT_ENCODER_DIR}/config.json: {exc}") from exc
        return cls(config, tokenizer, load_pretrained=load_pretrained, hf_text_config=hf_config, max_params=max_params)

    def _save_extra(self, directory: str) -> None:
        if isinstance(self.text_encoder, HFTextEncoder):
            self.text_encoder.hf_config.save_pretrained(os.path.join(directory, TEXT_ENCODER_DIR))

    # ------------------------------------------------------------ encoders
    def pooled_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled stride-32 map per frame ``(B, F, C4)``: everything before the
        first part that can train when the trunk is frozen, so ``thinkfast.training.frozen``
        can compute it once per image instead of once per step."""
        frames, b, f = check_pixels(pixel_values)
        frames = frames.to(device=self.device, dtype=self.image_proj.weight.dtype)
        last = self.backbone(frames)[-1]  # (B*F, C4, h, w)
        return last.mean(dim=(2, 3)).reshape(b, f, -1)  # (B, F, C4)

    def image_features_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B, F, C4)`` pooled frames -> features before projection ``(B, C4)`` (or ``(B, H)``
        through the concepts head); frames averaged for videos."""
        pooled = pooled.to(device=self.device, dtype=self.image_proj.weight.dtype)
        b, f, c = pooled.shape
        flat = pooled.reshape(b * f, c)
        if self.concepts is not None:
            flat = self.concepts(flat)  # (B*F, H): a point in the text tower's space
        return flat.reshape(b, f, -1).mean(dim=1)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features before projection ``(B, C4)``; frames averaged for videos."""
        return self.image_features_from_pooled(self.pooled_frames(pixel_values))

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """f(x): images ``(B, 3, H, W)`` or videos ``(B, F, 3, H, W)`` -> ``(B, d)``."""
        return self.encode_pooled(self.pooled_frames(pixel_values), normalize=normalize)

    def encode_pooled(self, pooled: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """f(x) from :meth:`pooled_frames` ``(B, F, C4)`` -> ``(B, d)``: the same result as
        :meth:`encode_image` on the pixels they came from."""
        emb = self.image_proj(self.image_features_from_pooled(pooled))  # (B, d)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """g(y): token ids ``(B, L)`` with mask ``(B, L)`` -> ``(B, d)``."""
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        feats = self.text_dropout(self.text_encoder(input_ids, attention_mask))  # (B, H)
        emb = self.text_proj(feats)  # (B, d)
        return F.normalize(emb, dim=-1) if normalize else emb

    @staticmethod
    def score(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Pairwise ``s_fast``: ``(B, d)`` and ``(B, d)`` -> ``(B,)`` (row i with row i)."""
        return (image_embeddings * text_embeddings).sum(-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both embeddings in one call (what DDP wraps): ``((B, d) images, (B, d) texts)``."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)

    def extra_repr(self) -> str:
        return f"embed_dim={self.config.embed_dim}, image_size={self.config.image_size}, text={self.config.text.kind}"


def _checked_hf_text_config(config: FastConfig, hf_text_config: Any | None) -> dict[str, Any]:
    """The HF text tower's config as a checked dict: the one given (read from a checkpoint),
    else the one at ``text.hf_name_or_path`` (a hub id or local dir; only its config.json is
    read here, the weights come later if at all)."""
    name = config.text.hf_name_or_path
    if hf_text_config is None:
        from transformers import AutoConfig

        try:
            hf_text_config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load Hugging Face text encoder config {name!r}: {exc}") from exc
    raw = hf_text_config.to_dict() if hasattr(hf_text_config, "to_dict") else hf_text_config
    try:
        return check_hf_text_config(raw, config.max_text_length)
    except CheckpointError as exc:
        raise type(exc)(f"text encoder {name}: {exc}") from None
