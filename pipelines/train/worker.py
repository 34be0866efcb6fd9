"""The per-worker training loop that Ray Train runs on every rank.

One function serves the three objectives. Each rank: builds (or restores) the model,
wraps the objective with ``prepare_model`` (DDP over gloo on CPU, nccl on GPU), streams
its shard of the decoded train split, and at every epoch end (and every N steps, if asked)
reports a checkpoint from rank 0 (Ray Train V2 keeps metrics only when they come with a
checkpoint). After a crash, Ray Train restarts the worker group and ``get_checkpoint()``
hands back the newest checkpoint: the loop continues from its step, not from zero.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from thinkfast_pipelines.train.config import TrainConfig
from thinkfast_pipelines.train.state import (
    MODEL_DIR,
    LoopState,
    learning_rate,
    load_optimizer_state,
    load_state,
    save_checkpoint,
)

logger = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised by the ``fail_at_step`` test hook to simulate a crashing worker."""


@dataclass
class PairBatch:
    """One step's pairs on one rank, rejected rows already removed."""

    keys: list[str]  # image key of each pair
    captions: list[str]  # the caption of each pair (sampled for this epoch)
    pixels: torch.Tensor  # (B, 3, S, S) or (B, F, 3, S, S)
    teacher_scores: torch.Tensor | None  # (B, B) precomputed h(x_j, y_i), or None
    rejected: dict[str, str]  # key -> reason of rows skipped in this batch
    weight: float = 1.0  # 0.0 when every row was rejected: the step still runs (DDP's collectives) but learns nothing


def model_class(objective: str) -> type:
    if objective == "slow":
        from thinkfast.models.slow import SlowModel

        return SlowModel
    from thinkfast.models.fast import FastModel

    return FastModel


def build_model(loop_config: dict[str, Any], restored_dir: str | None) -> torch.nn.Module:
    """Restored weights, else the init checkpoint (distill: a trained fast model), else a fresh preset."""
    cls = model_class(loop_config["objective"])
    config = TrainConfig(**loop_config["config"])
    if restored_dir:
        return cls.from_pretrained(os.path.join(restored_dir, MODEL_DIR))
    if loop_config.get("init"):
        return cls.from_pretrained(loop_config["init"])
    torch.manual_seed(config.seed)
    return cls.from_preset(config.preset, tokenizer=loop_config.get("tokenizer"))


def load_teacher(uri: str) -> torch.nn.Module:
    from thinkfast.models.slow import SlowModel

    teacher = SlowModel.from_pretrained(uri)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def to_pairs(batch: dict[str, np.ndarray], seed: int, epoch: int, rank: int) -> PairBatch:
    """Numpy batch from the shard -> tensors; grouped rows (hard negatives / teacher-score
    blocks: ``pixels`` (G, ...) per row, JSON lists per row) are flattened to pairs."""
    import json

    from thinkfast_pipelines.train.data import sample_captions

    grouped = "group_size" in batch
    if grouped:
        keys = [k for row in batch["key"] for k in json.loads(row)]
        caps = [c for row in batch["captions"] for c in json.loads(row)]
        rejects = [r for row in batch["reject"] for r in json.loads(row)]
        pixels = np.concatenate(list(batch["pixels"]), axis=0)
        caps_json = [json.dumps(c) for c in caps]
    else:
        keys = [str(k) for k in batch["key"]]
        caps_json = [str(c) for c in batch["captions"]]
        rejects = [str(r) for r in batch["reject"]]
        pixels = np.asarray(batch["pixels"])
    keep = [i for i, r in enumerate(rejects) if not r]
    rejected = {keys[i]: rejects[i] for i, r in enumerate(rejects) if r}
    weight = 1.0
    if not keep:  # all rejected: keep the (zero) rows so this rank still joins the step, at weight 0
        keep, weight = list(range(len(keys))), 0.0
        caps_json = [json.dumps(["[UNK]"]) for _ in keys]
    scores = None
    if "scores" in batch:
        if len(batch["scores"]) != 1:
            raise ValueError("teacher-score blocks must be iterated one block per step")
        full = torch.as_tensor(np.asarray(batch["scores"][0], dtype=np.float32))  # (G, G)
        idx = torch.as_tensor(keep, dtype=torch.long)
        scores = full[idx][:, idx]  # (B, B)
    captions = sample_captions([caps_json[i] for i in keep], [keys[i] for i in keep], seed, epoch)
    return PairBatch(
        keys=[keys[i] for i in keep],
        captions=captions,
        pixels=torch.as_tensor(pixels[keep], dtype=torch.float32),
        teacher_scores=scores,
        rejected=rejected,
        weight=weight,
    )


def _maybe_fail(config: TrainConfig, step: int, rank: int) -> None:
    """TEST HOOK (``fail_at_step`` + ``fail_marker``): rank 0 raises once at that step.
    The marker file makes it fire only on the first attempt, like a transient fault."""
    if not config.fail_at_step or rank != 0 or step != config.fail_at_step:
        return
    if os.path.exists(config.fail_marker):
        return
    with open(config.fail_marker, "w", encoding="utf-8") as f:
        f.write(f"failed at step {step}\n")
    logger.warning("test hook: injecting a worker failure at step %d", step)
    raise InjectedFailure(f"injected failure at step {step} (fail_at_step test hook)")


def _batches(config: TrainConfig, loop_config: dict[str, Any], epoch: int) -> Iterator[dict[str, np.ndarray]]:
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    rows_per_step = loop_config.get("rows_per_step", config.batch_size)
    # the buffer is counted in images: grouped rows (G images each) need G times fewer
    buffer = config.shuffle_buffer // max(1, int(loop_config.get("images_per_row", 1)))
    return shard.iter_batches(
        batch_size=rows_per_step,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=buffer if buffer >= 2 else None,
        local_shuffle_seed=config.seed * 1000 + epoch if config.shuffle_buffer else None,
    )


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point (``train_loop_config`` is ``loop_config``)."""
    import ray.train
    import ray.train.torch

    from thinkfast_pipelines.train.objectives import build_objective
    from thinkfast_pipelines.train.validate import ValidationSet

    config = TrainConfig(**loop_config["config"])
    objective_kind: str = loop_config["objective"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = config.torch_threads or max(1, (os.cpu_count() or 1) // max(world, 1))
    torch.set_num_threads(threads)
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    total_steps = steps_per_epoch * config.epochs

    state, model, optimizer_state = _restore_or_build(loop_config, rank)
    state.starts.append(state.step)
    teacher = load_teacher(loop_config["teacher"]) if loop_config.get("teacher") else None
    objective = build_objective(objective_kind, model, teacher, config)
    objective = ray.train.torch.prepare_model(objective)
    device = ray.train.torch.get_device()
    if teacher is not None:
        teacher.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    validation = ValidationSet.collect(objective_kind, config, bool(loop_config.get("has_val"))) if rank == 0 else None
    extra = {"objective": objective_kind, "config": config.to_dict(), "steps_per_epoch": steps_per_epoch}

    while state.epoch < config.epochs:
        epoch = state.epoch
        model.train()
        losses = state.epoch_losses  # non-empty only when resuming mid-epoch
        parts: dict[str, list[float]] = {}
        skip = state.step_in_epoch  # resumed mid-epoch: this pass only covers the rest
        started = time.perf_counter()
        for index, raw in enumerate(_batches(config, loop_config, epoch)):
            if index >= steps_per_epoch:
                break
            if index < skip:
                continue
            batch = to_pairs(raw, config.seed, epoch, rank)
            for key, reason in batch.rejected.items():
                if key not in state.rejected:
                    logger.warning("rank %d: skipping row %s: %s", rank, key, reason)
                state.rejected[key] = reason
            loss, stats = _step(objective, model, optimizer, batch, config, device, state.step, total_steps)
            losses.append(loss)
            for name, value in stats.items():
                parts.setdefault(name, []).append(value)
            state.step += 1
            state.step_in_epoch += 1
            _maybe_fail(config, state.step, rank)
            at_epoch_end = state.step_in_epoch >= steps_per_epoch
            if config.checkpoint_every_steps and state.step % config.checkpoint_every_steps == 0 and not at_epoch_end:
                _report(rank, model, optimizer, state, extra,
                        {"kind": "step", "step": state.step, "epoch": epoch, "train_loss": float(np.mean(losses))})
        record = {
            "epoch": epoch + 1,
            "step": state.step,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            **{f"train_{k}": float(np.mean(v)) for k, v in parts.items()},
            "epoch_seconds": round(time.perf_counter() - started, 3),
            "steps_per_second": round((state.step_in_epoch - skip) / max(time.perf_counter() - started, 1e-9), 4),
        }
        if validation is not None:
            model.eval()
            record.update(validation.evaluate(model, device))
        state.epoch += 1
        state.step_in_epoch = 0
        state.epoch_losses = []
        state.history.append(record)
        if rank == 0:
            logger.info("epoch %d/%d: %s", epoch + 1, config.epochs, record)
        _report(rank, model, optimizer, state, extra, {"kind": "epoch", "rejected": len(state.rejected), **record})
    return {"history": state.history, "step": state.step, "starts": state.starts, "rejected": state.rejected}


def _restore_or_build(loop_config: dict[str, Any], rank: int) -> tuple[LoopState, torch.nn.Module, dict | None]:
    """From Ray Train's newest checkpoint when there is one (a restart, or --resume), else fresh."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return LoopState(), build_model(loop_config, None), None
    with checkpoint.as_directory() as directory:
        state, _ = load_state(directory)
        model = build_model(loop_config, directory)
        optimizer_state = load_optimizer_state(directory)
    logger.info("rank %d: resuming from checkpoint at step %d (epoch %d, %d steps into it)",
                rank, state.step, state.epoch, state.step_in_epoch)
    return state, model, optimizer_state


def _step(objective: torch.nn.Module, model: Any, optimizer: torch.optim.Optimizer, batch: PairBatch,
          config: TrainConfig, device: torch.device, step: int, total_steps: int) -> tuple[float, dict[str, float]]:
    lr = learning_rate(step, total_steps, config.lr, config.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    pixels = batch.pixels.to(device)
    enc = model.tokenize(batch.captions)
    input_ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    scores = batch.teacher_scores
    inner = getattr(objective, "module", objective)
    if scores is None and getattr(inner, "teacher", None) is not None:
        scores = inner.teacher_matrix(pixels, batch.captions)
    if scores is not None:
        scores = scores.to(device)
    loss, stats = objective(pixels, input_ids, mask, scores)
    loss = loss * batch.weight
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return float(loss.detach()), stats


def _report(rank: int, model: Any, optimizer: torch.optim.Optimizer, state: LoopState, extra: dict[str, Any],
            metrics: dict[str, Any]) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="thinkfast-ckpt-") as tmp:
        save_checkpoint(tmp, model, optimizer, state, extra)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
