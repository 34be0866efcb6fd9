"""Losses against hand-computed values, gradient directions, and DDP gathering."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from thinkfast.errors import ThinkfastError
from thinkfast.losses import caption_loss, distillation_loss, fast_distill_loss, nce_loss

# s = image @ text.T for these: s_ij = S[i][j]
S = [[0.9, 0.2, -0.1],
     [0.3, 0.5, 0.4],
     [-0.2, 0.6, 0.7]]


def _pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """image = identity, text = S^T, so image_i . text_j = S[i][j]."""
    return torch.eye(3), torch.tensor(S).T.contiguous()


def _nce_by_hand(tau: float) -> float:
    total = 0.0
    for i in range(3):
        pos = math.exp(S[i][i] / tau)
        neg = sum(math.exp(S[i][j] / tau) + math.exp(S[j][i] / tau) for j in range(3) if j != i)
        total += -math.log(pos / (pos + neg))
    return total


def test_nce_matches_hand_computation() -> None:
    image, text = _pairs()
    for tau in (1.0, 0.1):
        assert float(nce_loss(image, text, temperature=tau, reduction="sum")) == pytest.approx(_nce_by_hand(tau), rel=1e-5)
        assert float(nce_loss(image, text, temperature=tau)) == pytest.approx(_nce_by_hand(tau) / 3, rel=1e-5)
    # identity similarities, tau = 1: each term is log(e + 4) - 1
    assert float(nce_loss(torch.eye(3), torch.eye(3), temperature=1.0)) == pytest.approx(math.log(math.e + 4) - 1, rel=1e-6)


def test_nce_gradient_step_lowers_loss() -> None:
    torch.manual_seed(0)
    image = torch.randn(6, 8, requires_grad=True)
    text = torch.randn(6, 8, requires_grad=True)

    def loss_fn() -> torch.Tensor:
        return nce_loss(torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1), 0.1)

    before = loss_fn()
    before.backward()
    with torch.no_grad():
        image -= 0.05 * image.grad
        text -= 0.05 * text.grad
    assert float(loss_fn().detach()) < float(before.detach())


def _distill_by_hand(teacher: list[list[float]], student: list[list[float]], t: float, tau: float) -> float:
    total = 0.0
    for trow, srow in zip(teacher, student):
        zp = sum(math.exp(v / t) for v in trow)
        zq = sum(math.exp(v / tau) for v in srow)
        total += -sum(math.exp(a / t) / zp * math.log(math.exp(b / tau) / zq) for a, b in zip(trow, srow))
    return total


TEACHER = [[-10.0, -12.0, -15.0], [-20.0, -18.0, -19.0], [-9.0, -9.5, -7.0]]


def test_distillation_matches_hand_computation_and_ignores_teacher_grad() -> None:
    teacher = torch.tensor(TEACHER, requires_grad=True)
    student = torch.tensor(S)
    got = distillation_loss(teacher, student, teacher_temperature=2.0, student_temperature=0.5, reduction="sum")
    assert float(got) == pytest.approx(_distill_by_hand(TEACHER, S, 2.0, 0.5), rel=1e-5)
    mean = distillation_loss(teacher, student, teacher_temperature=2.0, student_temperature=0.5)
    assert float(mean) == pytest.approx(_distill_by_hand(TEACHER, S, 2.0, 0.5) / 3, rel=1e-5)
    assert not got.requires_grad  # the teacher is frozen; only the student carries gradients


def test_distillation_mask_drops_candidates() -> None:
    teacher, student = torch.tensor(TEACHER), torch.tensor(S)
    mask = torch.tensor([[True, True, False], [True, True, True], [False, True, True]])
    got = distillation_loss(teacher, student, 1.0, 1.0, mask=mask, reduction="sum")
    rows = [([-10.0, -12.0], [0.9, 0.2]), (TEACHER[1], S[1]), ([-9.5, -7.0], [0.6, 0.7])]
    expected = sum(_distill_by_hand([t], [s], 1.0, 1.0) for t, s in rows)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_distillation_step_moves_student_towards_teacher() -> None:
    teacher = torch.tensor(TEACHER)
    student = torch.tensor(S, requires_grad=True)
    p = (teacher / 2.0).softmax(1)

    def kl() -> float:
        return float((p * (p.log() - (student.detach() / 0.5).log_softmax(1))).sum())

    before = kl()
    loss = distillation_loss(teacher, student, teacher_temperature=2.0, student_temperature=0.5)
    loss.backward()
    with torch.no_grad():
        student -= 0.1 * student.grad
    assert kl() < before


def test_caption_loss_is_per_token_mean_over_both_directions() -> None:
    h_fwd = torch.tensor([-3.0, -6.0, -1.5])
    h_bwd = torch.tensor([-2.0, -5.0, -2.5])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])  # 9 tokens
    assert float(caption_loss(h_fwd, h_bwd, mask)) == pytest.approx(20.0 / 18.0)
    with pytest.raises(ThinkfastError):
        caption_loss(h_fwd, h_bwd, torch.zeros_like(mask))


def test_fast_distill_loss_combines_parts() -> None:
    image, text = _pairs()
    teacher = torch.tensor(TEACHER)
    out = fast_distill_loss(image, text, teacher, alpha=0.7, temperature=0.5, teacher_temperature=2.0)
    student = text @ image.T  # [i, j] = image_j . text_i = S[j][i]
    assert float(out.nce) == pytest.approx(_nce_by_hand(0.5) / 3, rel=1e-5)
    assert float(out.distill) == pytest.approx(_distill_by_hand(TEACHER, student.tolist(), 2.0, 0.5) / 3, rel=1e-5)
    assert float(out.total) == pytest.approx(float(out.nce) + 0.7 * float(out.distill), rel=1e-6)
    hard = torch.randn(3, 2, 3)
    teacher_hard = torch.cat([teacher, torch.tensor([[-30.0, -31.0]] * 3)], 1)
    with_hard = fast_distill_loss(image, text, teacher_hard, alpha=1.0, temperature=0.5, teacher_temperature=2.0,
                                  negative_image_emb=hard)
    student_hard = torch.cat([student, torch.einsum("bd,bhd->bh", text, hard)], 1)
    assert float(with_hard.distill) == pytest.approx(_distill_by_hand(teacher_hard.tolist(), student_hard.tolist(), 2.0, 0.5) / 3, rel=1e-5)


def test_bad_arguments() -> None:
    image, text = _pairs()
    with pytest.raises(ThinkfastError, match="temperature"):
        nce_loss(image, text, temperature=0.0)
    with pytest.raises(ThinkfastError, match="one shape"):
        nce_loss(image, text[:2])
    with pytest.raises(ThinkfastError, match=r"\(B, M\)"):
        distillation_loss(torch.zeros(3, 3), torch.zeros(3, 2))


# ----------------------------------------------------------------- DDP (2 gloo processes on loopback)

DDP_CASES = (([2, 2], "mean"), ([3, 1], "sum"))  # even batches; an uneven last batch


def _worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for case, (sizes, reduction) in enumerate(DDP_CASES):
            torch.manual_seed(case)
            image_all, text_all = torch.randn(sum(sizes), 4), torch.randn(sum(sizes), 4)
            start = sum(sizes[:rank])
            image = image_all[start : start + sizes[rank]].clone().requires_grad_(True)
            text = text_all[start : start + sizes[rank]].clone().requires_grad_(True)
            loss = nce_loss(image, text, temperature=0.5, reduction=reduction)  # type: ignore[arg-type]
            loss.backward()
            # plain lists: no shared-memory handles that die with this process
            queue.put((case, rank, float(loss.detach()), image.grad.tolist(), text.grad.tolist()))
    finally:
        dist.destroy_process_group()


def test_nce_under_ddp_equals_the_global_batch_loss_and_gradient() -> None:
    """Two workers with 2 + 2 pairs (mean) and 3 + 1 pairs (sum) give the single-process
    loss and exactly its gradient on each worker's own embeddings."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results: dict[tuple[int, int], tuple] = {}
    for _ in range(2 * len(DDP_CASES)):
        case, rank, loss, gi, gt = queue.get(timeout=300)
        results[(case, rank)] = (loss, torch.tensor(gi), torch.tensor(gt))
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0

    world = 2
    for case, (sizes, reduction) in enumerate(DDP_CASES):
        torch.manual_seed(case)
        image = torch.randn(sum(sizes), 4).requires_grad_(True)
        text = torch.randn(sum(sizes), 4).requires_grad_(True)
        full = nce_loss(image, text, temperature=0.5, reduction=reduction)  # type: ignore[arg-type]
        full.backward()
        losses = [results[(case, r)][0] for r in range(world)]
        if reduction == "mean":  # DDP averages gradients: the global mean is the mean of the workers' means
            assert sum(losses) / world == pytest.approx(float(full.detach()), rel=1e-5)
            scale = world  # each worker holds d(sum of all workers' losses)/d(own rows); DDP divides by W
        else:
            assert sum(losses) == pytest.approx(float(full.detach()), rel=1e-5)
            scale = 1
        for rank in range(world):
            _, gi, gt = results[(case, rank)]
            start = sum(sizes[:rank])
            torch.testing.assert_close(gi / scale, image.grad[start : start + sizes[rank]], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(gt / scale, text.grad[start : start + sizes[rank]], atol=1e-5, rtol=1e-4)
