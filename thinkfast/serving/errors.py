"""Typed reasons a search service cannot answer a request, raised by the serving stages.

They cross process boundaries (a Ray Serve replica hands them back to the ingress as
*values* of a batch, see ``thinkfast_pipelines.serve.deployments``), so each one pickles
to itself: ``__reduce__`` rebuilds it from the arguments of its ``__init__``, not from
its message (``Exception``'s default, which would turn the message into the first
argument). The HTTP layer maps them to status codes; the library knows nothing of HTTP.
"""

from __future__ import annotations

from typing import TypeVar, Union

from thinkfast.errors import DecodeError, ThinkfastError

# what each model does with a query, for the message
_VERB = {"fast": "encode", "slow": "score"}


class ServingError(ThinkfastError):
    """A request the service understood but cannot answer (the cause is the request)."""


class UnscorableQuery(ServingError):
    """The query has no tokens ``model`` ("fast" or "slow") can use: mean pooling (fast)
    or a caption likelihood (slow) of zero tokens is undefined."""

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(f"the query has no tokens the {model} model can {_VERB.get(model, 'use')}")

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return type(self), (self.model,)


class UnknownMediaKey(ServingError, KeyError):
    """The key is not in the corpus. The message never repeats the key (it came from a URL)."""

    def __init__(self, message: str = "unknown media key") -> None:
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown key"


class MediaUnavailable(ServingError, DecodeError):
    """The key is in the corpus but its media cannot be decoded. Still a ``DecodeError``
    (``reason`` is its tag: ``empty``, ``corrupt``, ...), told to the client as a 404."""

    def __init__(self, reason: str, detail: str = "") -> None:
        DecodeError.__init__(self, reason, detail)
        self.args = (f"media of this key is unavailable ({reason})",)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.reason, self.detail)


class UnreadableImage(ServingError, DecodeError):
    """An image query whose bytes cannot be used: not an image, truncated, or more pixels
    than the service accepts. Still a ``DecodeError`` (``reason`` is the same tag embed
    writes to ``rejected/``: ``empty``, ``corrupt``, ``truncated``, ``too_large``, ...), so a
    query image is refused for the reason a corpus image would be; told to the client as
    a 422 that names the problem (never a 500: the cause is the upload)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        detail = " ".join(str(detail).split())[:300]  # PIL's messages can be long; this is one line
        DecodeError.__init__(self, reason, detail)
        self.args = (f"the query image cannot be used ({reason})" + (f": {detail}" if detail else ""),)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.reason, self.detail)


class ServiceUnavailable(ThinkfastError):
    """The service could not answer in time: a stage's replicas died, hung or were
    overloaded past the request's deadline, and retries did not help. Not the request's
    fault (so not a :class:`ServingError`): told to the client as a 503 with
    ``Retry-After: retry_after_s``. The message names the stage, never the request."""

    def __init__(self, stage: str, reason: str, retry_after_s: float = 2.0) -> None:
        self.stage = stage
        self.reason = reason
        self.retry_after_s = retry_after_s
        super().__init__(f"the {stage} stage is unavailable ({reason}); retry later")

    def __reduce__(self) -> tuple[type, tuple[str, str, float]]:
        return type(self), (self.stage, self.reason, self.retry_after_s)


T = TypeVar("T")
# what a batched stage hands back per item: its result, or why it has none
Outcome = Union[T, ServingError]


def raise_if_error(outcome: Outcome[T]) -> T:
    """The result of one item of a batch, raising the error it carries instead."""
    if isinstance(outcome, ServingError):
        raise outcome
    return outcome


__all__ = ["MediaUnavailable", "Outcome", "ServiceUnavailable", "ServingError", "UnknownMediaKey", "UnreadableImage",
           "UnscorableQuery", "raise_if_error"]
