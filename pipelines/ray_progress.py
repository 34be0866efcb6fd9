"""A live progress line for work that runs inside Ray workers (Train ranks, tasks).

The driver shows the bar (:func:`thinkfast_pipelines.console.progress`); the workers only
know how far they are. A small actor holds the count: workers call ``advance`` on it
(fire and forget, throttled by :class:`ProgressReporter`), and a driver thread polls it.
Works on a multi-node cluster because the actor handle travels with the work.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import ray


@ray.remote(num_cpus=0, max_restarts=0)
class ProgressCounter:
    """How far a distributed job is: ``done`` of ``total`` (total may be learnt late)."""

    def __init__(self) -> None:
        self.done = 0
        self.total: int | None = None

    def set(self, done: int, total: int | None = None) -> None:
        self.done = max(self.done, int(done))
        if total is not None:
            self.total = int(total)

    def get(self) -> tuple[int, int | None]:
        return self.done, self.total


class ProgressReporter:
    """The worker side: at most one message per ``every_s`` seconds, never raises."""

    def __init__(self, counter: Any, every_s: float = 0.5) -> None:  # counter: ActorHandle[ProgressCounter] or None
        self.counter, self.every_s, self._last = counter, every_s, 0.0

    def __call__(self, done: int, total: int | None = None, force: bool = False) -> None:
        if self.counter is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        try:
            self.counter.set.remote(done, total)
        except Exception:  # noqa: BLE001 - progress is cosmetic; the driver may be gone
            self.counter = None


@contextmanager
def remote_progress(desc: str, unit: str = "step", total: int | None = None) -> Iterator[Any]:
    """Yields a ``ProgressCounter`` handle to hand to workers; shows its count until exit."""
    from thinkfast_pipelines.console import progress

    counter = ProgressCounter.remote()
    stop = threading.Event()

    def poll(bar: Any) -> None:
        while not stop.wait(0.5):
            try:
                done, known = ray.get(counter.get.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - a slow poll only delays the bar
                continue
            bar.set(done, known if known is not None else total)

    with progress(total, desc, unit=unit) as bar:
        thread = threading.Thread(target=poll, args=(bar,), daemon=True, name="thinkfast-progress")
        thread.start()
        try:
            yield counter
        finally:
            stop.set()
            thread.join(timeout=2)
            ray.kill(counter)
