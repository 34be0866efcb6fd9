"""The three training objectives as ``nn.Module``s whose ``forward`` returns the loss.

DDP only synchronises gradients of computations that go through the wrapped module's
``forward``; the models expose ``encode_image`` / ``log_likelihood`` instead, so each
objective wraps its model and calls them inside ``forward``. ``prepare_model`` then wraps
the objective, and ``objective.model`` stays the plain model that is saved.

The distillation teacher is held outside the module tree (not a submodule): it is frozen,
must not be wrapped by DDP, moved by ``prepare_model`` into a training state, or saved
with the student.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from thinkfast.training.frozen import encode_images, encode_visual

if TYPE_CHECKING:
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast.training.config import TrainConfig

logger = logging.getLogger(__name__)


class FastObjective(nn.Module):
    """L_DE: NCE over in-batch negatives (both directions) for the dual encoder."""

    def __init__(self, model: "FastModel", temperature: float) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                teacher_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        from thinkfast.losses import nce_loss

        image = encode_images(self.model, pixels)  # (B, d)
        text = self.model.encode_text(input_ids, attention_mask)  # (B, d)
        loss = nce_loss(image, text, temperature=self.temperature)  # negatives: every worker's batch
        return loss, {"nce": float(loss.detach())}


class SlowObjective(nn.Module):
    """L_CA: negative captioning log-likelihood of both decoders, per token, teacher forced."""

    def __init__(self, model: "SlowModel") -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                teacher_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        from thinkfast.losses import caption_loss

        tokens = encode_visual(self.model, pixels)  # (B, T, D)
        h_fwd, h_bwd = self.model.log_likelihood(tokens, input_ids, attention_mask)  # (B,), (B,)
        loss = caption_loss(h_fwd, h_bwd, attention_mask)
        return loss, {"caption": float(loss.detach())}


class DistillObjective(nn.Module):
    """L_DE + alpha * L_distill, the teacher's softmax over B_i taught to the student's.

    B_i for caption i is every image of the batch (the batch's other images, plus the hard
    negatives when batches are built from index neighbours). Teacher scores come either
    from the frozen teacher here, or precomputed (``teacher_scores`` argument)."""

    def __init__(self, student: "FastModel", teacher: "SlowModel | None", temperature: float,
                 teacher_temperature: float, alpha: float) -> None:
        super().__init__()
        self.model = student
        self._teacher = [teacher]  # a list hides it from the module tree (no DDP, no state_dict)
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature
        self.alpha = alpha

    @property
    def teacher(self) -> "SlowModel | None":
        return self._teacher[0]

    def teacher_matrix(self, pixels: torch.Tensor, captions: list[str],
                       tokens: torch.Tensor | None = None) -> torch.Tensor:
        """h[i, j] = h(x_j, y_i) of the frozen teacher over the batch: (B_text, B_image);
        ``tokens``: the teacher's cached phi(x) of these images, if any."""
        if self.teacher is None:
            raise RuntimeError("no teacher model and no precomputed teacher scores for this batch")
        return teacher_score_matrix(self.teacher, pixels, captions, tokens=tokens)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                teacher_scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        from thinkfast.losses import fast_distill_loss

        image = encode_images(self.model, pixels)  # (B, d)
        text = self.model.encode_text(input_ids, attention_mask)  # (B, d)
        out = fast_distill_loss(image, text, teacher_scores, alpha=self.alpha, temperature=self.temperature,
                                teacher_temperature=self.teacher_temperature)
        return out.total, {"nce": float(out.nce.detach()), "distill": float(out.distill.detach())}


@torch.no_grad()
def teacher_score_matrix(teacher: "SlowModel", pixels: torch.Tensor, captions: list[str],
                         tokens: torch.Tensor | None = None) -> torch.Tensor:
    """All B x B slow scores of a batch: h[i, j] = h(x_j, y_i) (B_text, B_image).

    Each image's visual tokens are computed once (or come cached, ``tokens``), then paired
    with every caption: the decoders are the cost (B^2 passes), which is why precomputing
    them pays off."""
    teacher.eval()
    if tokens is None:
        tokens = teacher.encode_visual(pixels)  # (B, T, D)
    enc = teacher.tokenize(list(captions))
    return teacher.score_matrix(tokens, enc["input_ids"], enc["attention_mask"]).float()  # (B_text, B_image)


def student_teacher_kl(student: "FastModel", teacher_scores: torch.Tensor, pixels: torch.Tensor,
                       input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float,
                       teacher_temperature: float) -> float:
    """Mean over captions of KL(p_teacher(B_i) || q_student(B_i)): what distillation lowers."""
    with torch.no_grad():
        image = student.encode_image(pixels)  # (B, d)
        text = student.encode_text(input_ids, attention_mask)  # (B, d)
        log_q = torch.log_softmax((text @ image.t()) / temperature, dim=-1)  # (B, B)
        log_p = torch.log_softmax(teacher_scores.float() / teacher_temperature, dim=-1)  # (B, B)
        return float((log_p.exp() * (log_p - log_q)).sum(dim=-1).mean())


def build_objective(kind: str, model: nn.Module, teacher: "SlowModel | None", config: "TrainConfig") -> nn.Module:
    """The objective module of ``kind`` (slow | fast | distill) around ``model``, with the
    config's temperatures and alpha: the one place both trainers get their loss from."""
    if kind == "fast":
        return FastObjective(model, config.temperature)
    if kind == "slow":
        return SlowObjective(model)
    if kind == "distill":
        return DistillObjective(model, teacher, config.temperature, config.teacher_temperature, config.alpha)
    raise ValueError(f"unknown objective {kind!r}")
