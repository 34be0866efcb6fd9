"""The in-process trainer: one process, no Ray, the same step, data order and records as
one Ray Train worker.

``fit`` decodes the train split into memory (so it suits corpora that fit in RAM: the
generated ones, benchmarks, notebooks, tests) and runs :func:`thinkfast.training.loop.run_epochs`
over :class:`thinkfast.training.data.ShardRows`, exactly what a single Ray Train worker
runs with ``data_order="permutation"``: for the same config, seed and init, the two give
the same per-step losses. Ray Train (``thinkfast_pipelines.train``) adds what one process
cannot: DDP over several workers, streaming a corpus too big to hold, checkpoints in
``--storage`` with restarts and ``--resume``, precomputed teacher scores and hard-negative
batches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from thinkfast.errors import ThinkfastError
from thinkfast.training.config import TrainConfig, build_config
from thinkfast.utils import fs
from thinkfast.utils.paths import user_paths

if TYPE_CHECKING:
    from thinkfast.training.data import CorpusInfo

logger = logging.getLogger(__name__)

TRAINING_FILE = "training.json"  # written next to the final model: config + per-epoch history


@dataclass(frozen=True)
class TrainResult:
    """What a training run returns (and what ``training.json`` in ``out`` holds)."""

    objective: str  # slow | fast | distill
    out: str  # the final model directory (what embed / index / eval / serve load)
    run_dir: str  # the Ray Train run directory under --storage ("" for the in-process trainer)
    history: list[dict[str, Any]]  # one record per epoch: epoch, step, train_loss, val_r1, ...
    steps: int  # optimizer steps done in total (across restarts)
    starts: list[int]  # the step each attempt started at ([0] normally; [0, n] after one restart)
    rejected: dict[str, str] = field(default_factory=dict)  # key -> reason of rows that failed to decode
    seconds: float = 0.0  # wall time of the whole run (driver view)
    config: dict[str, Any] = field(default_factory=dict)  # the merged TrainConfig
    losses: list[float] = field(default_factory=list)  # rank 0's loss at every step: the loss curve
    trainer: str = "ray"  # ray | inprocess

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "out": self.out, "run_dir": self.run_dir, "history": self.history,
                "steps": self.steps, "starts": self.starts, "rejected": self.rejected,
                "seconds": round(self.seconds, 3), "config": self.config, "losses": self.losses,
                "trainer": self.trainer}


def train_rows(info: "CorpusInfo", config: TrainConfig) -> int:
    """Rows of the train split as the data path yields them (one per caption with ``all``)."""
    return len(info.train_captions) if config.caption_sampling == "all" else info.counts["train"]


@user_paths("corpus", "out", models=("teacher", "init"))
def fit(objective: str, corpus: str, out: str, config: TrainConfig | None = None, *, teacher: str | None = None,
        init: str | None = None, device: str | None = None, **overrides: Any) -> TrainResult:
    """Train ``objective`` (slow | fast | distill) on ``corpus`` in this process; save the
    model and ``training.json`` to ``out`` (local or s3://).

    ``config``: a TrainConfig, or None to build one from ``overrides`` (TrainConfig fields,
    with preset defaults, as the Ray functions do). ``teacher``: the frozen slow model of
    distill (scored online per batch). ``init``: start from a saved model of the objective's
    kind instead of a fresh preset. ``device``: cpu / cuda (default: cuda when
    ``config.use_gpu``). ``config.workers`` is ignored: this is one process."""
    from thinkfast.training.data import ShardRows, inspect_corpus, read_split
    from thinkfast.training.loop import (
        build_model,
        build_tokenizer,
        check_model_kinds,
        image_size_for,
        load_teacher,
        make_optimizer,
        run_epochs,
        steps_per_epoch,
        torch_threads,
    )
    from thinkfast.training.frozen import cache_frozen, freeze_text_tower
    from thinkfast.training.objectives import build_objective
    from thinkfast.training.state import LoopState
    from thinkfast.training.validate import ValidationSet

    if config is None:
        config = build_config(overrides)
    elif overrides:
        raise ThinkfastError(f"fit: pass a TrainConfig or keyword overrides, not both ({sorted(overrides)})")
    if objective not in ("slow", "fast", "distill"):
        raise ThinkfastError(f"unknown objective {objective!r}; choose slow, fast or distill")
    if objective == "distill" and not teacher:
        raise ThinkfastError("in-process distill needs teacher (a slow model dir)")
    started = time.perf_counter()
    check_model_kinds(objective, init, teacher)
    info = inspect_corpus(corpus)
    image_size = image_size_for(objective, config, init)
    tokenizer = build_tokenizer(config, info, init, objective)
    explode = config.caption_sampling == "all"
    rows = ShardRows(read_split(info, "train", image_size, config.num_frames, explode))
    steps = steps_per_epoch(train_rows(info, config), 1, config.batch_size)
    where = torch.device(device or ("cuda" if config.use_gpu else "cpu"))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads(config, 1))
    try:
        # the order of what follows is a Ray Train worker's: the seeded init comes first
        model = build_model(objective, config, tokenizer=tokenizer, init=init)
        if config.freeze_text and objective != "slow":
            freeze_text_tower(model)
        state = LoopState()
        state.starts.append(state.step)
        frozen = load_teacher(teacher) if teacher else None
        if config.cache_frozen:
            cache_frozen(rows, model, frozen)
        module = build_objective(objective, model, frozen, config).to(where)
        if frozen is not None:
            frozen.to(where)
        optimizer = make_optimizer(model, config)
        val_rows = config.val_rows_for(objective)
        validation = None
        if val_rows and info.counts.get("val", 0):
            val = read_split(info, "val", image_size, config.num_frames, limit=val_rows)
            validation = ValidationSet.from_batches(objective, [val], val_rows)
        logger.info("%s (in-process): %d epochs x %d steps of %d rows on %s", objective, config.epochs, steps,
                    config.batch_size, where)
        run_epochs(module, optimizer, config, state, steps_per_epoch=steps, device=where, validation=validation,
                   batches=lambda epoch, start: rows.batches(epoch, config.batch_size, config.seed, start))
    finally:
        torch.set_num_threads(previous_threads)
    model.eval()
    model.save_pretrained(out)
    result = TrainResult(objective=objective, out=out, run_dir="", history=state.history, steps=state.step,
                         starts=state.starts, rejected=state.rejected, seconds=time.perf_counter() - started,
                         config=config.to_dict(), losses=state.losses, trainer="inprocess")
    fs.write_json(fs.join(out, TRAINING_FILE), result.to_dict())
    logger.info("%s (in-process): done in %.1f s, %d steps; model in %s", objective, result.seconds, result.steps, out)
    return result
