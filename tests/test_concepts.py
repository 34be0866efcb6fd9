"""ConSE, the bridge from ImageNet's named classes to the text tower's space: the formula on a
hand-computed case and the class list."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thinkfast.models.concepts import ConceptHead, class_prompts, imagenet_classes


def test_head_is_the_renormalised_top_k_mixture() -> None:
    fc = nn.Linear(2, 3)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        fc.bias.zero_()
    emb = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # rows are normalised by the head
    head = ConceptHead(fc, emb, top_k=2, temperature=1.0)
    x = torch.tensor([[2.0, 1.0]])  # logits (2, 1, 0)
    p = torch.exp(torch.tensor([2.0, 1.0, 0.0]))
    p = p / p.sum()
    kept = torch.tensor([p[0], p[1], 0.0]) / (p[0] + p[1])  # class 2 dropped, the rest renormalised
    torch.testing.assert_close(head.probabilities(x)[0], kept)
    want = kept[0] * torch.tensor([1.0, 0.0]) + kept[1] * torch.tensor([0.0, 1.0])
    torch.testing.assert_close(head(x)[0], want)
    # temperature 2 halves the logits
    hot = ConceptHead(fc, emb, top_k=3, temperature=2.0).probabilities(x)[0]
    torch.testing.assert_close(hot, F.softmax(torch.tensor([1.0, 0.5, 0.0]), dim=0))
    with pytest.raises(ValueError, match="top_k"):
        ConceptHead(fc, emb, top_k=4)
    with pytest.raises(ValueError, match="class embeddings"):
        ConceptHead(fc, emb[:2])


def test_class_names_are_in_classifier_order() -> None:
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert classes[0][0] == "tench" and classes[340] == ["zebra"] and classes[967] == ["espresso"]
    assert class_prompts([["tabby", "tabby cat"]], synonyms=1) == [["a photo of a tabby."]]

# zero-shot retrieval of real photos through the head: tests/test_backbones.py (inside FastModel)
