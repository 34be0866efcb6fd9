"""Errors of the artifact layer: one base (:class:`StoreError`) so callers can catch every
"this embeddings / token / manifest artifact is missing or damaged" case at once."""

from __future__ import annotations

from typing import Sequence

from thinkfast.errors import ThinkfastError


class StoreError(ThinkfastError):
    """An embeddings or token artifact is missing, has the wrong schema, or is damaged."""


class UnknownKeyError(StoreError, KeyError):
    """Keys asked of a :class:`~thinkfast.store.TokenStore` that it does not hold (``.missing`` lists them)."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = list(missing)
        shown = ", ".join(repr(k) for k in self.missing[:5])
        more = f" (and {len(self.missing) - 5} more)" if len(self.missing) > 5 else ""
        super().__init__(f"{len(self.missing)} key(s) not in the token store: {shown}{more}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class EmbedManifestError(StoreError):
    """``<emb>/manifest.json`` is not valid JSON, not an embed manifest, or malformed."""


class MissingEmbedManifestError(EmbedManifestError):
    """``<emb>/manifest.json`` does not exist: not an ``embed`` output, or an unfinished run."""
