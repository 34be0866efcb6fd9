"""The one config convention (library-side, so configs in ``thinkfast/`` can use it; argparse
is the standard library): a frozen dataclass whose fields carry their help text, and
command-line flags generated from those fields.

    @dataclass(frozen=True)
    class EmbedConfig:
        batch_size: int = option(64, "rows per model call")
        device: Literal["cpu", "cuda"] = option("cpu", "model device")

    add_config_arguments(parser, EmbedConfig)            # --batch-size, --device {cpu,cuda}
    config = config_from_args(EmbedConfig, args)          # only the flags the user gave override

A field added once appears in the Python API, the CLI (with its help and default) and the
saved config. Flags default to ``None`` on the parser, so "not given" stays distinguishable
from "given the default value" (training merges preset < file < flags on that basis).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

HELP = "help"
FLAG = "flag"


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           cli: bool = True, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text (and optionally its flag name, or ``cli=False``
    for fields that are not command-line options, such as test hooks)."""
    metadata = {HELP: help, FLAG: flag, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get(FLAG) or "--" + f.name.replace("_", "-")


def cli_fields(cls: type, exclude: typing.Iterable[str] = ()) -> list[dataclasses.Field]:
    skip = set(exclude)
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in skip]


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                         exclude: typing.Iterable[str] = ()) -> None:
    """One flag per field of ``cls`` (help from the field, the dataclass default shown)."""
    hints = get_type_hints(cls)
    for f in cli_fields(cls, exclude):
        tp = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get(HELP, "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": None}
        if tp is bool:
            if default is True:
                name = "--no-" + flag_name(f)[2:]
                parser.add_argument(name, action="store_const", const=False, help=f"{help_text} (default: on)", **kwargs)
            else:
                parser.add_argument(flag_name(f), action="store_const", const=True, help=help_text, **kwargs)
            continue
        if get_origin(tp) is Literal:
            kwargs["choices"] = list(get_args(tp))
            kwargs["type"] = type(get_args(tp)[0])
        elif get_origin(tp) in (tuple, list):
            inner = [a for a in get_args(tp) if a is not Ellipsis]
            kwargs["type"] = inner[0] if inner else str
            kwargs["nargs"] = "+"
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {tp!r}")
        shown = "" if default is None else f" (default: {default if not isinstance(default, tuple) else ' '.join(map(str, default))})"
        parser.add_argument(flag_name(f), help=help_text + shown, metavar=f.name.upper() if "choices" not in kwargs else None,
                            **kwargs)


def given(cls: type, args: argparse.Namespace, exclude: typing.Iterable[str] = ()) -> dict[str, Any]:
    """The fields of ``cls`` the user set on the command line."""
    out = {}
    for f in cli_fields(cls, exclude):
        value = getattr(args, f.name, None)
        if value is not None:
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def config_from_args(cls: type, args: argparse.Namespace, base: Any = None, exclude: typing.Iterable[str] = ()) -> Any:
    """``base`` (default: ``cls()``) with the flags the user gave applied."""
    return dataclasses.replace(base if base is not None else cls(), **given(cls, args, exclude))
