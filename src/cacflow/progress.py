"""Progress lines a person can follow on a long run: done/total, rate, time left."""

from __future__ import annotations

import logging
import time


class Progress:
    def __init__(self, stage: str, total: int, logger: logging.Logger, every_s: float = 10.0):
        self.stage, self.total, self.log, self.every_s = stage, total, logger, every_s
        self.done = 0
        self.started = self._last = time.perf_counter()
        self.log.info("%s: %d to process", stage, total)

    def step(self, what: str = "") -> None:
        self.done += 1
        now = time.perf_counter()
        if self.done == self.total or now - self._last >= self.every_s:
            self._last = now
            rate = self.done / max(now - self.started, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            self.log.info(
                "%s: %d/%d done (%.2f/s, about %.0f s left)%s",
                self.stage, self.done, self.total, rate, left, f" - {what}" if what else "",
            )
