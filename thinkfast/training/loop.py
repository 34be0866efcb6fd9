"""The training step and the epoch loop, shared by the in-process trainer and every Ray
Train rank.

:func:`train_step` is one optimizer step (schedule, forward, backward, clipping) and
:func:`run_epochs` the loop around it (resumable counters, per-epoch records, validation,
the ``fail_at_step`` test hook). What differs between the trainers comes in as arguments:
where a step's rows come from (``batches``), and what happens at a checkpoint
(``report``: Ray Train reports one from rank 0; the in-process trainer has none). DDP
(``prepare_model``) only wraps ``objective``; the step does not know whether it is.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np
import torch

from thinkfast.errors import CheckpointError
from thinkfast.training.config import TrainConfig
from thinkfast.training.data import PairBatch, to_pairs
from thinkfast.training.state import LoopState, learning_rate
from thinkfast.utils import fs
from thinkfast.utils.devices import to_device

if TYPE_CHECKING:
    from thinkfast.data.tokenizer import WordTokenizer
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast.training.data import CorpusInfo
    from thinkfast.training.validate import ValidationSet

logger = logging.getLogger(__name__)

# (epoch, first batch index) -> that epoch's decoded batches from that index on
BatchSource = Callable[[int, int], Iterable[Mapping[str, np.ndarray]]]
# (state, metrics) -> None: called on every rank at step checkpoints and epoch ends
Report = Callable[[LoopState, dict[str, Any]], None]

MODEL_KIND = {"slow": "slow", "fast": "fast", "distill": "fast"}  # the model each objective trains


class InjectedFailure(RuntimeError):
    """Raised by the ``fail_at_step`` test hook to simulate a crashing worker."""


# ---------------------------------------------------------------- models


def model_class(objective: str) -> "type[FastModel] | type[SlowModel]":
    if MODEL_KIND[objective] == "slow":
        from thinkfast.models.slow import SlowModel

        return SlowModel
    from thinkfast.models.fast import FastModel

    return FastModel


def check_model_kinds(objective: str, init: str | None, teacher: str | None) -> None:
    """``--init`` is the objective's model kind, ``--teacher`` a slow model: a mix-up fails
    before any data is read (or Ray worker started). A Hugging Face CLIP / SigLIP checkpoint
    (directory or hub id; it has no thinkfast ``config.json``) is a fast model."""
    from thinkfast.models.hf_dual import is_hf_dual_reference

    for name, uri, kind in (("--teacher", teacher, "slow"), ("--init", init, MODEL_KIND[objective])):
        if not uri:
            continue
        if is_hf_dual_reference(uri):
            if kind == "fast":
                continue
            if not (fs.is_s3(uri) or os.path.exists(fs.strip_scheme(uri))):
                raise CheckpointError(f"{name} {uri} is not a model directory (no such path; a hub id can only "
                                      f"name a CLIP / SigLIP fast model)")
            raise CheckpointError(f"{name} {uri} is a Hugging Face dual encoder (a fast model), not a {kind} "
                                  f"model (objective {objective})")
        try:
            saved_kind = fs.read_json(fs.join(uri, "config.json")).get("thinkfast_model")
        except FileNotFoundError as exc:
            raise CheckpointError(f"{name} {uri} is not a model directory (no config.json)") from exc
        if saved_kind != kind:
            raise CheckpointError(f"{name} {uri} is not a {kind} model (objective {objective})")


def image_size_for(objective: str, config: TrainConfig, init: str | None) -> int:
    """The input size of the model to be trained (the init model's, else the preset's):
    what the data path decodes every image to. A CLIP / SigLIP init's is its processor's
    crop size (its encoder renormalises the decoded pixels to the checkpoint's own)."""
    if init:
        from thinkfast.models.hf_dual import is_hf_dual_reference, read_hf_dual_config

        if is_hf_dual_reference(init):
            return read_hf_dual_config(init).image_size
        return int(fs.read_json(fs.join(init, "config.json"))["config"]["image_size"])
    from thinkfast.models.config import fast_preset, slow_preset

    preset = slow_preset(config.preset) if MODEL_KIND[objective] == "slow" else fast_preset(config.preset)
    return preset.image_size


def build_tokenizer(config: TrainConfig, info: "CorpusInfo", init: str | None,
                    objective: str = "slow") -> "WordTokenizer | None":
    """A word vocabulary from the train split's captions (saved with the model) for presets
    whose model has none of its own (tiny, small, photo's slow model). None for an init
    model or a Hugging Face text tower / tokenizer (paper; photo's fast model)."""
    if init or config.preset == "paper":
        return None
    from thinkfast.models.config import fast_preset

    if MODEL_KIND[objective] == "fast" and fast_preset(config.preset).text.kind == "hf":
        return None
    from thinkfast.data.tokenizer import WordTokenizer

    return WordTokenizer.build(info.train_captions, min_count=config.min_word_count)


def build_model(objective: str, config: TrainConfig, *, tokenizer: "WordTokenizer | None" = None,
                init: str | None = None, restored_dir: str | None = None) -> "FastModel | SlowModel":
    """Restored weights, else the init checkpoint, else a fresh preset seeded by ``config.seed``."""
    cls = model_class(objective)
    if restored_dir:
        return cls.from_pretrained(restored_dir)
    if init:
        return cls.from_pretrained(init)
    torch.manual_seed(config.seed)
    return cls.from_preset(config.preset, tokenizer=tokenizer)


def load_teacher(uri: str) -> "SlowModel":
    """The frozen distillation teacher (eval mode, no gradients)."""
    from thinkfast.models.slow import SlowModel

    teacher = SlowModel.from_pretrained(uri)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def torch_threads(config: TrainConfig, world_size: int) -> int:
    """Intra-op threads of one rank: the config's, else the cores shared by the ranks."""
    return config.torch_threads or max(1, (os.cpu_count() or 1) // max(world_size, 1))


def steps_per_epoch(train_rows: int, workers: int, rows_per_step: int) -> int:
    """Steps every rank does per epoch (equal on all ranks: DDP needs it)."""
    from thinkfast.errors import ThinkfastError

    steps = (train_rows // workers) // rows_per_step
    if steps < 1:
        raise ThinkfastError(f"train split has {train_rows} rows: too few for {workers} workers x "
                             f"{rows_per_step} rows per step; lower --batch-size or --workers")
    return steps


# ---------------------------------------------------------------- the step and the loop


def train_step(objective: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: PairBatch, *, step: int,
               total_steps: int, config: TrainConfig, device: torch.device | None = None) -> tuple[float, dict[str, float]]:
    """One optimizer step of ``objective`` (plain or DDP-wrapped) on ``batch``; returns the
    loss and its parts. The learning rate is a pure function of ``step``."""
    inner = getattr(objective, "module", objective)
    model = inner.model
    device = device or torch.device("cpu")
    lr = learning_rate(step, total_steps, config.lr, config.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # pinned + non_blocking on CUDA (thinkfast.utils.devices.to_device); the same tensor on CPU
    pixels = to_device(batch.pixels, device)
    visual = pixels if batch.trunk is None else {k: to_device(v, device) for k, v in batch.trunk.items()}
    enc = model.tokenize(batch.captions)
    input_ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    scores = batch.teacher_scores
    if scores is None and getattr(inner, "teacher", None) is not None:
        tokens = None if batch.teacher_tokens is None else batch.teacher_tokens.to(device)
        scores = inner.teacher_matrix(pixels, batch.captions, tokens=tokens)
    if scores is not None:
        scores = scores.to(device)
    loss, stats = objective(visual, input_ids, mask, scores)
    loss = loss * batch.weight
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return float(loss.detach()), stats


def maybe_fail(config: TrainConfig, step: int, rank: int) -> None:
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


def run_epochs(objective: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
               state: LoopState, *, steps_per_epoch: int, batches: BatchSource, device: torch.device | None = None,
               rank: int = 0, validation: "ValidationSet | None" = None, report: Report | None = None,
               on_step: "Callable[[int, int], None] | None" = None) -> LoopState:
    """Train from ``state`` (fresh, or restored mid-epoch) to ``config.epochs``; appends one
    record per epoch to ``state.history`` and every step's loss to ``state.losses``.
    ``on_step(done, total)`` is told after every step (a progress line; must be cheap)."""
    model = getattr(objective, "module", objective).model
    device = device or torch.device("cpu")
    total_steps = steps_per_epoch * config.epochs
    while state.epoch < config.epochs:
        epoch = state.epoch
        model.train()
        losses = state.epoch_losses  # non-empty only when resuming mid-epoch
        parts: dict[str, list[float]] = {}
        skip = state.step_in_epoch  # resumed mid-epoch: this pass only covers the rest
        started = time.perf_counter()
        for index, raw in enumerate(batches(epoch, skip), start=skip):
            if index >= steps_per_epoch:
                break
            batch = to_pairs(raw, config.seed, epoch, rank)
            for key, reason in batch.rejected.items():
                if key not in state.rejected:
                    logger.warning("rank %d: skipping row %s: %s", rank, key, reason)
                state.rejected[key] = reason
            loss, stats = train_step(objective, optimizer, batch, step=state.step, total_steps=total_steps,
                                     config=config, device=device)
            losses.append(loss)
            state.losses.append(loss)
            for name, value in stats.items():
                parts.setdefault(name, []).append(value)
            state.step += 1
            state.step_in_epoch += 1
            if on_step is not None:
                on_step(state.step, total_steps)
            maybe_fail(config, state.step, rank)
            at_epoch_end = state.step_in_epoch >= steps_per_epoch
            if report and config.checkpoint_every_steps and state.step % config.checkpoint_every_steps == 0 \
                    and not at_epoch_end:
                report(state, {"kind": "step", "step": state.step, "epoch": epoch, "train_loss": float(np.mean(losses))})
        seconds = max(time.perf_counter() - started, 1e-9)
        record = {
            "epoch": epoch + 1,
            "step": state.step,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            **{f"train_{k}": float(np.mean(v)) for k, v in parts.items()},
            "epoch_seconds": round(seconds, 3),
            "steps_per_second": round((state.step_in_epoch - skip) / seconds, 4),
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
        if report:
            report(state, {"kind": "epoch", "rejected": len(state.rejected), **record})
    return state
