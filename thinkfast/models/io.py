"""Checkpoints: ``config.json`` + ``model.safetensors`` + tokenizer files in one directory.

Layout of a model directory (local path or ``s3://`` URI)::

    config.json            {"thinkfast_model": "fast"|"slow", "format_version": 2, "config": {...}}
    model.safetensors      every weight; nothing is ever unpickled (no torch.load)
    thinkfast_tokenizer.json + vocabulary / HF tokenizer files   (thinkfast.data.tokenizer)
    text_encoder/config.json   HF architecture config (fast model with an HF text tower only)

``PretrainedMixin`` gives both models ``from_preset``, ``from_pretrained``, ``save_pretrained``,
``tokenize`` and ``identity``; each model supplies ``model_kind``, ``config_class``,
``preset_config`` and ``_build``. Loading always builds the architecture from the stored
config (never downloading pretrained weights) and then loads the safetensors strictly, so a
wrong or partial file fails with ``CheckpointError`` instead of leaving random weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from thinkfast.errors import CheckpointError, ThinkfastError
from thinkfast.models.config import config_to_dict, identity_dict
from thinkfast.models.preflight import CONFIG_FILE, FORMAT_VERSION, TEXT_ENCODER_DIR, preflight_checkpoint
from thinkfast.utils import fs

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "TEXT_ENCODER_DIR", "WEIGHTS_FILE", "PretrainedMixin", "state_dict_digest"]

M = TypeVar("M", bound="PretrainedMixin")


def tokenizer_file_bytes(path: str) -> bytes:
    """A saved tokenizer file as it enters a model's identity. A fast HF tokenizer's
    ``tokenizer.json`` records the truncation and padding of its *last call*, which is
    runtime state, not the model: those two entries are left out, so tokenizing a query
    never changes a model's identity."""
    with open(path, "rb") as f:
        data = f.read()
    if os.path.basename(path) == "tokenizer.json":
        try:
            payload = json.loads(data)
        except ValueError:
            return data
        if isinstance(payload, dict):
            payload.pop("truncation", None)
            payload.pop("padding", None)
            return json.dumps(payload, sort_keys=True).encode()
    return data


def digest_saved_files(digest: "hashlib._Hash", save: Callable[[str], None], skip: tuple[str, ...] = ()) -> None:
    """Add what ``save(directory)`` writes (a tokenizer's files, by sorted name) to ``digest``."""
    with tempfile.TemporaryDirectory(prefix="thinkfast-id-") as tmp:
        save(tmp)
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            if os.path.isfile(path) and name not in skip:
                digest.update(name.encode() + b"|" + tokenizer_file_bytes(path))


def state_dict_digest(module: nn.Module) -> "hashlib._Hash":
    """SHA-256 over every tensor (name, dtype, shape, bytes) in sorted name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest


def _load_weights(directory: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from exc


class PretrainedMixin:
    """Shared construction, saving, loading and identity for FastModel and SlowModel."""

    model_kind: str = ""  # "fast" | "slow": written to config.json and checked on load
    config_class: type = object  # FastConfig | SlowConfig

    config: Any
    tokenizer: Any

    # ------------------------------------------------------------ to implement
    @classmethod
    def preset_config(cls, name: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _build(cls: type[M], config: Any, tokenizer: Any, load_pretrained: bool, directory: str | None,
               max_params: int | None = None) -> M:
        """Construct the module; ``directory`` is the checkpoint being loaded (None when fresh).
        The constructor checks the parameter budget (``max_params``) before allocating."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _save_extra(self, directory: str) -> None:
        """Write files besides config/weights/tokenizer (the HF text config)."""

    # ------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls: type[M], name: str, tokenizer: Any | None = None, load_pretrained: bool = True,
                    max_params: int | None = None, **overrides: Any) -> M:
        """A fresh model from a preset (``tiny`` | ``small`` | ``paper``).

        ``tiny``/``small`` need the corpus ``WordTokenizer``; ``paper`` defaults to the HF
        tokenizer of its text model (offline MiniLM). ``overrides`` replace top-level config
        fields (e.g. ``image_size=96``, ``levels=(16,)``), checked against the same bounds as
        a checkpoint; ``load_pretrained=False`` skips downloading pretrained backbone/text
        weights (random initialisation). ``max_params`` raises (or lowers) the parameter
        limit (default ``$THINKFAST_MAX_PARAMS``, else 10^9)."""
        config = cls.preset_config(name)
        if overrides:
            try:
                config = dataclasses.replace(config, **overrides)
            except TypeError as exc:
                raise ThinkfastError(f"bad override for preset {name!r}: {exc}") from exc
        return cls.from_config(config, tokenizer=tokenizer, load_pretrained=load_pretrained, max_params=max_params)

    @classmethod
    def from_config(cls: type[M], config: Any, tokenizer: Any | None = None, load_pretrained: bool = True,
                    max_params: int | None = None) -> M:
        """A fresh model from a config object; the vocabulary size follows the tokenizer.
        The config's fields were checked when it was made; the parameter estimate is checked
        against ``max_params`` before any module is allocated."""
        if not isinstance(config, cls.config_class):
            raise ThinkfastError(f"{cls.__name__} needs a {cls.config_class.__name__}, got {type(config).__name__}")
        if tokenizer is None:
            tokenizer = cls._default_tokenizer(config)
        config = cls._with_vocab(config, tokenizer)
        return cls._build(config, tokenizer, load_pretrained, None, max_params)

    @classmethod
    def _default_tokenizer(cls, config: Any) -> Any:
        raise ThinkfastError(
            f"{cls.__name__} with a word vocabulary needs a tokenizer: pass "
            "tokenizer=WordTokenizer.build(corpus_captions)"
        )

    @classmethod
    def _with_vocab(cls, config: Any, tokenizer: Any) -> Any:
        return config

    # ------------------------------------------------------------ tokenization
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``{"input_ids": (B, L), "attention_mask": (B, L)}`` right-padded, at most
        ``config.max_text_length`` tokens."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ThinkfastError("tokenize needs at least one text")
        return self.tokenizer(list(texts), max_length=self.config.max_text_length)

    # ------------------------------------------------------------ save / load
    def save_pretrained(self, dir_or_uri: str) -> None:
        """Write config.json, model.safetensors and the tokenizer to a local dir or ``s3://``."""
        if fs.is_s3(dir_or_uri):
            with tempfile.TemporaryDirectory(prefix="thinkfast-save-") as tmp:
                self._save_local(tmp)
                fs.upload_dir(tmp, dir_or_uri)
        else:
            self._save_local(fs.strip_scheme(dir_or_uri))
        logger.info("saved %s model to %s", self.model_kind, dir_or_uri)

    def _save_local(self, directory: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        payload = {"thinkfast_model": self.model_kind, "format_version": FORMAT_VERSION,
                   "config": config_to_dict(self.config)}
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}  # type: ignore[attr-defined]
        save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt", "thinkfast_model": self.model_kind})
        self.tokenizer.save(directory)
        self._save_extra(directory)

    @classmethod
    def from_pretrained(cls: type[M], dir_or_uri: str, max_params: int | None = None) -> M:
        """Load a saved model (local dir, ``file://`` or ``s3://``) in eval mode.

        Raises ``CheckpointError`` for anything that is not a complete checkpoint of this
        model kind; weights are read with safetensors only, so nothing is unpickled. The
        config is checked first (every field's bounds, then the parameter estimate against
        ``max_params``, default ``$THINKFAST_MAX_PARAMS`` else 10^9): an absurd
        ``config.json`` is one line naming the file and the field, and nothing is allocated
        (for ``s3://`` nothing but the config is downloaded)."""
        if fs.is_s3(dir_or_uri):
            preflight_checkpoint(dir_or_uri, cls.model_kind, max_params=max_params)
            with tempfile.TemporaryDirectory(prefix="thinkfast-load-") as tmp:
                fs.download_dir(dir_or_uri, tmp)
                return cls._load_local(tmp, origin=dir_or_uri, max_params=max_params)
        return cls._load_local(fs.strip_scheme(dir_or_uri), origin=dir_or_uri, max_params=max_params)

    @classmethod
    def _load_local(cls: type[M], directory: str, origin: str, max_params: int | None = None) -> M:
        from thinkfast.data.tokenizer import load_tokenizer

        # checked again on the local copy: that is what is built (origin names it in messages)
        checked = preflight_checkpoint(directory, cls.model_kind, max_params=max_params,
                                       origin=origin if fs.is_s3(origin) else None)
        config = checked.config
        tokenizer = load_tokenizer(directory)
        model = cls._build(config, tokenizer, False, directory, max_params)
        weights = _load_weights(directory)
        try:
            model.load_state_dict(weights, strict=True)  # type: ignore[attr-defined]
        except RuntimeError as exc:
            raise CheckpointError(f"weights in {origin} do not match its config: {exc}") from exc
        model.eval()  # type: ignore[attr-defined]
        logger.info("loaded %s model from %s (identity %s)", cls.model_kind, origin, model.identity)
        return model

    # ------------------------------------------------------------ identity
    @property
    def identity(self) -> str:
        """Stable hash of config + tokenizer + weights: the same trained model always gives the
        same string, any change in weights gives another. Written into manifests so an index
        built with one model is never queried with another."""
        digest = state_dict_digest(self)  # type: ignore[arg-type]
        digest.update(json.dumps(identity_dict(self.config), sort_keys=True).encode())
        digest_saved_files(digest, self.tokenizer.save, skip=("thinkfast_tokenizer.json",))
        return f"{self.model_kind}-{digest.hexdigest()[:16]}"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device  # type: ignore[attr-defined]
