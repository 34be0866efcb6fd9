"""A bridge from ImageNet's 1000 named classes to a text tower's space (ConSE).

A user's photos mostly show things no training caption names. A pretrained classifier
already knows 1000 named visual concepts and a pretrained text encoder knows the words,
so an image can be placed in the text space without learning anything: the convex
combination of the text embeddings of its most probable class names (Norouzi et al.,
"Zero-Shot Learning by Convex Combination of Semantic Embeddings", ICLR 2014)::

    p = softmax(W_fc x / T), keep the top k of p and renormalise,
    f_concepts(x) = sum_c p_c * e(name_c) / ||e(name_c)||

``ConceptHead`` does that from the backbone's pooled features; its buffers are the class
name embeddings, computed once with the text tower the fast model uses, so the image and
text sides meet in that tower's space before any training.

The class names (``imagenet_classes.tsv``: WordNet id, then comma-separated lemmas, in
the classifier's output order) come from timm's ImageNet metadata (Apache-2.0), the
lemmas themselves from WordNet.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

NUM_CLASSES = 1000


def imagenet_classes() -> list[list[str]]:
    """The lemmas of each ImageNet class, in the classifier's order (1000 lists)."""
    text = resources.files("thinkfast.models").joinpath("imagenet_classes.tsv").read_text(encoding="utf-8")
    classes = [line.split("\t", 1)[1].split(", ") for line in text.splitlines() if line.strip()]
    if len(classes) != NUM_CLASSES:
        raise AssertionError(f"imagenet_classes.tsv has {len(classes)} classes, expected {NUM_CLASSES}")
    return classes


def class_prompts(classes: Sequence[Sequence[str]], template: str = "a photo of a {}.", synonyms: int = 3) -> list[list[str]]:
    """Up to ``synonyms`` prompts per class, one per lemma (``"a photo of a tabby cat."``)."""
    return [[template.format(lemma) for lemma in lemmas[:synonyms]] for lemmas in classes]


def concept_embeddings(encode: Callable[[list[str]], torch.Tensor], prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """``(C, H)`` unit vectors: the mean of each class's normalised prompt embeddings.
    ``encode`` maps texts to ``(N, H)`` text-tower features (before any projection)."""
    flat = [p for group in prompts for p in group]
    vectors = F.normalize(encode(flat).float(), dim=-1)
    out, i = [], 0
    for group in prompts:
        out.append(vectors[i:i + len(group)].mean(0))
        i += len(group)
    return F.normalize(torch.stack(out), dim=-1)


class ConceptHead(nn.Module):
    """Pooled image features ``(B, C4)`` -> ``(B, H)`` in the text tower's space (ConSE).

    ``classifier`` is the backbone's ImageNet head (``C4 -> 1000``); ``embeddings`` the
    ``(1000, H)`` class name vectors. Both are frozen buffers: the head is a fixed bridge,
    and a trainable projection after it (the fast model's) learns what it misses."""

    def __init__(self, classifier: nn.Linear, embeddings: torch.Tensor, top_k: int = 10,
                 temperature: float = 1.0) -> None:
        super().__init__()
        if embeddings.shape[0] != classifier.out_features:
            raise ValueError(f"{embeddings.shape[0]} class embeddings for a {classifier.out_features}-way classifier")
        if not 1 <= top_k <= classifier.out_features:
            raise ValueError(f"top_k must be in [1, {classifier.out_features}], got {top_k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.register_buffer("weight", classifier.weight.detach().clone())
        self.register_buffer("bias", classifier.bias.detach().clone())
        self.register_buffer("embeddings", F.normalize(embeddings.detach().float(), dim=-1))
        self.top_k = int(top_k)
        self.temperature = float(temperature)
        self.output_dim = int(embeddings.shape[1])

    def probabilities(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B, 1000)``: the top-k class probabilities renormalised, zero elsewhere."""
        p = F.softmax(F.linear(pooled, self.weight, self.bias) / self.temperature, dim=-1)
        top = p.topk(self.top_k, dim=-1)
        kept = torch.zeros_like(p).scatter_(-1, top.indices, top.values)
        return kept / kept.sum(-1, keepdim=True)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.probabilities(pooled) @ self.embeddings  # (B, H)

    def extra_repr(self) -> str:
        return f"classes={self.weight.shape[0]}, dim={self.output_dim}, top_k={self.top_k}, T={self.temperature}"
