"""The method's losses (DESIGN.md section 1), as plain functions of tensors.

* ``nce_loss``: L_DE, one softmax per positive pair over the pair and *both* mismatched
  sets ``{(x_i, y_j)}`` and ``{(x_j, y_i)}``, ``j != i``, at temperature tau. Under
  ``torch.distributed`` the embeddings of every worker are gathered, so the negatives are
  the global batch; the gather's backward all-reduces the gradient and hands each worker
  the slice of its own embeddings, which (with DDP's gradient averaging) gives exactly the
  gradient of the global-batch loss. Uneven last batches are padded and masked.
* ``caption_loss``: L_CA = -sum_i h(x_i, y_i), normalised per token (and per direction) so
  its scale does not depend on caption length or batch size.
* ``distillation_loss``: sum_i H(p(B_i), q(B_i)) with the frozen teacher's
  ``p = softmax(h / T)`` and the student's ``q = softmax(s_fast / tau)``; averaged over i.
* ``fast_distill_loss``: L_DE + alpha * L_distill over one batch, B_i = the batch's images
  (plus optional per-text hard negatives).

"mean" reductions average over the (global or local) rows so the learning rate does not
depend on the batch size; ``reduction="sum"`` gives the DESIGN.md sums literally.
"""

from __future__ import annotations

import logging
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from thinkfast.errors import ThinkfastError

logger = logging.getLogger(__name__)

Reduction = Literal["mean", "sum"]


def _reduce(values: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ThinkfastError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _check_temperature(name: str, value: float) -> None:
    if not value > 0:
        raise ThinkfastError(f"{name} must be > 0, got {value}")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces the incoming gradient and returns this worker's
    slice: the exact gradient w.r.t. the local embeddings of a loss computed on every worker
    (works on every backend; no reduce_scatter / all_to_all needed)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.size = rank, tensor.shape[0]
        return torch.cat(parts, dim=0)  # (W*B, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def distributed_world() -> tuple[int, int]:
    """``(world_size, rank)``; ``(1, 0)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_batch(image_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Global ``(images (N, d), texts (N, d), valid (N,) bool, offset)`` across workers.

    Batches of different sizes are zero-padded to the largest one (``valid`` marks real
    rows); ``offset`` is where this worker's rows start. Single process: the inputs."""
    world, rank = distributed_world()
    b = image_emb.shape[0]
    if world == 1:
        return image_emb, text_emb, torch.ones(b, dtype=torch.bool, device=image_emb.device), 0
    sizes = [torch.zeros(1, dtype=torch.long, device=image_emb.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([b], dtype=torch.long, device=image_emb.device))
    sizes_l = [int(s.item()) for s in sizes]
    pad = max(sizes_l) - b
    if pad:
        image_emb = F.pad(image_emb, (0, 0, 0, pad))
        text_emb = F.pad(text_emb, (0, 0, 0, pad))
    all_images = _GatherWithGrad.apply(image_emb)
    all_texts = _GatherWithGrad.apply(text_emb)
    width = max(sizes_l)
    valid = torch.tensor([i < n for n in sizes_l for i in range(width)], device=image_emb.device)
    return all_images, all_texts, valid, rank * width


def nce_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    temperature: float = 0.05,
    reduction: Reduction = "mean",
    gather: bool = True,
) -> torch.Tensor:
    """L_DE for aligned pairs ``(image_emb[i], text_emb[i])``, both ``(B, d)`` (normalised).

    ``loss_i = -log( e^{s_ii/tau} / (e^{s_ii/tau} + sum_{j!=i} e^{s_ij/tau} + sum_{j!=i} e^{s_ji/tau}) )``
    with ``s_ij = f(x_i)^T g(y_j)``. ``gather=True`` uses all workers' pairs as negatives."""
    _check_temperature("temperature", temperature)
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ThinkfastError(f"nce_loss needs two (B, d) tensors of one shape, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    b = image_emb.shape[0]
    if gather:
        all_images, all_texts, valid, offset = gather_batch(image_emb, text_emb)
    else:
        all_images, all_texts, valid, offset = image_emb, text_emb, torch.ones(b, dtype=torch.bool, device=image_emb.device), 0
    n = all_images.shape[0]
    rows = image_emb @ all_texts.T / temperature  # (B, N): s(x_i, y_j)
    cols = text_emb @ all_images.T / temperature  # (B, N): s(x_j, y_i)
    own = torch.arange(b, device=image_emb.device) + offset  # (B,) global index of each positive
    positive = rows.gather(1, own[:, None]).squeeze(1)  # (B,)
    is_own = torch.zeros(b, n, dtype=torch.bool, device=image_emb.device)
    is_own[torch.arange(b), own] = True
    neg_inf = torch.finfo(rows.dtype).min
    rows = rows.masked_fill(~valid[None, :], neg_inf)
    cols = cols.masked_fill(~valid[None, :] | is_own, neg_inf)  # the positive is counted once, in rows
    log_denominator = torch.logsumexp(torch.cat([rows, cols], dim=1), dim=1)  # (B,)
    return _reduce(log_denominator - positive, reduction)


def caption_loss(h_fwd: torch.Tensor, h_bwd: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L_CA per token: ``-(sum_i h_fwd_i + sum_i h_bwd_i) / (2 * number of scored tokens)``,
    i.e. the mean negative log-likelihood of a token over both decoders."""
    num_tokens = attention_mask.sum()
    if int(num_tokens) == 0:
        raise ThinkfastError("caption_loss got a batch without any scored token")
    return -(h_fwd.sum() + h_bwd.sum()) / (2 * num_tokens.to(h_fwd.dtype))


def distillation_loss(
    teacher_scores: torch.Tensor,
    student_scores: torch.Tensor,
    teacher_temperature: float = 1.0,
    student_temperature: float = 0.05,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """``sum_i H(p_i, q_i)``: teacher ``h(x, y_i)`` and student ``f(x)^T g(y_i)`` scores, both
    ``(B, M)`` over the candidate images of ``B_i`` (column 0..M-1, same order in both).

    ``p_i = softmax(teacher_i / T)`` (no gradient: the teacher is frozen),
    ``q_i = softmax(student_i / tau)``; ``mask (B, M)`` bool marks real candidates when the
    sets ``B_i`` differ in size."""
    _check_temperature("teacher_temperature", teacher_temperature)
    _check_temperature("student_temperature", student_temperature)
    if teacher_scores.shape != student_scores.shape or teacher_scores.ndim != 2:
        raise ThinkfastError(f"teacher and student scores must both be (B, M), got {tuple(teacher_scores.shape)} and {tuple(student_scores.shape)}")
    teacher_logits = teacher_scores.detach().to(student_scores.dtype) / teacher_temperature
    student_logits = student_scores / student_temperature
    if mask is not None:
        neg_inf = torch.finfo(student_logits.dtype).min
        teacher_logits = teacher_logits.masked_fill(~mask, neg_inf)
        student_logits = student_logits.masked_fill(~mask, neg_inf)
    p = teacher_logits.softmax(dim=1)  # (B, M)
    log_q = student_logits.log_softmax(dim=1)  # (B, M)
    cross_entropy = -(p * log_q)
    if mask is not None:
        cross_entropy = cross_entropy.masked_fill(~mask, 0.0)
    return _reduce(cross_entropy.sum(dim=1), reduction)


class DistillLoss(NamedTuple):
    """The combined loss and its two parts (for logging)."""

    total: torch.Tensor  # L_DE + alpha * L_distill
    nce: torch.Tensor  # L_DE
    distill: torch.Tensor  # L_distill


def fast_distill_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    teacher_scores: torch.Tensor,
    alpha: float = 1.0,
    temperature: float = 0.05,
    teacher_temperature: float = 1.0,
    negative_image_emb: torch.Tensor | None = None,
    gather: bool = True,
) -> DistillLoss:
    """``L_DE + alpha * L_distill`` for a batch of aligned pairs.

    ``teacher_scores (B, B + H)``: ``[i, j] = h(x_j, y_i)`` for the batch's images j < B
    (``SlowModel.score_matrix`` gives this orientation), then for the H hard negatives of
    text i in ``negative_image_emb (B, H, d)`` if given. The student's scores are the same
    pairs' dot products; B_i never leaves this worker (the teacher scored exactly these)."""
    nce = nce_loss(image_emb, text_emb, temperature=temperature, gather=gather)
    student = text_emb @ image_emb.T  # (B, B): [i, j] = f(x_j)^T g(y_i)
    if negative_image_emb is not None:
        hard = torch.einsum("bd,bhd->bh", text_emb, negative_image_emb)  # (B, H)
        student = torch.cat([student, hard], dim=1)  # (B, B + H)
    distill = distillation_loss(teacher_scores, student, teacher_temperature=teacher_temperature,
                                student_temperature=temperature)
    return DistillLoss(total=nce + alpha * distill, nce=nce, distill=distill)
