"""EfficientNet-Lite's architecture as arithmetic (no torch): which blocks a variant has,
where the stride-4/8/16/32 taps are, their channels, and the parameter count.

Kept apart from the modules (``thinkfast.models.efficientnet``) so that a checkpoint's
config can be checked (``thinkfast.models.bounds``) before torch is imported or anything
is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000

# (repeats, kernel, stride, expand ratio, in channels, out channels) of EfficientNet-B0's 7 stages
BASE_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# variant -> (width multiplier, depth multiplier, native resolution)
VARIANTS: dict[str, tuple[float, float, int]] = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
    "efficientnet_lite3": (1.2, 1.4, 280),
    "efficientnet_lite4": (1.4, 1.8, 300),
}


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """TF's channel rounding: scale, round to a multiple of ``divisor``, never drop below 90%."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


@dataclass(frozen=True)
class BlockSpec:
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


def block_specs(variant: str) -> list[BlockSpec]:
    """Every MBConv block of ``variant`` in order (16 for lite0, 21 for lite1/2)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(VARIANTS)}")
    width, depth, _ = VARIANTS[variant]
    specs: list[BlockSpec] = []
    last = len(BASE_STAGES) - 1
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(BASE_STAGES):
        cin = STEM_CHANNELS if i == 0 else round_filters(cin, width)
        cout = round_filters(cout, width)
        if i not in (0, last):  # Lite keeps the first and last stages at one block
            repeats = int(math.ceil(repeats * depth))
        for r in range(repeats):
            specs.append(BlockSpec(kernel, stride if r == 0 else 1, expand, cin if r == 0 else cout, cout))
    return specs


def taps(variant: str) -> tuple[int, int, int]:
    """Index of the last block at strides 4, 8 and 16 (stride 32 is tapped after the head)."""
    stride, last = 2, {}
    for i, s in enumerate(block_specs(variant)):
        stride *= s.stride
        last[stride] = i
    return last[4], last[8], last[16]


def channels(variant: str) -> tuple[int, int, int, int]:
    """Channels of the four feature maps (C1..C4; C4 is the head)."""
    specs = block_specs(variant)
    return tuple(specs[i].out_channels for i in taps(variant)) + (HEAD_CHANNELS,)


def num_params(variant: str) -> int:
    """Parameters of ``EfficientNetLite(variant)``, classifier included (convs are bias-free;
    each BatchNorm has a weight and a bias)."""
    specs = block_specs(variant)
    total = 3 * STEM_CHANNELS * 9 + 2 * STEM_CHANNELS
    for s in specs:
        hidden = s.in_channels * s.expand
        if s.expand != 1:
            total += s.in_channels * hidden + 2 * hidden
        total += hidden * s.kernel * s.kernel + 2 * hidden + hidden * s.out_channels + 2 * s.out_channels
    total += specs[-1].out_channels * HEAD_CHANNELS + 2 * HEAD_CHANNELS
    return total + HEAD_CHANNELS * NUM_CLASSES + NUM_CLASSES
