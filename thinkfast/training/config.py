"""Hyper-parameters of ``train-slow``, ``train-fast`` and ``distill``, in one frozen dataclass.

Sources, lowest priority first: the dataclass defaults, the per-preset defaults below
(sized so the ``small`` preset on the generated corpus trains in minutes on 2 CPU cores),
a ``--config`` YAML/JSON file, then the flags given explicitly on the command line (or the
keyword arguments of the Python functions). The merged config is saved with every
checkpoint and with the final model (``training.json``), so a run is reproducible from it.
The command-line flags are generated from the fields (``thinkfast.utils.options``), so a
field added here is a flag, a keyword argument and a config-file key at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

from thinkfast.errors import ThinkfastError
from thinkfast.utils import fs
from thinkfast.utils.options import option

logger = logging.getLogger(__name__)

Objective = Literal["slow", "fast", "distill"]
OBJECTIVES: tuple[str, ...] = ("slow", "fast", "distill")
# fields that only the distill command takes (train-slow / train-fast have no such flags)
DISTILL_FIELDS: tuple[str, ...] = ("alpha", "teacher_temperature", "group_size")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the URIs (corpus, out, storage, teacher)."""

    preset: str = option("small", "model preset: tiny | small | paper | photo")
    epochs: int = option(4, "passes over the train split")
    batch_size: int = option(64, "pairs per worker per step (the NCE / B_i batch of each worker)")
    lr: float = option(1e-3, "AdamW peak learning rate (linear warm-up, cosine decay)")
    weight_decay: float = option(0.01, "AdamW decoupled weight decay")
    warmup_steps: int = option(20, "linear warm-up steps before cosine decay")
    grad_clip: float = option(1.0, "max global gradient norm (0 disables clipping)")
    temperature: float = option(0.05, "tau: fast-score temperature in NCE and in the student softmax")
    alpha: float = option(1.0, "distill: weight of L_distill in L_DE + alpha * L_distill")
    teacher_temperature: float = option(1.0, "distill: T, the teacher softmax temperature on h(x, y)")
    group_size: int = option(4, "distill --hard-negatives: images per index-neighbour group "
                                "(each has G-1 hard negatives)")
    workers: int = option(2, "Ray Train workers (DDP ranks); the in-process trainer is always one process")
    cpus_per_worker: float = option(1.0, "Ray CPUs reserved per worker (fractional is fine on small machines)")
    use_gpu: bool = option(False, "one GPU per worker, nccl instead of gloo", flag="--gpu")
    torch_threads: int = option(0, "intra-op threads per worker (0 = cores / workers, at least 1)")
    checkpoint_every_steps: int = option(0, "also checkpoint every N steps (0 = only at epoch ends)")
    keep_checkpoints: int = option(2, "newest checkpoints kept in --storage (the rest are deleted)")
    max_failures: int = option(2, "worker-group restarts (from the newest checkpoint) before giving up")
    val_images: int = option(512, "fast: val images embedded for R@1 (0 = no validation)")
    val_pool: int = option(32, "slow: val images re-ranked exhaustively for R@1 (0 = no validation)")
    min_word_count: int = option(1, "word vocabulary: drop words seen fewer times in the train split")
    num_frames: int = option(8, "frames sampled per video (videos only; = embed and eval defaults, "
                                "so serving sees what training saw)")
    caption_sampling: Literal["sample", "all"] = option(
        "sample", "sample: one random caption per image per epoch; all: every caption its own row")
    data_order: Literal["permutation", "stream"] = option(
        "permutation", "permutation: each rank holds its decoded shard and visits it, sorted by key, in a "
                       "permutation drawn from (seed, epoch), the order the in-process trainer uses too; "
                       "stream: Ray Data's local shuffle buffer (for shards too big to hold)")
    decode_batch_size: int = option(64, "rows per Ray Data decode task")
    cache_decoded: bool = option(True, "decode each split once and keep it in the object store "
                                       "(if it fits in a third)")
    cache_frozen: bool = option(False, "compute what frozen parts compute once per image, not once per step: a "
                                       "fully frozen trunk's features (vision.frozen_stages=4) and the distill "
                                       "teacher's visual tokens (needs data_order=permutation)")
    freeze_text: bool = option(False, "fast / distill: keep the text tower's weights fixed (a pretrained one keeps "
                                      "the words no training caption has); its projection still trains")
    shuffle_buffer: int = option(256, "data_order=stream: local shuffle buffer (images) of each worker's shard")
    seed: int = option(0, "model init, caption sampling and data order")
    # test hooks: not command-line options (a config file or keyword argument sets them)
    fail_at_step: int = option(0, "TEST HOOK: rank 0 raises once when it reaches this step (0 = never)", cli=False)
    fail_marker: str = option("", "TEST HOOK: file created before that raise, so it happens only once", cli=False)

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 2,
            "lr": self.lr > 0,
            "temperature": self.temperature > 0,
            "teacher_temperature": self.teacher_temperature > 0,
            "alpha": self.alpha >= 0,
            "group_size": self.group_size >= 2,
            "workers": self.workers >= 1,
            "cpus_per_worker": self.cpus_per_worker > 0,
            "checkpoint_every_steps": self.checkpoint_every_steps >= 0,
            "keep_checkpoints": self.keep_checkpoints >= 1,
            "max_failures": self.max_failures >= -1,
            "val_images": self.val_images >= 0,
            "val_pool": self.val_pool >= 0,
            "num_frames": self.num_frames >= 1,
            "caption_sampling": self.caption_sampling in ("sample", "all"),
            "data_order": self.data_order in ("permutation", "stream"),
            "decode_batch_size": self.decode_batch_size >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
            raise ThinkfastError(f"invalid training config: {values}")
        if self.cache_frozen and self.data_order == "stream":
            raise ThinkfastError("cache_frozen keeps the cached features beside the rows each rank holds: it needs "
                                 "data_order=permutation, not stream")
        if self.fail_at_step and not self.fail_marker:
            raise ThinkfastError("fail_at_step (a test hook) needs fail_marker, the file that makes it fire once")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def val_rows_for(self, objective: str) -> int:
        """Val images the objective's validation uses: the slow pool or the fast gallery."""
        return self.val_pool if objective == "slow" else self.val_images


# per preset: what differs from the dataclass defaults
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "val_images": 64, "val_pool": 16},
    "small": {"epochs": 12, "batch_size": 64, "lr": 1e-3, "warmup_steps": 20},  # 1 worker, 2000 images: 300 steps, val R@1 at its plateau
    # the Tux Paint photos (~550 train pairs) on cached frozen-trunk features; a frozen MiniLM
    "photo": {"epochs": 10, "batch_size": 64, "lr": 1e-3, "warmup_steps": 10, "val_images": 256, "val_pool": 32,
              "cache_frozen": True, "freeze_text": True},
    "paper": {"epochs": 10, "batch_size": 128, "lr": 1e-4, "warmup_steps": 1000, "val_images": 1000,
              "val_pool": 100, "checkpoint_every_steps": 1000},
}


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def read_config_file(uri: str) -> dict[str, Any]:
    """A YAML or JSON mapping of TrainConfig fields (local path or s3://)."""
    try:
        text = fs.read_bytes(uri).decode("utf-8")
    except (FileNotFoundError, OSError) as exc:
        raise ThinkfastError(f"cannot read config file {uri}: {exc}") from exc
    try:
        if uri.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - yaml and json raise different types
        raise ThinkfastError(f"config file {uri} is not valid YAML/JSON: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ThinkfastError(f"config file {uri} must hold a mapping of field: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(overrides: dict[str, Any] | None = None, config_file: str | None = None) -> TrainConfig:
    """Merge defaults < preset defaults < config file < explicit overrides (None = not given)."""
    explicit = {k: v for k, v in (overrides or {}).items() if v is not None}
    from_file = read_config_file(config_file) if config_file else {}
    unknown = sorted((set(from_file) | set(explicit)) - set(field_names()))
    if unknown:
        raise ThinkfastError(f"unknown training config fields {unknown}; known: {', '.join(field_names())}")
    preset = explicit.get("preset", from_file.get("preset", "small"))
    if preset not in PRESET_DEFAULTS:
        raise ThinkfastError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_DEFAULTS)}")
    merged = {**PRESET_DEFAULTS[preset], **from_file, **explicit, "preset": preset}
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    try:
        config = TrainConfig(**{k: _coerce(v, types[k]) for k, v in merged.items()})
    except (TypeError, ValueError) as exc:
        raise ThinkfastError(f"invalid training config: {exc}") from exc
    logger.info("training config: %s", json.dumps(config.to_dict(), sort_keys=True))
    return config


def _coerce(value: Any, annotation: Any) -> Any:
    """YAML gives ints where floats are meant (lr: 1); make them the declared type."""
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if name == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if name == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value
