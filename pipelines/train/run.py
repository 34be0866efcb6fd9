"""``thinkfast train-slow | train-fast | distill``: Ray Train over the corpus Parquet.

* ``train-slow``: L_CA on (image, caption) pairs (the cross-attention captioning scorer).
* ``train-fast``: L_DE (NCE over in-batch negatives), the dual-encoder baseline.
* ``distill``: L_DE + alpha * L_distill, a frozen slow teacher (``--teacher``) teaching the
  fast student its softmax over B_i = the batch's other images (with ``--hard-negatives``,
  batches are built from fast-index neighbours so B_i holds hard negatives), scored online
  or read from ``--teacher-scores`` (the precompute job, ``thinkfast_pipelines.train.teacher_scores``).

The three share one driver (this module), one worker loop (``worker.train_loop_per_worker``,
which runs the library's ``thinkfast.training.loop.run_epochs``: the in-process trainer
``thinkfast.training.fit`` runs the same step) and one data path (``data``). Checkpoints (``save_pretrained`` model + optimizer + step state) go to
``--storage`` (local or s3://) every epoch and every ``--checkpoint-every-steps``; ``--resume``
continues the newest run there; a crashed worker costs one restart (``--max-failures``).
The final model directory ``--out`` (local or s3://) is what embed / index / eval / serve load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from thinkfast.errors import CheckpointError, ThinkfastError
from thinkfast.training.config import DISTILL_FIELDS, PRESET_DEFAULTS, TrainConfig, build_config
from thinkfast.training.fit import TRAINING_FILE, TrainResult, train_rows
from thinkfast.training.loop import build_tokenizer, check_model_kinds, image_size_for, steps_per_epoch
from thinkfast.utils import fs
from thinkfast.utils.options import add_config_arguments, given
from thinkfast.utils.paths import user_paths

if TYPE_CHECKING:
    from thinkfast.training.data import CorpusInfo

logger = logging.getLogger(__name__)

COMMAND_OBJECTIVE = {"train-slow": "slow", "train-fast": "fast", "distill": "distill"}
__all__ = ["TRAINING_FILE", "TrainResult", "distill", "run_training", "train_fast", "train_slow"]


# ---------------------------------------------------------------- public Python API


@user_paths("corpus", "out", "storage", "config_file", models=("init",))
def train_slow(corpus: str, out: str, *, storage: str | None = None, resume: bool = False,
               config_file: str | None = None, run_name: str | None = None, init: str | None = None,
               **overrides: Any) -> TrainResult:
    """Train the slow cross-attention model (L_CA). ``overrides`` are TrainConfig fields.
    ``init``: start from a saved slow model (e.g. an architecture variant such as coarse-only
    FPN levels, saved untrained) instead of the preset's fresh one."""
    config = build_config(overrides, config_file)
    return run_training("slow", corpus, out, config, storage=storage, resume=resume, run_name=run_name, init=init)


@user_paths("corpus", "out", "storage", "config_file", models=("init",))
def train_fast(corpus: str, out: str, *, storage: str | None = None, resume: bool = False,
               config_file: str | None = None, run_name: str | None = None, init: str | None = None,
               **overrides: Any) -> TrainResult:
    """Train the fast dual encoder with L_DE alone (the baseline)."""
    config = build_config(overrides, config_file)
    return run_training("fast", corpus, out, config, storage=storage, resume=resume, run_name=run_name, init=init)


@user_paths("corpus", "out", "teacher_scores", "hard_negatives", "embeddings", "storage", "config_file", models=("teacher", "init"))
def distill(corpus: str, out: str, teacher: str | None = None, *, teacher_scores: str | None = None,
            hard_negatives: str | None = None, embeddings: str | None = None, init: str | None = None,
            storage: str | None = None, resume: bool = False, config_file: str | None = None,
            run_name: str | None = None, **overrides: Any) -> TrainResult:
    """Distil a frozen slow teacher into the fast model: L_DE + alpha * L_distill.

    ``teacher``: slow model dir (scores computed online over each batch), or
    ``teacher_scores``: the output of ``thinkfast_pipelines.train.teacher_scores.precompute_teacher_scores``
    (batches are its blocks; no teacher forward at all). ``hard_negatives``: a fast index URI
    (with ``embeddings``, the embed output holding its vectors) to build batches from index
    neighbours. ``init``: start the student from a trained fast model, or a Hugging Face
    CLIP / SigLIP checkpoint (directory or hub id), instead of scratch."""
    config = build_config(overrides, config_file)
    if not teacher and not teacher_scores:
        raise ThinkfastError("distill needs --teacher (a slow model dir) or --teacher-scores (precomputed)")
    if teacher_scores and hard_negatives:
        raise ThinkfastError("--hard-negatives applies to online distillation; precompute them into --teacher-scores")
    if hard_negatives and not embeddings:
        raise ThinkfastError("--hard-negatives needs --embeddings (the embed output with the index's vectors)")
    return run_training("distill", corpus, out, config, storage=storage, resume=resume, run_name=run_name,
                        init=init, teacher=teacher, teacher_scores=teacher_scores,
                        hard_negatives=hard_negatives, embeddings=embeddings)


# ---------------------------------------------------------------- driver


def scaling_options(config: TrainConfig, visible: float | None = None) -> tuple[dict[str, Any], str]:
    """(``ScalingConfig`` kwargs, torch backend) for ``config``: ``--workers`` workers with
    ``--cpus-per-worker`` CPUs each and, with ``--gpu``, one GPU each (nccl; Ray Train sets
    each worker's ``CUDA_VISIBLE_DEVICES`` and ``get_device()`` returns its GPU). Under the
    test override (``THINKFAST_GPU_RESOURCE``) the GPU is that custom resource and the
    workers stay on CPU with gloo. ``visible``: GPUs Ray reports (default: asked of Ray)."""
    from thinkfast.utils.devices import RAY_GPU, gpu_resource, require_gpus

    from thinkfast_pipelines.ray_utils import cluster_gpus

    if not config.use_gpu:
        return {"num_workers": config.workers, "use_gpu": False,
                "resources_per_worker": {"CPU": config.cpus_per_worker}}, "gloo"
    resource = gpu_resource()
    require_gpus(cluster_gpus(resource) if visible is None else visible, resource)
    if resource == RAY_GPU:  # Ray Train adds GPU: 1 per worker to these
        return {"num_workers": config.workers, "use_gpu": True,
                "resources_per_worker": {"CPU": config.cpus_per_worker}}, "nccl"
    return {"num_workers": config.workers, "use_gpu": False,
            "resources_per_worker": {"CPU": config.cpus_per_worker, resource: 1.0}}, "gloo"


def run_training(objective: str, corpus: str, out: str, config: TrainConfig, *, storage: str | None = None,
                 resume: bool = False, run_name: str | None = None, init: str | None = None,
                 teacher: str | None = None, teacher_scores: str | None = None,
                 hard_negatives: str | None = None, embeddings: str | None = None) -> TrainResult:
    """Build the datasets and the TorchTrainer, fit, copy the final model to ``out``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from thinkfast.training.data import inspect_corpus

    started = time.perf_counter()
    check_model_kinds(objective, init, teacher)
    storage = storage or f"{out.rstrip('/')}-checkpoints"
    # before Ray starts: a corpus that cannot be read or an --out / --storage that cannot be
    # written fails here in seconds with one line, not inside Ray Train's controller
    fs.check_readable(corpus)
    fs.check_writable(out)
    fs.check_writable(storage)
    _start_ray(config)
    scaling, backend = scaling_options(config)  # --gpu on a cluster without GPUs: one line, before any work
    info = inspect_corpus(corpus)
    image_size = image_size_for(objective, config, init)
    tokenizer = build_tokenizer(config, info, init, objective)
    datasets, layout = _datasets(objective, config, info, image_size, teacher_scores, hard_negatives, embeddings)
    name = _run_name(objective, storage, resume, run_name)
    storage_path, storage_fs = _storage(storage)
    loop_config = {"objective": objective, "config": config.to_dict(), "tokenizer": tokenizer, "init": init,
                   "teacher": teacher, "has_val": "val" in datasets, **layout}

    def make_trainer(train_loop_config: dict[str, Any]) -> TorchTrainer:
        return TorchTrainer(
            _train_loop_entry,
            train_loop_config=train_loop_config,
            torch_config=TorchConfig(backend=backend),
            scaling_config=ray.train.ScalingConfig(**scaling),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            ),
            datasets=datasets,
            # permutation: every rank reads the whole split and takes its part of each global batch
            dataset_config=ray.train.DataConfig(
                datasets_to_split=[] if layout["data_order"] == "permutation" else ["train"]),
        )

    logger.info("%s: %d workers, %d epochs x %d steps (%s order), run %s under %s", objective, config.workers,
                config.epochs, layout["steps_per_epoch"], layout["data_order"], name, storage)
    from thinkfast_pipelines.ray_progress import remote_progress

    with remote_progress(f"{objective}: training", unit="step",
                         total=layout["steps_per_epoch"] * config.epochs) as counter:
        result = make_trainer({**loop_config, "progress": counter}).fit()
    if result.checkpoint is None:
        raise ThinkfastError(f"training run {name} finished without a checkpoint")
    summary = result.return_value or {}
    state = _export(result.checkpoint, out)
    train_result = TrainResult(
        objective=objective,
        out=out,
        run_dir=str(result.path),
        history=list(summary.get("history", state.get("history", []))),
        steps=int(summary.get("step", state.get("step", 0))),
        starts=list(summary.get("starts", state.get("starts", []))),
        rejected=dict(summary.get("rejected", state.get("rejected", {}))),
        seconds=time.perf_counter() - started,
        config=config.to_dict(),
        losses=[float(x) for x in summary.get("losses", state.get("losses", []))],
        trainer="ray",
    )
    fs.write_json(fs.join(out, TRAINING_FILE), train_result.to_dict())
    logger.info("%s: done in %.1f s, %d steps; model in %s", objective, train_result.seconds, train_result.steps, out)
    return train_result


def _start_ray(config: TrainConfig) -> None:
    """Join the running Ray, or start a local one with CPUs to spare beyond the workers':
    Ray Data's read and decode tasks need CPUs too, else the pipeline starves silently
    (STACK_NOTES pitfall 1). Ray Data's progress bars are off: epochs are logged instead."""
    import ray
    import ray.data

    from thinkfast_pipelines.ray_utils import init_ray

    if not ray.is_initialized():
        cores = os.cpu_count() or 1
        init_ray(num_cpus=None if os.environ.get("RAY_ADDRESS") else
                 max(cores, int(config.workers * config.cpus_per_worker + 0.999) + 2))
    ray.data.DataContext.get_current().enable_progress_bars = False
    fs.bound_ray_data_retries(ray.data.DataContext.get_current())  # a dead endpoint fails in bounded time


def _train_loop_entry(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Module-level so Ray pickles a reference, not a closure."""
    from thinkfast_pipelines.train.worker import train_loop_per_worker

    return train_loop_per_worker(loop_config)


def _datasets(objective: str, config: TrainConfig, info: "CorpusInfo", image_size: int, teacher_scores: str | None,
              hard_negatives: str | None, embeddings: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train (split across workers) and val (whole, read by rank 0) datasets, and the
    layout the workers need: rows per step, images per row (1, or G for groups /
    teacher-score blocks), steps per epoch (equal on every rank: DDP needs it) and the
    data order (``permutation`` only for plain pair rows cached in the object store: a
    rank then holds its shard; anything else streams)."""
    from thinkfast.training.data import decoded_bytes_per_row
    from thinkfast_pipelines.train.data import decoded_dataset, maybe_cache

    explode = config.caption_sampling == "all"
    val_rows = config.val_rows_for(objective)
    row_bytes = decoded_bytes_per_row(info.is_video, image_size, config.num_frames)
    datasets: dict[str, Any] = {}
    grouped = bool(teacher_scores or hard_negatives)
    if teacher_scores:
        from thinkfast_pipelines.train.teacher_scores import block_dataset

        train, n_rows, images_per_row = block_dataset(teacher_scores, info, image_size, config.num_frames)
        rows_per_step = 1  # one block (its B x B teacher matrix) per step
    elif hard_negatives:
        from thinkfast_pipelines.train.negatives import grouped_dataset

        train, n_rows, images_per_row = grouped_dataset(info, hard_negatives, embeddings, config, image_size)
        rows_per_step = max(1, config.batch_size // images_per_row)
    else:
        train = decoded_dataset(info, "train", image_size, config.num_frames, explode, config.decode_batch_size)
        n_rows = train_rows(info, config)
        images_per_row = 1
        rows_per_step = config.batch_size
    datasets["train"], cached = maybe_cache(train, n_rows, row_bytes * images_per_row, config.cache_decoded, "train")
    data_order = config.data_order
    if data_order == "permutation":
        import ray

        # every rank holds a copy of the split: all of them together within a third of the object store
        capacity = float(ray.available_resources().get("object_store_memory", 0.0))
        held = config.workers * n_rows * row_bytes * images_per_row
        why = ("grouped rows (teacher-score blocks / hard negatives)" if grouped else
               "the decoded split is not cached" if not cached else
               f"{config.workers} copies of the split (~{held / 2**20:.0f} MB) would not fit" if capacity and held > capacity / 3
               else "")
        if why:
            logger.info("data order: streaming through the local shuffle buffer (%s)", why)
            data_order = "stream"
    if val_rows and info.counts.get("val", 0):
        val = decoded_dataset(info, "val", image_size, config.num_frames, False, config.decode_batch_size)
        datasets["val"], _ = maybe_cache(val.limit(val_rows), val_rows, row_bytes, config.cache_decoded, "val")
    elif val_rows:
        logger.warning("corpus has no val rows: validation R@1 is skipped")
    layout = {"rows_per_step": rows_per_step, "images_per_row": images_per_row, "data_order": data_order,
              "steps_per_epoch": steps_per_epoch(n_rows, config.workers, rows_per_step)}
    return datasets, layout


def _run_name(objective: str, storage: str, resume: bool, run_name: str | None) -> str:
    """``<objective>-<UTC time>``; with --resume, the newest existing run of this objective."""
    if run_name:
        return run_name
    prefix = f"{objective}-"
    if resume:
        existing = _existing_runs(storage, prefix)
        if existing:
            logger.info("resuming run %s (newest of %d under %s)", existing[-1], len(existing), storage)
            return existing[-1]
        logger.warning("--resume: no earlier %s run under %s; starting a new one", objective, storage)
    return prefix + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.getpid()}"


def _existing_runs(storage: str, prefix: str) -> list[str]:
    filesystem = fs.fsspec_fs(storage)
    root = fs.strip_scheme(storage).rstrip("/")
    if not filesystem.exists(root):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in filesystem.ls(root, detail=False)]
    return sorted(n for n in names if n.startswith(prefix))


def _storage(storage: str) -> tuple[str, Any]:
    """Ray Train wants a scheme-less path plus a pyarrow filesystem for S3."""
    if fs.is_s3(storage):
        filesystem, path = fs.arrow_fs(storage)
        return path, filesystem
    path = os.path.abspath(fs.strip_scheme(storage))
    os.makedirs(path, exist_ok=True)
    return path, None


def _export(checkpoint: Any, out: str) -> dict[str, Any]:
    """Copy the newest checkpoint's model directory to ``out``; return its state.json."""
    from thinkfast.training.state import MODEL_DIR, STATE_FILE

    with checkpoint.as_directory() as local:
        model_dir = os.path.join(local, MODEL_DIR)
        if not os.path.isdir(model_dir):
            raise CheckpointError(f"checkpoint {checkpoint.path} has no {MODEL_DIR}/ directory")
        if fs.is_s3(out):
            fs.upload_dir(model_dir, out)
        else:
            import shutil

            shutil.copytree(model_dir, fs.strip_scheme(out), dirs_exist_ok=True)
        with open(os.path.join(local, STATE_FILE), encoding="utf-8") as f:
            return json.load(f)


# ---------------------------------------------------------------- command line


def _excluded(name: str) -> tuple[str, ...]:
    """TrainConfig fields that are not flags of this subcommand (distill-only ones)."""
    return () if name == "distill" else DISTILL_FIELDS


def add_arguments_for(name: str, parser: argparse.ArgumentParser) -> None:
    """The subcommand's URIs, then one flag per TrainConfig field (``thinkfast.utils.options``:
    left None unless given, so defaults < preset < --config file < flags holds)."""
    parser.add_argument("--corpus", required=True, help="corpus Parquet (file, directory or s3:// prefix)")
    parser.add_argument("--out", required=True, help="final model directory (local or s3://)")
    parser.add_argument("--storage", help="checkpoint storage (local or s3://; default: OUT-checkpoints)")
    parser.add_argument("--resume", action="store_true", help="continue the newest run in --storage")
    parser.add_argument("--run-name", help="explicit run name under --storage (resumes it if it exists)")
    parser.add_argument("--config", dest="config_file", help="YAML/JSON file of training config fields")
    kind = "slow" if name == "train-slow" else "fast"
    parser.add_argument("--init", help=f"start from this {kind} model dir instead of a fresh preset" + (
        "" if kind == "slow" else " (or a Hugging Face CLIP / SigLIP checkpoint: directory or hub id)"))
    if name == "distill":
        parser.add_argument("--teacher", help="frozen slow teacher model dir (local or s3://)")
        parser.add_argument("--teacher-scores", help="precomputed teacher scores (thinkfast_pipelines.train.teacher_scores)")
        parser.add_argument("--hard-negatives", help="fast index URI: build batches from index neighbours")
        parser.add_argument("--embeddings", help="embed output holding the index's vectors (with --hard-negatives)")
    presets = "; ".join(f"{p}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for p, d in PRESET_DEFAULTS.items())
    group = parser.add_argument_group(
        "training config", f"TrainConfig fields, also the keys of --config. The defaults shown are the dataclass's; "
                           f"each preset overrides some ({presets})")
    add_config_arguments(group, TrainConfig, exclude=_excluded(name))


def run_for(name: str, args: argparse.Namespace) -> int:
    objective = COMMAND_OBJECTIVE[name]
    overrides = given(TrainConfig, args, exclude=_excluded(name))
    common = {"storage": args.storage, "resume": args.resume, "config_file": args.config_file,
              "run_name": args.run_name}
    if objective == "slow":
        result = train_slow(args.corpus, args.out, init=args.init, **common, **overrides)
    elif objective == "fast":
        result = train_fast(args.corpus, args.out, init=args.init, **common, **overrides)
    else:
        result = distill(args.corpus, args.out, args.teacher, teacher_scores=args.teacher_scores,
                         hard_negatives=args.hard_negatives, embeddings=args.embeddings, init=args.init,
                         **common, **overrides)
    for record in result.history:
        print(json.dumps(record, sort_keys=True))
    print(f"model: {result.out}  ({result.steps} steps, {result.seconds:.1f} s)")
    return 0
