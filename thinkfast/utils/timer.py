"""A stage timer (after autofaiss): ``with timer.stage("decode"): ...`` logs and records each step."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

logger = logging.getLogger(__name__)


class StageTimer:
    """Accumulates wall time per named stage; ``as_dict()`` goes into manifests and reports."""

    def __init__(self, log: logging.Logger | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._log = log or logger

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._log.info("stage %s: start", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            self._log.info("stage %s: %.2f s", name, elapsed)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}
