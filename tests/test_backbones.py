"""Backbone choice in ``VisionConfig``: EfficientNet-Lite under both models (parameter estimate
exact, checkpoints round-trip strictly), frozen stages for ResNet, version-1 checkpoints
still load with the same identity, the ConSE concepts head inside ``FastModel`` ranks real
photos zero-shot through thinkfast's own preprocessing, and ``FastModel.from_pretrained``
hands CLIP-family checkpoints to ``HFDualEncoder``."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import pytest
import torch
from PIL import Image

from thinkfast import FastModel, SlowModel
from thinkfast.data.tokenizer import WordTokenizer
from thinkfast.errors import CheckpointError
from thinkfast.models.bounds import estimate_params
from thinkfast.models.config import VisionConfig

CAPTIONS = ["a red circle", "a blue square left of a green cross", "a photo of a cat"]


def _tok() -> WordTokenizer:
    return WordTokenizer.build(CAPTIONS)


def _effnet(variant: str = "efficientnet_lite0", **kw) -> VisionConfig:
    return VisionConfig(backbone=variant, pretrained=None, **kw)


@pytest.mark.parametrize("variant", ["efficientnet_lite0", "efficientnet_lite2"])
def test_efficientnet_under_both_models(variant: str, tmp_path) -> None:
    torch.manual_seed(0)
    fast = FastModel.from_preset("tiny", tokenizer=_tok(), vision=_effnet(variant), image_size=64)
    slow = SlowModel.from_preset("tiny", tokenizer=_tok(), vision=_effnet(variant), image_size=64, levels=(32, 16))
    for model in (fast, slow):
        assert estimate_params(model.config, None) == sum(p.numel() for p in model.parameters())
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert fast.eval().encode_image(pixels).shape == (2, fast.config.embed_dim)
        tokens = slow.eval().encode_visual(pixels)
    assert tokens.shape == (2, 2 * 2 + 4 * 4, slow.config.width)  # stride 32 (2x2) and 16 (4x4) at 64 px
    fast.save_pretrained(str(tmp_path / "fast"))
    slow.save_pretrained(str(tmp_path / "slow"))
    again = FastModel.from_pretrained(str(tmp_path / "fast"))
    assert again.identity == fast.identity and again.config.vision.backbone == variant
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(pixels), fast.encode_image(pixels))
        torch.testing.assert_close(SlowModel.from_pretrained(str(tmp_path / "slow")).encode_visual(pixels), tokens)


def test_package_weights_reach_the_fast_model() -> None:
    from thinkfast.models.efficientnet import EfficientNetLite, load_weights

    fast = FastModel.from_preset("tiny", tokenizer=_tok(), vision=VisionConfig(backbone="efficientnet_lite0",
                                                                               pretrained="package"), image_size=64)
    reference = EfficientNetLite("efficientnet_lite0")
    load_weights(reference)
    torch.testing.assert_close(fast.backbone.net._conv_stem.weight, reference._conv_stem.weight)


def test_resnet_frozen_stages_keep_weights_and_statistics() -> None:
    torch.manual_seed(0)
    vision = dataclasses.replace(FastModel.preset_config("tiny").vision, frozen_stages=2)
    fast = FastModel.from_preset("tiny", tokenizer=_tok(), vision=vision)
    frozen = {n for n, p in fast.named_parameters() if not p.requires_grad}
    assert any(n.startswith("backbone.resnet.embedder") for n in frozen)
    assert any(n.startswith("backbone.resnet.encoder.stages.1") for n in frozen)
    assert not any(n.startswith("backbone.resnet.encoder.stages.2") for n in frozen)
    fast.train()
    assert not fast.backbone.resnet.encoder.stages[0].training and fast.backbone.resnet.encoder.stages[2].training
    before = {n: p.detach().clone() for n, p in fast.named_parameters()}
    stats = fast.backbone.resnet.embedder.embedder.normalization.running_mean.clone()
    opt = torch.optim.SGD([p for p in fast.parameters() if p.requires_grad], lr=0.1)
    tok = fast.tokenize(CAPTIONS[:2])
    img, txt = fast(torch.randn(2, 3, 32, 32), tok["input_ids"], tok["attention_mask"])
    (img * txt).sum().backward()
    opt.step()
    for n, p in fast.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed != (n in frozen) or p.grad is None or not p.grad.any(), n
    torch.testing.assert_close(fast.backbone.resnet.embedder.embedder.normalization.running_mean, stats)


def test_version_1_checkpoints_load_with_their_identity(tmp_path) -> None:
    torch.manual_seed(0)
    fast = FastModel.from_preset("tiny", tokenizer=_tok())
    fast.save_pretrained(str(tmp_path))
    path = tmp_path / "config.json"
    payload = json.loads(path.read_text())
    assert payload["format_version"] == 2
    payload["format_version"] = 1  # what a checkpoint of the previous release holds
    del payload["config"]["vision"]["backbone"], payload["config"]["vision"]["frozen_stages"]
    del payload["config"]["image_head"], payload["config"]["concept_top_k"]
    path.write_text(json.dumps(payload))
    old = FastModel.from_pretrained(str(tmp_path))
    assert old.config.vision.backbone == "resnet" and old.identity == fast.identity  # indexes built with it stay valid
    payload["format_version"] = 3
    path.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="format_version"):
        FastModel.from_pretrained(str(tmp_path))


def test_concepts_head_needs_a_classifier_and_words() -> None:
    with pytest.raises(CheckpointError, match="image_head='concepts'"):
        FastModel.preset_config("tiny").__class__(image_head="concepts")


def _photo(name: str, size: int) -> torch.Tensor:
    from thinkfast.data.image import preprocess_image

    root = importlib.util.find_spec("skimage").submodule_search_locations[0]
    return preprocess_image(Image.open(os.path.join(root, "data", name)), size)


def test_concepts_fast_model_ranks_real_photos_zero_shot(tmp_path) -> None:
    """The ConSE head inside FastModel, through thinkfast's own preprocessing, before any
    training: each query's best photo is the right one; and it survives save/load."""
    config = dataclasses.replace(FastModel.preset_config("paper"), image_head="concepts",
                                 vision=VisionConfig(backbone="efficientnet_lite0", pretrained="package"))
    fast = FastModel.from_config(config).eval()
    assert fast.concepts is not None and fast.image_proj.in_features == 384
    photos = ["coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg", "horse.png", "astronaut.png"]
    queries = ["a cup of coffee", "a cat", "a motorcycle", "a rocket launch", "a horse", "an astronaut"]
    pixels = torch.stack([_photo(p, 224) for p in photos])
    tok = fast.tokenize(queries)
    with torch.no_grad():
        scores = fast.encode_text(tok["input_ids"], tok["attention_mask"]) @ fast.encode_image(pixels).T
    assert scores.argmax(1).tolist() == list(range(len(photos))), scores
    fast.save_pretrained(str(tmp_path / "m"))
    again = FastModel.from_pretrained(str(tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(pixels[:2]), fast.encode_image(pixels[:2]))
    assert again.identity == fast.identity


def test_from_pretrained_dispatches_clip_family(tmp_path) -> None:
    from test_hf_dual import _save_tiny

    from thinkfast.models.hf_dual import HFDualEncoder, is_hf_dual_reference

    _save_tiny("clip", str(tmp_path / "clip"))
    model = FastModel.from_pretrained(str(tmp_path / "clip"))
    assert isinstance(model, HFDualEncoder)
    assert is_hf_dual_reference("openai/clip-vit-base-patch32")
    assert not is_hf_dual_reference(str(tmp_path / "missing-dir"))  # an absolute path is never a hub id
    assert not is_hf_dual_reference("./runs/fast")
    with pytest.raises(CheckpointError):
        FastModel.from_pretrained("nobody-offline/no-such-model")  # offline: one clear error, no hang
