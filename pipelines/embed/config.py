"""How ``thinkfast embed`` runs (:class:`EmbedConfig`) and how it refuses (:class:`EmbedError`).

A leaf module (no imports from the rest of the package), so the job (``run.py``), the
stages and the CLI all take the config from here rather than from each other. The CLI
flags are generated from the fields (``thinkfast.utils.options``): a field added here
appears in the Python API, the command line and the manifest's ``config`` at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from thinkfast.errors import ThinkfastError
from thinkfast.utils.options import add_config_arguments, config_from_args as _config_from_args, option


class EmbedError(ThinkfastError):
    """The embed job cannot run as asked (flags, model pair) or lost rows (counts differ)."""


@dataclass(frozen=True)
class EmbedConfig:
    """How the embed job runs; none of this changes what is computed, only how fast
    (except ``on_duplicate``, which says what a repeated key does)."""

    batch_size: int = option(64, "rows per model call in an actor (and per map_batches batch)")
    actors: int = option(1, "model replicas in the actor pool")
    device: Literal["cpu", "cuda"] = option("cpu", "model device; cuda reserves --gpus-per-actor GPUs per actor")
    cpus_per_actor: float = option(0.5, "logical CPUs Ray reserves per actor (fractional so read/decode always fit)")
    gpus_per_actor: float = option(1.0, "GPUs per actor with --gpu / --device cuda")
    gpu: bool = option(False, "run the models on GPUs (same as --device cuda): one actor per --gpus-per-actor GPUs, "
                              "the pool sized to --num-gpus, else --actors when > 1, else every visible GPU")
    num_gpus: float | None = option(None, "with --gpu: GPUs the actor pool uses (default: every GPU Ray reports)")
    amp: bool = option(False, "with --gpu: run the slow (token) model under fp16 autocast (tokens are stored fp16)")
    threads: int | None = option(None, "torch threads per actor (default: the node's cores // actors, at least 1)")
    decode_batch_size: int = option(32, "rows per decode task call")
    rows_per_write: int = option(1024, "rows per output file / token shard (one write call)")
    token_format: Literal["float16", "int8"] = option(
        "float16", "slow-token records: float16 (2TD bytes) or int8 with a per-token scale (T(D+2) bytes, ~half)")
    num_frames: int | None = option(
        None, "frames sampled per video (default 8, at most the slow model's max_frames)", flag="--frames")
    max_pixels: int | None = option(None, "reject images with more pixels than this (default: the data layer's)")
    limit: int | None = option(None, "embed only the first N rows (smoke runs)")
    progress: bool = option(True, "Ray Data progress bars")
    object_store_limit_mb: int | None = option(None, "cap on object store memory the stream uses")
    s3_endpoint: str | None = option(None, "S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    on_duplicate: Literal["error", "first", "reject"] = option(
        "error", "a key the corpus holds more than once: error (refuse before any work), first (keep the first "
        "occurrence in file then row order, reject the others), reject (reject every row of that key)")
    incremental: bool = option(
        False, "grow the embeddings directory at --out: embed only keys it does not hold yet (same models), "
        "skip the rest (default: a run replaces --out)")
    reembed_changed: bool = option(
        False, "with --incremental: re-embed keys whose media changed (default: report them, keep the old rows)")

    def validate(self) -> None:
        if self.batch_size < 1 or self.decode_batch_size < 1 or self.rows_per_write < 1:
            raise EmbedError("batch sizes and --rows-per-write must be positive")
        if self.actors < 1:
            raise EmbedError(f"--actors must be at least 1, got {self.actors}")
        if self.device not in ("cpu", "cuda"):
            raise EmbedError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise EmbedError("--cpus-per-actor and --gpus-per-actor must be non-negative")
        if self.num_gpus is not None and not self.uses_gpu:
            raise EmbedError("--num-gpus needs --gpu")
        if self.amp and not self.uses_gpu:
            raise EmbedError("--amp needs --gpu (autocast is for CUDA; the CPU path stays float32)")
        if self.token_format not in ("float16", "int8"):
            raise EmbedError(f"--token-format must be float16 or int8, got {self.token_format!r}")
        if self.on_duplicate not in ("error", "first", "reject"):
            raise EmbedError(f"--on-duplicate must be error, first or reject, got {self.on_duplicate!r}")
        if self.limit is not None and self.limit < 0:
            raise EmbedError(f"--limit must be non-negative, got {self.limit}")
        if self.reembed_changed and not self.incremental:
            raise EmbedError("--reembed-changed needs --incremental")
        if self.incremental and self.limit is not None:
            raise EmbedError("--incremental cannot be combined with --limit (which rows a limit takes is not fixed)")

    @property
    def uses_gpu(self) -> bool:
        """``--gpu`` or its older spelling ``--device cuda``."""
        return self.gpu or self.device == "cuda"

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's ``config``: every field but the S3 endpoint (a deployment detail)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "s3_endpoint"}


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The :class:`EmbedConfig` flags (``--batch-size`` ... ``--frames``, ``--no-progress``)."""
    add_config_arguments(parser, EmbedConfig)


def config_from_args(args: argparse.Namespace) -> EmbedConfig:
    """The ``EmbedConfig`` the flags describe (flags not given keep the defaults)."""
    return _config_from_args(EmbedConfig, args)
