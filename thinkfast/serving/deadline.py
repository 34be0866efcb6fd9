"""Deadlines and retries for the calls one request makes to the service's stages.

A request to the search service crosses several processes (encoder, retriever shards,
re-ranker, catalog). When one of them dies mid-request its in-flight calls may never
answer, and a client would wait until it gives up. So every stage call here is bounded
twice: by a per-attempt timeout and by the request's overall :class:`Deadline`. A call
that times out or fails in a way ``is_retryable`` accepts (the replica died, was
unreachable) is sent again, and the router places it on another replica where one
exists; the stages are pure functions of their input, so a repeat is harmless. When no
attempt succeeds within the deadline the request fails with
:class:`~thinkfast.serving.errors.ServiceUnavailable` (an HTTP 503 with ``Retry-After``),
never with a hang or an internal error.

Pure ``asyncio``: the Ray-specific parts (how a call is made and cancelled, which errors
mean "this replica is gone") are passed in by the Serve wiring.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from thinkfast.serving.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

# below this, another attempt cannot reach a replica and come back: give up instead
MIN_ATTEMPT_S = 0.05


@dataclass(frozen=True)
class Deadline:
    """An absolute point on the monotonic clock by which a request must be answered."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return self.at - time.monotonic()


@dataclass(frozen=True)
class RetryPolicy:
    """How one stage call is bounded: ``attempt_timeout_s`` per try, ``retries`` more
    tries after the first, and ``retry_after_s`` for the client when all fail."""

    attempt_timeout_s: float
    retries: int = 2
    retry_after_s: float = 2.0


async def call_with_retries(
    stage: str,
    start: Callable[[], T],
    wait: Callable[[T], Awaitable[object]],
    cancel: Callable[[T], None],
    is_retryable: Callable[[BaseException], bool],
    policy: RetryPolicy,
    deadline: Deadline,
) -> object:
    """``wait(start())``, retried on timeouts and retryable errors within ``deadline``.

    ``start`` sends the call and returns its handle (a Serve ``DeploymentResponse``),
    ``wait`` awaits its result, ``cancel`` abandons it (best effort) after a timeout. A
    non-retryable error propagates unchanged (the caller maps it); exhausted attempts or
    an expired deadline raise :class:`ServiceUnavailable` naming the stage and the last
    reason."""
    reason = "no time left"
    for attempt in range(policy.retries + 1):
        budget = min(policy.attempt_timeout_s, deadline.remaining())
        if budget < MIN_ATTEMPT_S:
            break
        call = start()
        try:
            return await asyncio.wait_for(wait(call), budget)
        except asyncio.TimeoutError:
            reason = f"no answer within {budget:.1f} s"
            _cancel_quietly(cancel, call)
        except asyncio.CancelledError:  # the request itself was abandoned (its deadline, a disconnect)
            _cancel_quietly(cancel, call)
            raise
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not is_retryable(exc):
                raise
            reason = type(exc).__name__
        logger.warning("%s call failed (attempt %d of %d): %s", stage, attempt + 1, policy.retries + 1, reason)
    raise ServiceUnavailable(stage, reason, policy.retry_after_s)


def _cancel_quietly(cancel: Callable[[T], None], call: T) -> None:
    try:
        cancel(call)
    except Exception:  # noqa: BLE001 - cancelling an abandoned call is best effort
        logger.debug("cancelling an abandoned call failed", exc_info=True)


async def within(deadline: Deadline, work: Awaitable[T], stage: str, retry_after_s: float) -> T:
    """``await work``, or :class:`ServiceUnavailable` once ``deadline`` passes: the backstop
    over a whole request, whatever its stage calls do."""
    try:
        return await asyncio.wait_for(work, max(deadline.remaining(), 0.0))
    except asyncio.TimeoutError:
        raise ServiceUnavailable(stage, "the request deadline passed", retry_after_s) from None


__all__ = ["Deadline", "RetryPolicy", "call_with_retries", "within"]
