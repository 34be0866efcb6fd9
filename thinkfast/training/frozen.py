"""What the frozen parts of a training run let it compute once per image instead of once per step.

A frozen trunk (``vision.frozen_stages == 4``: stem, every stage and their BatchNorm
statistics, see ``thinkfast.models.freezing``) maps an image to the same features at every
step, and so does a distillation teacher, which is frozen whole. On two CPU cores the
pretrained EfficientNet trunk is most of a step's cost (about 26 ms per 224 px image), so
``TrainConfig.cache_frozen`` runs those parts once over the rows a rank holds and trains
on the result:

* the fast model's pooled stride-32 features per frame (``FastModel.pooled_frames``),
  ``(N, F, C4)``, when its trunk is frozen;
* the slow model's backbone maps that its FPN reads (``SlowModel.trunk_maps``), one field
  per stage, when its trunk is frozen (images only);
* the teacher's visual tokens phi(x) ``(N, T, D)`` in distillation, whatever the student.

The cached values are float32, computed in eval mode, exactly what the step would compute
(frozen layers run in eval mode during training too), so a run with the cache takes the
same steps as one without, up to float rounding (``tests/test_frozen_cache.py``). Rows
stay in memory (``ShardRows``), which is why this needs ``data_order="permutation"``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from thinkfast.errors import ThinkfastError

if TYPE_CHECKING:
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast.training.data import ShardRows

logger = logging.getLogger(__name__)

TRUNK_PREFIX = "trunk."  # row fields holding cached trunk outputs ("trunk.pooled", "trunk.2", ...)
TEACHER_TOKENS = "teacher_tokens"  # row field holding the teacher's cached visual tokens


def trunk_is_frozen(model: torch.nn.Module) -> bool:
    """True when nothing below the model's first trainable layer can change: the whole
    trunk frozen (``vision.frozen_stages == 4``) and no gradient reaching it."""
    config = getattr(model, "config", None)
    vision = getattr(config, "vision", None)
    backbone = getattr(model, "backbone", None)
    if vision is None or backbone is None or vision.frozen_stages != 4:
        return False
    return not any(p.requires_grad for p in backbone.parameters() if not _is_classifier(model, p))


def _is_classifier(model: torch.nn.Module, param: torch.nn.Parameter) -> bool:
    """The EfficientNet ImageNet classifier is outside the trunk (only the concepts head reads
    it, through buffers copied at build time), so its trainable flag does not matter."""
    fc = getattr(getattr(model.backbone, "net", None), "_fc", None)
    return fc is not None and any(param is p for p in fc.parameters())


def freeze_text_tower(model: torch.nn.Module) -> None:
    """``freeze_text``: no gradient into the text tower (its projection still trains). With
    a few hundred short captions, fine-tuning a pretrained text encoder forgets the words
    those captions never use, which are the ones an unseen-concept query needs."""
    encoder = getattr(model, "text_encoder", None)
    if encoder is None:
        raise ThinkfastError(f"freeze_text: {type(model).__name__} has no text tower to freeze")
    encoder.requires_grad_(False)


@torch.no_grad()
def _chunks(fn: Any, pixels: np.ndarray, batch_size: int) -> list[Any]:
    return [fn(torch.as_tensor(np.ascontiguousarray(pixels[i:i + batch_size]), dtype=torch.float32))
            for i in range(0, len(pixels), batch_size)]


def trunk_fields(model: "FastModel | SlowModel", pixels: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
    """The cached trunk outputs of ``pixels`` (decoded rows, ``(N, 3, S, S)`` or videos
    ``(N, F, 3, S, S)``) as row fields."""
    from thinkfast.models.slow import SlowModel

    was_training = model.training
    model.eval()
    try:
        if isinstance(model, SlowModel):
            if pixels.ndim != 4:
                raise ThinkfastError("cache_frozen caches the slow model's trunk for image corpora only; "
                                     "set cache_frozen=false for video")
            parts = _chunks(model.trunk_maps, pixels, batch_size)
            fields = {}
            for stage in range(len(parts[0]) if parts else 0):
                if parts[0][stage] is not None:
                    fields[f"{TRUNK_PREFIX}{stage}"] = torch.cat([p[stage] for p in parts]).float().numpy()
            return fields
        pooled = _chunks(model.pooled_frames, pixels, batch_size)
        return {f"{TRUNK_PREFIX}pooled": torch.cat(pooled).float().numpy()}  # (N, F, C4)
    finally:
        model.train(was_training)


def teacher_tokens(teacher: "SlowModel", pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """phi(x) of the frozen teacher for every row ``(N, T, D)`` float32."""
    teacher.eval()
    return torch.cat(_chunks(teacher.encode_visual, pixels, batch_size)).float().numpy()


def cache_frozen(rows: "ShardRows", model: "FastModel | SlowModel", teacher: "SlowModel | None" = None,
                 batch_size: int = 32) -> dict[str, Any]:
    """Add the cached fields to ``rows`` in place (the trunk's when it is frozen, the
    teacher's tokens when there is a teacher) and drop the pixels once nothing needs them.
    Returns what was cached, for the log and the training record."""
    started = time.perf_counter()
    pixels = rows.rows["pixels"]
    cached: list[str] = []
    if trunk_is_frozen(model):
        rows.rows.update(trunk_fields(model, pixels, batch_size))
        cached.append("trunk")
    else:
        logger.info("cache_frozen: the %s model's trunk trains (vision.frozen_stages=%s), so it is run every step",
                    type(model).__name__, getattr(getattr(model.config, "vision", None), "frozen_stages", "?"))
    if teacher is not None:
        rows.rows[TEACHER_TOKENS] = teacher_tokens(teacher, pixels, batch_size)
        cached.append("teacher tokens")
    if "trunk" in cached:
        rows.rows["pixels"] = np.zeros((len(pixels), 0), dtype=pixels.dtype)  # nothing reads them any more
    size = sum(v.nbytes for k, v in rows.rows.items() if k.startswith(TRUNK_PREFIX) or k == TEACHER_TOKENS)
    info = {"cached": cached, "rows": len(pixels), "megabytes": round(size / 2**20, 1),
            "seconds": round(time.perf_counter() - started, 2)}
    if cached:
        logger.info("cache_frozen: %s for %d rows (%.1f MB) in %.1f s", " and ".join(cached), len(pixels),
                    info["megabytes"], info["seconds"])
    return info


def batch_fields(batch: Mapping[str, np.ndarray], keep: list[int]) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor | None]:
    """A step's cached trunk fields (name without prefix -> tensor) and teacher tokens, rows ``keep``."""
    trunk = {name[len(TRUNK_PREFIX):]: torch.as_tensor(np.asarray(values)[keep])
             for name, values in batch.items() if name.startswith(TRUNK_PREFIX)}
    tokens = batch.get(TEACHER_TOKENS)
    return (trunk or None), (None if tokens is None else torch.as_tensor(np.asarray(tokens)[keep]))


def encode_images(model: "FastModel", visual: "torch.Tensor | Mapping[str, torch.Tensor]") -> torch.Tensor:
    """f(x) from pixels, or from the cached pooled trunk features."""
    if isinstance(visual, Mapping):
        return model.encode_pooled(visual["pooled"])
    return model.encode_image(visual)


def encode_visual(model: "SlowModel", visual: "torch.Tensor | Mapping[str, torch.Tensor]") -> torch.Tensor:
    """phi(x) from pixels, or from the cached trunk maps."""
    if isinstance(visual, Mapping):
        return model.encode_trunk_maps([visual.get(str(i)) for i in range(4)], num_frames=1)
    return model.encode_visual(visual)
