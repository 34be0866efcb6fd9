"""Bounds of every model-config field, and the parameter count a config implies.

A ``config.json`` is input: a hand edit or an attacker can put ``10**9`` into a width, a
string into a depth, ``NaN`` into a dropout. Before this module, such values reached torch
(a 196 GB ``nn.Embedding``, 7.3 GB of decoder layers before ``bad_alloc``, raw ``TypeError``s).
Now every field of the frozen config dataclasses (``thinkfast.models.config``) carries its
bounds in ``dataclasses.field(metadata=...)`` and is checked in ``__post_init__``, so the
check applies however a config is made (``config.json``, a preset, a preset override,
``dataclasses.replace``, direct construction). Then :func:`estimate_params` computes the
parameter count from the config alone (arithmetic mirroring the modules, no model built) and
:func:`check_param_budget` refuses a model above a limit the user can raise: the
``max_params`` argument of ``from_pretrained`` / ``from_preset`` / ``from_config`` / the model
constructors, else the ``THINKFAST_MAX_PARAMS`` environment variable, else
:data:`DEFAULT_MAX_PARAMS` (10^9, about 8x the largest preset, ``paper``'s 126M-parameter slow
model; 4 GB of float32 weights).

Per-field bounds are deliberately generous (a ResNet stage of 8192 channels, 128 decoder
layers, 4096 px inputs): they stop absurd values with a sentence; the parameter budget stops
absurd *combinations* of sensible values. Every failure is an :class:`InvalidConfigError`
(a ``CheckpointError``) that names the field, e.g. ``text.hidden_size = 1000000000 is out of
range [1, 8192]``; the checkpoint reader prefixes the file it came from.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NoReturn

from thinkfast.errors import CheckpointError, ThinkfastError

MAX_PARAMS_ENV = "THINKFAST_MAX_PARAMS"
DEFAULT_MAX_PARAMS = 1_000_000_000
BOUNDS_KEY = "thinkfast_bounds"  # the dataclass field-metadata key holding a field's Bound
MAX_STRING_CHARS = 4096  # hub ids and paths; longer is not a reference but a payload


class InvalidConfigError(CheckpointError):
    """A model config field (or the model it describes) is out of bounds. ``field`` is the
    dotted field name (``""`` for the whole model, e.g. the parameter budget)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def _show(value: Any) -> str:
    """A value as the message shows it: ``'64'`` for a string, ``nan``, ``True``, ``32.0``."""
    return repr(value) if not isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Bound:
    """What one field may hold. ``kind``: ``int`` | ``float`` | ``bool`` | ``str`` |
    ``choice`` | ``ints`` (a tuple of ints) | ``nested`` (a config dataclass)."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    hi_open: bool = False  # float ranges: [lo, hi) instead of [lo, hi]
    choices: tuple[Any, ...] = ()  # choice, and the items of ints when not empty
    length: tuple[int, int] = (0, 0)  # ints: (min, max) number of items
    optional: bool = False  # str: None allowed
    cls: type | None = None  # nested: the dataclass

    def check(self, name: str, value: Any) -> Any:
        """``value`` normalised (lists -> tuples, ints -> float for float fields), or
        :class:`InvalidConfigError` naming ``name``."""
        if self.kind == "int":
            return self._int(name, value)
        if self.kind == "float":
            return self._float(name, value)
        if self.kind == "bool":
            if type(value) is not bool:
                raise InvalidConfigError(f"{name} = {_show(value)} must be true or false", name)
            return value
        if self.kind == "str":
            if value is None and self.optional:
                return None
            if not isinstance(value, str):
                what = "a string or null" if self.optional else "a string"
                raise InvalidConfigError(f"{name} = {_show(value)} must be {what}, got {type(value).__name__}", name)
            if len(value) > MAX_STRING_CHARS or "\x00" in value:
                raise InvalidConfigError(f"{name} must be a path or hub id of at most {MAX_STRING_CHARS} characters "
                                         f"without NUL, got {len(value)} characters", name)
            return value
        if self.kind == "choice":
            return self._choice(name, value)
        if self.kind == "ints":
            if not isinstance(value, (list, tuple)):
                raise InvalidConfigError(f"{name} = {_show(value)} must be a list of integers, got {type(value).__name__}", name)
            lo, hi = self.length
            if not lo <= len(value) <= hi:
                count = f"{lo}" if lo == hi else f"{lo} to {hi}"
                raise InvalidConfigError(f"{name} must have {count} items, got {len(value)}", name)
            items = []
            for i, item in enumerate(value):
                item = self._int(f"{name}[{i}]", item)
                items.append(self._choice(f"{name}[{i}]", item) if self.choices else item)
            return tuple(items)
        if self.kind == "nested":
            assert self.cls is not None
            if not isinstance(value, self.cls):
                raise InvalidConfigError(f"{name} must be a {self.cls.__name__}, got {type(value).__name__}", name)
            return value
        raise TypeError(f"unknown bound kind {self.kind!r}")  # pragma: no cover - programming error

    def _int(self, name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidConfigError(f"{name} = {_show(value)} must be an integer, got {type(value).__name__}", name)
        value = int(value)
        if self.lo is not None and self.hi is not None and not self.lo <= value <= self.hi:
            raise InvalidConfigError(f"{name} = {value} is out of range [{int(self.lo)}, {int(self.hi)}]", name)
        return value

    def _float(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidConfigError(f"{name} = {_show(value)} must be a number, got {type(value).__name__}", name)
        value = float(value)
        if not math.isfinite(value):
            raise InvalidConfigError(f"{name} = {_show(value)} must be a finite number", name)
        assert self.lo is not None and self.hi is not None
        if value < self.lo or value > self.hi or (self.hi_open and value == self.hi):
            raise InvalidConfigError(f"{name} = {value} is out of range [{self.lo}, {self.hi}{')' if self.hi_open else ']'}", name)
        return value

    def _choice(self, name: str, value: Any) -> Any:
        # type(...) too, so that True is not taken for 1 nor 16.0 for 16
        if not any(type(value) is type(c) and value == c for c in self.choices):
            raise InvalidConfigError(f"{name} = {_show(value)} must be one of {list(self.choices)}", name)
        return value


# ---------------------------------------------------------------- field constructors

def _field(default: Any = dataclasses.MISSING, bound: Bound | None = None, factory: Callable[[], Any] | None = None) -> Any:
    metadata = {BOUNDS_KEY: bound}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def integer(default: int, lo: int, hi: int) -> Any:
    """An ``int`` field in ``[lo, hi]`` (``bool`` and ``float`` refused)."""
    return _field(default, Bound("int", lo, hi))


def real(default: float, lo: float, hi: float, hi_open: bool = False) -> Any:
    """A finite ``float`` field in ``[lo, hi]`` (or ``[lo, hi)``); ints are accepted."""
    return _field(default, Bound("float", lo, hi, hi_open=hi_open))


def flag(default: bool) -> Any:
    """A ``bool`` field (JSON ``true``/``false`` only, never ``1``)."""
    return _field(default, Bound("bool"))


def reference(default: str | None = None, optional: bool = True) -> Any:
    """A string field naming a hub id or a path, ``None`` allowed when ``optional``."""
    return _field(default, Bound("str", optional=optional))


def choice(default: Any, options: Iterable[Any]) -> Any:
    """One of ``options`` (same type and value)."""
    return _field(default, Bound("choice", choices=tuple(options)))


def integers(default: tuple[int, ...], lo: int | None, hi: int | None, length: tuple[int, int],
             options: Iterable[int] = ()) -> Any:
    """A tuple of ints (a JSON list is accepted and stored as a tuple), each in ``[lo, hi]``
    or one of ``options``, with ``length[0]..length[1]`` items."""
    return _field(default, Bound("ints", lo, hi, choices=tuple(options), length=length))


def nested(cls: type) -> Any:
    """A nested config dataclass (default: ``cls()``)."""
    return _field(bound=Bound("nested", cls=cls), factory=cls)


def validate_fields(config: Any) -> None:
    """Check (and normalise in place) every field of a frozen config dataclass against its
    ``Bound``; called first thing in each config's ``__post_init__``. A field without bounds
    is a programming error: every field must say what it may hold."""
    section = getattr(type(config), "SECTION", "")
    for f in dataclasses.fields(config):
        bound = f.metadata.get(BOUNDS_KEY)
        if bound is None:
            raise TypeError(f"{type(config).__name__}.{f.name} has no bounds (use thinkfast.models.bounds fields)")
        name = f"{section}.{f.name}" if section else f.name
        value = getattr(config, f.name)
        checked = bound.check(name, value)
        if checked is not value:
            object.__setattr__(config, f.name, checked)  # frozen: normalised once, at construction


def fail(message: str, field: str = "") -> NoReturn:
    """Raise :class:`InvalidConfigError` (for the cross-field checks in the configs)."""
    raise InvalidConfigError(message, field)


# ---------------------------------------------------------------- the HF text tower's config

# BERT-style encoder configs (``text_encoder/config.json`` of an ``hf`` fast model; the
# documented scope of the HF tower is "MiniLM or any BERT-style model")
HF_TEXT_BOUNDS: dict[str, Bound] = {
    "hidden_size": Bound("int", 1, 8192),
    "num_hidden_layers": Bound("int", 1, 128),
    "num_attention_heads": Bound("int", 1, 256),
    "intermediate_size": Bound("int", 1, 65536),
    "vocab_size": Bound("int", 1, 2_000_000),
    "max_position_embeddings": Bound("int", 1, 65536),
    "type_vocab_size": Bound("int", 0, 1024),
}
_HF_OPTIONAL = {"type_vocab_size": 0}  # encoders without token types (absent -> none)


def check_hf_text_config(raw: Any, max_text_length: int) -> dict[str, Any]:
    """Validate a Hugging Face encoder config (a dict as read from JSON, or ``to_dict()`` of a
    config object) and return its complete dict (transformers' defaults filled in).

    Values present are checked *before* transformers sees them (its own strict validation
    would give a less telling message, and it must never get to build anything); the
    completed dict is checked again, since ``save_pretrained`` omits fields at their default."""
    if not isinstance(raw, dict):
        fail(f"must be a JSON object, got {type(raw).__name__}")
    for key, bound in HF_TEXT_BOUNDS.items():
        if key in raw:
            bound.check(key, raw[key])
    full = _with_hf_defaults(raw)
    for key, bound in HF_TEXT_BOUNDS.items():
        if key not in full or full[key] is None:
            if key in _HF_OPTIONAL:
                full[key] = _HF_OPTIONAL[key]
                continue
            fail(f"{key} is missing (a BERT-style encoder config is expected)", key)
        bound.check(key, full[key])
    if full["hidden_size"] % full["num_attention_heads"]:
        fail(f"hidden_size {full['hidden_size']} must be divisible by num_attention_heads {full['num_attention_heads']}",
             "num_attention_heads")
    if full["max_position_embeddings"] < max_text_length:
        fail(f"max_position_embeddings = {full['max_position_embeddings']} is below the model's max_text_length "
             f"{max_text_length}", "max_position_embeddings")
    return full


def _with_hf_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` completed by its transformers config class (by ``model_type``; no remote code)."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        fail(f"model_type = {_show(model_type)} must be a string", "model_type")
    from transformers import CONFIG_MAPPING

    try:
        config_class = CONFIG_MAPPING[model_type]
    except KeyError:
        fail(f"model_type = {model_type!r} is not a transformers model type", "model_type")
    try:
        return dict(config_class.from_dict(dict(raw)).to_dict())
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        fail(f"not a valid {model_type} config: {type(exc).__name__}: {first[:300]}")


# ---------------------------------------------------------------- parameter estimate

def _conv_bn(cin: int, cout: int, kernel: int) -> int:
    """A transformers ``ResNetConvLayer`` / shortcut: bias-free conv + BatchNorm affine."""
    return cin * cout * kernel * kernel + 2 * cout


def backbone_params(vision: Any) -> int:
    """Parameters of the backbone a ``VisionConfig`` describes."""
    if vision.backbone != "resnet":
        from thinkfast.models.efficientnet_spec import num_params

        return num_params(vision.backbone)
    return resnet_params(vision)


def resnet_params(vision: Any) -> int:
    """``transformers.ResNetModel`` of a ``VisionConfig`` (stem 7x7 conv, 4 stages; the first
    stage does not downsample: ``downsample_in_first_stage`` stays at its default False)."""
    total = _conv_bn(3, vision.embedding_size, 7)
    cin = vision.embedding_size
    for stage, (cout, depth) in enumerate(zip(vision.hidden_sizes, vision.depths)):
        stride = 1 if stage == 0 else 2
        for block in range(depth):
            block_in, block_stride = (cin, stride) if block == 0 else (cout, 1)
            total += _resnet_block(vision.layer_type, block_in, cout, block_stride)
        cin = cout
    return total


def _resnet_block(layer_type: str, cin: int, cout: int, stride: int) -> int:
    shortcut = _conv_bn(cin, cout, 1) if (cin != cout or stride != 1) else 0
    if layer_type == "basic":
        return shortcut + _conv_bn(cin, cout, 3) + _conv_bn(cout, cout, 3)
    reduced = cout // 4  # transformers' bottleneck reduction
    return shortcut + _conv_bn(cin, reduced, 1) + _conv_bn(reduced, reduced, 3) + _conv_bn(reduced, cout, 1)


def _linear(cin: int, cout: int) -> int:
    return cin * cout + cout


def bert_params(hf: dict[str, Any]) -> int:
    """``AutoModel.from_config`` of a BERT-layout encoder with its pooler: embeddings (word,
    position, token type, LayerNorm), per layer q/k/v/o + LayerNorm + FFN + LayerNorm, and the
    pooler. Exact for BERT/MiniLM; for other BERT-style families a close estimate."""
    h, i = hf["hidden_size"], hf["intermediate_size"]
    embeddings = (hf["vocab_size"] + hf["max_position_embeddings"] + hf.get("type_vocab_size", 0)) * h + 2 * h
    layer = 4 * _linear(h, h) + 2 * h + _linear(h, i) + _linear(i, h) + 2 * h
    return embeddings + hf["num_hidden_layers"] * layer + _linear(h, h)


def _bow_params(text: Any) -> int:
    h, m = text.hidden_size, text.mlp_hidden_size
    return text.vocab_size * h + _linear(h, m) + _linear(m, h) + 2 * h


def _attention_params(width: int) -> int:
    return _linear(width, width) + _linear(width, 2 * width) + _linear(width, width)  # q, kv, out


def _decoder_params(vocab: int, width: int, max_length: int, decoder: Any) -> int:
    layer = 4 * (2 * width) + 2 * _attention_params(width) + _linear(width, decoder.ffn_size) + _linear(decoder.ffn_size, width)
    return vocab * width + max_length * width + width + decoder.num_layers * layer + 2 * width + _linear(width, vocab)


def _fpn_params(config: Any) -> int:
    from thinkfast.models.config import STAGE_STRIDES

    width = config.width
    finest = min(config.levels)
    channels = config.vision.channels
    lateral = sum(_linear(channels[STAGE_STRIDES.index(s)], width) for s in STAGE_STRIDES if s >= finest)
    smooth = len(config.levels) * (9 * width * width + width)
    return lateral + smooth + len(config.levels) * width + config.max_frames * width + 2 * width


def estimate_params(config: Any, hf_text_config: dict[str, Any] | None = None) -> int:
    """Parameters of the model a ``FastConfig`` / ``SlowConfig`` describes, from arithmetic
    only (nothing is built or allocated). An ``hf`` fast text tower needs its (validated)
    encoder config dict. Tested equal to ``sum(p.numel())`` for every preset."""
    from thinkfast.models.config import FastConfig, SlowConfig

    if isinstance(config, FastConfig):
        if config.text.kind == "hf":
            if hf_text_config is None:
                raise ThinkfastError("estimate_params of an hf text tower needs its Hugging Face config")
            text, text_width = bert_params(hf_text_config), hf_text_config["hidden_size"]
        else:
            text, text_width = _bow_params(config.text), config.text.hidden_size
        head_width = text_width if config.image_head == "concepts" else config.vision.channels[-1]
        return (backbone_params(config.vision) + _linear(head_width, config.embed_dim)
                + text + _linear(text_width, config.embed_dim))
    if isinstance(config, SlowConfig):
        decoder = _decoder_params(config.vocab_size, config.width, config.max_text_length, config.decoder)
        return backbone_params(config.vision) + _fpn_params(config) + 2 * decoder
    raise TypeError(f"estimate_params needs a FastConfig or SlowConfig, got {type(config).__name__}")


def max_params_limit(max_params: int | None = None) -> int:
    """The parameter limit in force: ``max_params``, else ``$THINKFAST_MAX_PARAMS`` (an integer,
    ``1e10`` notation allowed), else :data:`DEFAULT_MAX_PARAMS`."""
    if max_params is not None:
        if isinstance(max_params, bool) or not isinstance(max_params, numbers.Integral) or max_params < 1:
            raise ThinkfastError(f"max_params must be a positive integer, got {max_params!r}")
        return int(max_params)
    raw = os.environ.get(MAX_PARAMS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PARAMS
    try:
        value = float(raw) if any(c in raw for c in ".eE") else int(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < 1 or value != int(value):
        raise ThinkfastError(f"{MAX_PARAMS_ENV}={raw!r} must be a positive integer (e.g. 5000000000 or 5e9)")
    return int(value)


def check_param_budget(config: Any, hf_text_config: dict[str, Any] | None = None, max_params: int | None = None) -> int:
    """The estimated parameter count, or :class:`InvalidConfigError` when it is above the
    limit (:func:`max_params_limit`). Runs before any module is constructed."""
    count = estimate_params(config, hf_text_config)
    limit = max_params_limit(max_params)
    if count > limit:
        raise InvalidConfigError(
            f"the model would have {count:,} parameters ({count * 4 / 1e9:,.1f} GB as float32), above the limit of "
            f"{limit:,} (if that is intended, raise it with {MAX_PARAMS_ENV}=N or max_params=N)"
        )
    return count
