"""Fast-model text towers g(y) before projection: bag-of-words or a Hugging Face transformer.

* ``BagOfWordsEncoder``: masked mean of token embeddings followed by an MLP (DESIGN.md).
  Order-blind on purpose: it is the cheapest text tower and the one the slow model's
  word-order-aware decoders most clearly beat on compositional captions.
* ``HFTextEncoder``: any ``AutoModel`` (BERT, MiniLM...) with masked-mean or CLS pooling.
  Built fresh, it loads weights from ``hf_name_or_path`` (hub id or local directory; the
  offline MiniLM by default in the ``paper`` preset); loaded from a thinkfast checkpoint it
  is rebuilt from the architecture config saved next to the weights, so no hub access is
  needed to load a trained model.

Both return ``(B, output_dim)`` features; the FastModel projects and L2-normalises them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from thinkfast.errors import CheckpointError, ThinkfastError
from thinkfast.models.config import TextConfig

logger = logging.getLogger(__name__)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden (B, L, H)`` over positions where ``attention_mask (B, L)`` is 1."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, H)


class BagOfWordsEncoder(nn.Module):
    """Mean of token embeddings -> MLP (Linear, GELU, Linear) with a residual connection."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ThinkfastError("bag-of-words text tower needs text.vocab_size > 0 (pass the tokenizer)")
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, config.mlp_hidden_size),
            nn.GELU(),
            nn.Linear(config.mlp_hidden_size, config.hidden_size),
        )
        self.norm = nn.LayerNorm(config.hidden_size)
        self.output_dim = config.hidden_size
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = masked_mean(self.embedding(input_ids), attention_mask)  # (B, H)
        return self.norm(pooled + self.mlp(pooled))  # (B, H)


class HFTextEncoder(nn.Module):
    """A Hugging Face encoder with mean or CLS pooling."""

    def __init__(self, config: TextConfig, hf_config: Any | None = None, load_pretrained: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.pooling = config.pooling
        try:
            if hf_config is None and load_pretrained:
                self.model = AutoModel.from_pretrained(config.hf_name_or_path)
            else:
                hf_config = hf_config or AutoConfig.from_pretrained(config.hf_name_or_path)
                self.model = AutoModel.from_config(hf_config)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load Hugging Face text encoder {config.hf_name_or_path!r}: {exc}") from exc
        self.output_dim = int(self.model.config.hidden_size)

    @property
    def hf_config(self) -> Any:
        """The transformer's architecture config (saved with the checkpoint)."""
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        if self.pooling == "cls":
            return hidden[:, 0]  # (B, H)
        return masked_mean(hidden, attention_mask)  # (B, H)


def build_text_encoder(config: TextConfig, hf_config: Any | None = None, load_pretrained: bool = True) -> nn.Module:
    """The text tower a ``TextConfig`` describes."""
    if config.kind == "bow":
        return BagOfWordsEncoder(config)
    return HFTextEncoder(config, hf_config=hf_config, load_pretrained=load_pretrained)
