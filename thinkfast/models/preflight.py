"""Check a checkpoint's configs before anything is downloaded, built or allocated.

:func:`preflight_checkpoint` reads ``config.json`` (and, for a fast model with a Hugging Face
text tower, ``text_encoder/config.json``) from a local directory or an ``s3://`` URI, checks
every field against its bounds (``thinkfast.models.bounds``) and the estimated parameter
count against the limit, and returns the config. It reads at most two small JSON files:
no weights, no tokenizer, no torch. ``from_pretrained`` calls it first (for S3 before
downloading the weights), and ``thinkfast serve`` calls it on the driver so that a bad
checkpoint is one line naming the file and the field before Ray Serve starts, rather than
"Failed to update the deployments ['TextEncoder']".
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from thinkfast.errors import CheckpointError
from thinkfast.models.bounds import InvalidConfigError, check_hf_text_config, check_param_budget
from thinkfast.utils import fs

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TEXT_ENCODER_DIR = "text_encoder"
FORMAT_VERSION = 2  # 2: vision.backbone / frozen_stages, image_head / concept_top_k
READABLE_VERSIONS = (1, 2)  # 1 is upgraded on read (thinkfast.models.config.upgrade_config_dict)
MAX_CONFIG_BYTES = 1 << 20  # a model config is a few KB; a bigger file is not one


@dataclass(frozen=True)
class CheckedCheckpoint:
    """What a checkpoint's configs describe, all checked."""

    config: Any  # FastConfig | SlowConfig
    hf_text_config: dict[str, Any] | None  # the HF text tower's complete config (fast + hf only)
    num_params: int  # the parameter estimate that passed the budget


def _config_class(kind: str) -> type:
    from thinkfast.models.config import FastConfig, SlowConfig

    classes = {"fast": FastConfig, "slow": SlowConfig}
    if kind not in classes:
        raise ValueError(f"model kind must be fast or slow, got {kind!r}")
    return classes[kind]


def _read_json(uri: str, label: str, s3_endpoint: str | None) -> Any:
    """The JSON at ``uri`` (``label`` names it in messages), read only up to 1 MiB."""
    try:
        with fs.fsspec_fs(uri, s3_endpoint).open(fs.strip_scheme(uri), "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointError(f"{label} does not exist") from None
    except OSError as exc:
        if fs.is_s3(uri):
            raise  # storage failures are reported as such by the caller
        raise CheckpointError(f"unreadable {label}: {exc}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{label} is larger than {MAX_CONFIG_BYTES} bytes: not a model config")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"unreadable {label}: {exc}") from exc


def preflight_checkpoint(dir_or_uri: str, kind: str, *, max_params: int | None = None,
                         s3_endpoint: str | None = None, origin: str | None = None) -> CheckedCheckpoint:
    """Read and check the configs of the ``kind`` ("fast" | "slow") model at ``dir_or_uri``.

    ``origin`` is how messages name the checkpoint (default ``dir_or_uri``; a download
    directory is named by the URI it came from). Raises ``CheckpointError`` with one line
    ``<origin>/config.json: <field> = <value> is out of range [lo, hi]`` (or the parameter
    budget, or a missing / foreign / unreadable checkpoint)."""
    from thinkfast.models.config import config_from_dict

    origin = origin or dir_or_uri
    if fs.is_s3(dir_or_uri):
        if not fs.exists(fs.join(dir_or_uri, CONFIG_FILE), s3_endpoint):
            raise CheckpointError(f"{origin} is not a thinkfast model directory ({CONFIG_FILE} missing)")
    else:
        directory = fs.strip_scheme(dir_or_uri)
        if not os.path.isdir(directory):
            raise CheckpointError(f"{origin} is not a model directory")
        if not os.path.isfile(os.path.join(directory, CONFIG_FILE)):
            raise CheckpointError(f"{origin} is not a thinkfast model directory ({CONFIG_FILE} missing)")
    label = fs.join(origin, CONFIG_FILE)
    payload = _read_json(fs.join(dir_or_uri, CONFIG_FILE), label, s3_endpoint)
    if not isinstance(payload, dict) or "thinkfast_model" not in payload:
        raise CheckpointError(f"{label} is not a thinkfast model config (no 'thinkfast_model' field)")
    if payload["thinkfast_model"] != kind:
        raise CheckpointError(f"{origin} holds a {payload['thinkfast_model']!r} model, not a {kind!r} model")
    if payload.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{label}: unsupported format_version {payload.get('format_version')!r}")
    if "config" not in payload:
        raise CheckpointError(f"{label}: config is missing")
    from thinkfast.models.config import upgrade_config_dict

    raw_config = upgrade_config_dict(payload["config"], int(payload["format_version"]), kind)
    config = config_from_dict(_config_class(kind), raw_config, source=label)

    hf_text_config = None
    if kind == "fast" and config.text.kind == "hf":
        hf_label = fs.join(origin, TEXT_ENCODER_DIR, CONFIG_FILE)
        raw = _read_json(fs.join(dir_or_uri, TEXT_ENCODER_DIR, CONFIG_FILE), hf_label, s3_endpoint)
        try:
            hf_text_config = check_hf_text_config(raw, config.max_text_length)
        except CheckpointError as exc:
            raise InvalidConfigError(f"{hf_label}: {exc}", getattr(exc, "field", "")) from None
    try:
        count = check_param_budget(config, hf_text_config, max_params)
    except CheckpointError as exc:
        raise InvalidConfigError(f"{label}: {exc}") from None
    logger.debug("%s: %s model config checked (%d parameters)", origin, kind, count)
    return CheckedCheckpoint(config=config, hf_text_config=hf_text_config, num_params=count)
