"""The per-worker training loop that Ray Train runs on every rank.

The step and the epoch loop are the library's (``thinkfast.training.loop``); this module
adds only what Ray Train brings: the rank's model wrapped by ``prepare_model`` (DDP over
gloo on CPU, nccl on GPU), its shard of the decoded train split, and checkpoints reported
from rank 0 at every epoch end (and every N steps, if asked; Ray Train V2 keeps metrics
only when they come with a checkpoint). After a crash, Ray Train restarts the worker group
and ``get_checkpoint()`` hands back the newest checkpoint: the loop continues from its
step, not from zero.

Data order: with ``data_order="permutation"`` (plain pair rows, a split cached in the object
store) every rank reads the whole decoded train split once and holds it sorted by key;
step ``s`` takes rows ``[s*W*B, (s+1)*W*B)`` of the (seed, epoch) permutation and rank
``r`` its ``r``-th block of ``B``. One worker therefore sees the in-process trainer's
batches, and with ``W`` workers which rank trains on which row is a function of
(seed, epoch) too, not of Ray Data's scheduling; the price is one copy of the split per
rank. Grouped rows (hard negatives, teacher-score blocks), and ``stream``, go through
``streaming_split`` shards and Ray Data's local shuffle buffer (not reproducible).
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import torch

from thinkfast.training.config import TrainConfig
from thinkfast.training.data import ShardRows
from thinkfast.training.frozen import cache_frozen, freeze_text_tower
from thinkfast.training.loop import (
    build_model,
    load_teacher,
    make_optimizer,
    run_epochs,
    torch_threads,
)
from thinkfast.training.state import MODEL_DIR, LoopState, load_optimizer_state, load_state, save_checkpoint
from thinkfast.training.validate import ValidationSet

from thinkfast_pipelines.ray_progress import ProgressReporter

logger = logging.getLogger(__name__)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point (``train_loop_config`` is ``loop_config``)."""
    import ray.train
    import ray.train.torch

    from thinkfast.training.objectives import build_objective

    config = TrainConfig(**loop_config["config"])
    objective_kind: str = loop_config["objective"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(torch_threads(config, world))
    steps_per_epoch: int = loop_config["steps_per_epoch"]

    state, model, optimizer_state = _restore_or_build(loop_config, config, rank)
    if config.freeze_text and objective_kind != "slow":
        freeze_text_tower(model)
    state.starts.append(state.step)
    teacher = load_teacher(loop_config["teacher"]) if loop_config.get("teacher") else None
    objective = build_objective(objective_kind, model, teacher, config)
    objective = ray.train.torch.prepare_model(objective)
    device = ray.train.torch.get_device()
    if teacher is not None:
        teacher.to(device)
    optimizer = make_optimizer(model, config)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    validation = None
    if rank == 0 and loop_config.get("has_val"):
        batches = ray.train.get_dataset_shard("val").iter_batches(batch_size=256, batch_format="numpy")
        validation = ValidationSet.from_batches(objective_kind, batches, config.val_rows_for(objective_kind))
    extra = {"objective": objective_kind, "config": config.to_dict(), "steps_per_epoch": steps_per_epoch}

    def report(state: LoopState, metrics: dict[str, Any]) -> None:
        _report(rank, model, optimizer, state, extra, metrics)

    # rank 0 tells the driver's progress line how far training is (a no-op without one)
    progress = ProgressReporter(loop_config.get("progress") if rank == 0 else None)
    run_epochs(objective, optimizer, config, state, steps_per_epoch=steps_per_epoch, device=device, rank=rank,
               validation=validation, report=report, batches=_batch_source(config, loop_config, model, teacher),
               on_step=progress)
    return {"history": state.history, "step": state.step, "starts": state.starts, "rejected": state.rejected,
            "losses": state.losses}


def _batch_source(config: TrainConfig, loop_config: dict[str, Any], model: torch.nn.Module,
                  teacher: torch.nn.Module | None):
    """(epoch, start) -> batches: the held, permuted shard (with what ``cache_frozen``
    precomputes), or the streamed one."""
    import ray.train

    from thinkfast_pipelines.train.data import shard_batches

    rows_per_step = int(loop_config.get("rows_per_step", config.batch_size))
    images_per_row = int(loop_config.get("images_per_row", 1))
    if loop_config.get("data_order", config.data_order) == "permutation":
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        whole = ray.train.get_dataset_shard("train")  # not split: every rank gets the whole split
        rows = ShardRows.concat(whole.iter_batches(batch_size=1024, batch_format="numpy"))
        logger.info("rank %d/%d: holding the %d train rows (permutation order)", rank, world, len(rows))
        if config.cache_frozen:
            cache_frozen(rows, model, teacher)
        return lambda epoch, start: rows.batches(epoch, rows_per_step, config.seed, start, rank, world)
    return lambda epoch, start: shard_batches(config, rows_per_step, images_per_row, epoch, start)


def _restore_or_build(loop_config: dict[str, Any], config: TrainConfig,
                      rank: int) -> tuple[LoopState, torch.nn.Module, dict | None]:
    """From Ray Train's newest checkpoint when there is one (a restart, or --resume), else fresh."""
    import ray.train

    objective = loop_config["objective"]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        model = build_model(objective, config, tokenizer=loop_config.get("tokenizer"), init=loop_config.get("init"))
        return LoopState(), model, None
    with checkpoint.as_directory() as directory:
        state, _ = load_state(directory)
        model = build_model(objective, config, restored_dir=os.path.join(directory, MODEL_DIR))
        optimizer_state = load_optimizer_state(directory)
    logger.info("rank %d: resuming from checkpoint at step %d (epoch %d, %d steps into it)",
                rank, state.step, state.epoch, state.step_in_epoch)
    return state, model, optimizer_state


def _report(rank: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: LoopState,
            extra: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="thinkfast-ckpt-") as tmp:
        save_checkpoint(tmp, model, optimizer, state, extra)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
