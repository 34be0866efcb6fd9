"""Training checkpoints: the model in ``save_pretrained`` form plus optimizer and step state.

Layout of one checkpoint directory (what Ray Train persists to ``--storage``):
``model/`` (config.json + model.safetensors + tokenizer files: loadable as is by
``FastModel/SlowModel.from_pretrained``), ``optimizer.pt`` (the AdamW state dict, read back
with ``torch.load(weights_only=True)``: tensors and numbers only, never pickled code) and
``state.json`` (step counters, metric history, the config that produced it).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from thinkfast.errors import CheckpointError

if TYPE_CHECKING:
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


@dataclass
class LoopState:
    """Counters that make a resumed run continue instead of starting over."""

    step: int = 0  # optimizer steps done (global, same on every rank)
    epoch: int = 0  # epoch in progress (0-based)
    step_in_epoch: int = 0  # steps of that epoch already done
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per finished epoch
    starts: list[int] = field(default_factory=list)  # the step each attempt started at (restarts show here)
    rejected: dict[str, str] = field(default_factory=dict)  # key -> reason of rows that failed to decode
    epoch_losses: list[float] = field(default_factory=list)  # losses of the epoch in progress (a resumed epoch's mean covers all its steps)
    losses: list[float] = field(default_factory=list)  # rank 0's loss of every step of the run: the loss curve

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "history": self.history, "starts": self.starts, "rejected": self.rejected,
                "epoch_losses": self.epoch_losses, "losses": self.losses}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoopState":
        return cls(step=int(data["step"]), epoch=int(data["epoch"]), step_in_epoch=int(data["step_in_epoch"]),
                   history=list(data.get("history", [])), starts=[int(s) for s in data.get("starts", [])],
                   rejected=dict(data.get("rejected", {})),
                   epoch_losses=[float(x) for x in data.get("epoch_losses", [])],
                   losses=[float(x) for x in data.get("losses", [])])


def save_checkpoint(directory: str, model: "FastModel | SlowModel", optimizer: torch.optim.Optimizer, state: LoopState,
                    extra: dict[str, Any]) -> None:
    """Write one checkpoint directory (local; Ray Train uploads it, the in-process trainer
    keeps it). Weights go through ``save_pretrained`` (safetensors), never pickle."""
    model.save_pretrained(os.path.join(directory, MODEL_DIR))
    torch.save({"optimizer": optimizer.state_dict()}, os.path.join(directory, OPTIMIZER_FILE))
    with open(os.path.join(directory, STATE_FILE), "w", encoding="utf-8") as f:
        json.dump({**state.to_dict(), **extra}, f, indent=1)


def load_state(directory: str) -> tuple[LoopState, dict[str, Any]]:
    """The loop counters of a checkpoint, and everything else its ``state.json`` holds."""
    path = os.path.join(directory, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"training checkpoint {directory} has no readable {STATE_FILE}: {exc}") from exc
    return LoopState.from_dict(data), data


def load_optimizer_state(directory: str) -> dict[str, Any]:
    """The optimizer state dict of a checkpoint (tensors and numbers only: weights_only)."""
    path = os.path.join(directory, OPTIMIZER_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["optimizer"]
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"training checkpoint {directory}: unreadable {OPTIMIZER_FILE}: {exc}") from exc


def learning_rate(step: int, total_steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to 10% of it: a pure function of the
    step, so a resumed run needs no scheduler state."""
    import math

    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(total_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))
