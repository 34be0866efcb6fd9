"""Frozen backbone stages, shared by every backbone.

A frozen stage keeps its pretrained weights *and* its BatchNorm statistics: switching the
model to training mode would otherwise update the running means of a layer whose weights
are fixed, and the features it hands on would drift from the ones it was trained with.
"""

from __future__ import annotations

from torch import nn


class FrozenStagesMixin(nn.Module):
    """Backbones list what ``frozen_stages`` freezes in :meth:`frozen_modules` and call
    :meth:`freeze` at the end of ``__init__``."""

    frozen_stages: int = 0

    def frozen_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def freeze(self) -> None:
        for module in self.frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenStagesMixin":
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()  # frozen BatchNorm statistics stay the pretrained ones
        return self
