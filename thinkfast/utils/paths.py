"""Paths a user hands over are made absolute once, at the boundary.

Ray tasks, actors, Train workers, Serve replicas and jobs do not run in the user's
working directory, so a relative path that reaches one of them names another place
(``runs/demo/fast_nce is not a model directory``). Every public entry point that takes a
path marks those parameters with :func:`user_paths`; URIs with a scheme (``s3://``,
``gs://``, ``http://``) and hub ids are left alone. ``file://`` URIs become plain paths.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def absolute_uri(uri: str) -> str:
    """``uri`` unchanged when it has a scheme, else the absolute local path it names."""
    uri = os.fspath(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif _SCHEME.match(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def absolute_model_ref(ref: str) -> str:
    """A model reference: an existing local directory (or one written as a path: ``./x``,
    ``/x``, ``~/x``) becomes absolute; anything else (a hub id like ``openai/clip-vit-base-patch32``,
    an ``s3://`` URI) passes unchanged."""
    ref = os.fspath(ref)
    if _SCHEME.match(ref) and not ref.startswith("file://"):
        return ref
    looks_local = ref.startswith(("/", ".", "~", "file://")) or os.path.exists(os.path.expanduser(ref))
    return absolute_uri(ref) if looks_local else ref


def _convert(value: Any, convert: Callable[[str], str]) -> Any:
    if isinstance(value, (str, os.PathLike)):
        return convert(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value):
        return type(value)(convert(v) for v in value)
    return value  # None, a loaded model object, ...


def user_paths(*names: str, models: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorate a public function so the parameters ``names`` (paths / URIs) and ``models``
    (model directories or hub ids) arrive absolute, whatever the caller's working directory."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)
        unknown = [n for n in (*names, *models) if n not in signature.parameters]
        if unknown:
            raise TypeError(f"{fn.__qualname__} has no parameter(s) {unknown}")

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind_partial(*args, **kwargs)
            for name in names:
                if name in bound.arguments:
                    bound.arguments[name] = _convert(bound.arguments[name], absolute_uri)
            for name in models:
                if name in bound.arguments:
                    bound.arguments[name] = _convert(bound.arguments[name], absolute_model_ref)
            return fn(*bound.args, **bound.kwargs)

        return inner  # type: ignore[return-value]

    return wrap
