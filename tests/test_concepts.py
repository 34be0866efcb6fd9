"""ConSE, the bridge from ImageNet's named classes to the text tower's space: the formula on a
hand-computed case, and zero-shot text-to-image retrieval on real photographs with the
pretrained parts this machine has (EfficientNet-Lite0 ImageNet weights, MiniLM), with no
training at all."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from thinkfast.models.concepts import ConceptHead, class_prompts, concept_embeddings, imagenet_classes


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


def _photo(name: str, side: int = 224) -> torch.Tensor:
    root = importlib.util.find_spec("skimage").submodule_search_locations[0]
    image = Image.open(os.path.join(root, "data", name)).convert("RGB")
    w, h = image.size
    scale = side / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    w, h = image.size
    image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255 * 2 - 1


def test_zero_shot_retrieval_of_real_photos() -> None:
    """No caption of these photos was ever seen: ImageNet classes and MiniLM's words do it all."""
    from thinkfast.data.tokenizer import HFTokenizer, minilm_path
    from thinkfast.models.config import TextConfig
    from thinkfast.models.efficientnet import EfficientNetLite, load_weights
    from thinkfast.models.text import HFTextEncoder

    trunk = EfficientNetLite("efficientnet_lite0")
    load_weights(trunk)
    trunk.eval()
    text = HFTextEncoder(TextConfig(kind="hf", hf_name_or_path=minilm_path())).eval()
    tokenizer = HFTokenizer(minilm_path(), max_length=32)

    def encode(texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([text(**tokenizer(texts[i:i + 250])) for i in range(0, len(texts), 250)])

    head = ConceptHead(trunk._fc, concept_embeddings(encode, class_prompts(imagenet_classes(), synonyms=1)))
    photos = ["coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg", "horse.png", "astronaut.png"]
    queries = ["a cup of coffee", "a cat", "a motorcycle", "a rocket launch", "a horse", "an astronaut"]
    with torch.no_grad():
        images = F.normalize(head(trunk(torch.cat([_photo(p) for p in photos]))[-1].mean((2, 3))), dim=-1)
    scores = F.normalize(encode(queries), dim=-1) @ images.T  # (queries, photos)
    assert scores.argmax(1).tolist() == list(range(len(photos))), scores
