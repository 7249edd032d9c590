"""Rate-limited logging for what peers send: a hostile peer must not be able to flood the log.

Every path that logs about input from the network (a malformed frame, message or
scope op) logs through a `LogBudget`: at most `budget` records per `window` seconds;
past that, records are counted, and the count is logged as one line when the next
window opens. Arguments are formatted with `terms.short_repr` by the callers, so no
record can trip Python's int-to-str limit or grow with the input.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

__all__ = ["LogBudget"]

DEFAULT_BUDGET: Final = 20
DEFAULT_WINDOW: Final = 1.0


class LogBudget:
    """At most `budget` records per `window` seconds to `logger`; the rest are counted."""

    __slots__ = ("logger", "budget", "window", "what", "_start", "_count", "_suppressed")

    def __init__(self, logger: logging.Logger, what: str, *, budget: int = DEFAULT_BUDGET,
                 window: float = DEFAULT_WINDOW) -> None:
        self.logger = logger
        self.what = what  # names the source in the summary line, e.g. "node a@h:1"
        self.budget = budget
        self.window = window
        self._start = time.monotonic()
        self._count = 0
        self._suppressed = 0

    @property
    def suppressed(self) -> int:
        """Records left out in the current window so far."""
        return self._suppressed

    def log(self, level: int, message: str, *args: Any) -> bool:
        """Log `message % args` at `level` if the budget allows; True if it was logged."""
        now = time.monotonic()
        if now - self._start >= self.window:
            if self._suppressed:
                self.logger.log(level, "%s: %d more such messages were not logged", self.what, self._suppressed)
            self._start = now
            self._count = 0
            self._suppressed = 0
        if self._count < self.budget:
            self._count += 1
            self.logger.log(level, message, *args)
            return True
        self._suppressed += 1
        return False

    def warning(self, message: str, *args: Any) -> bool:
        return self.log(logging.WARNING, message, *args)

    def error(self, message: str, *args: Any) -> bool:
        return self.log(logging.ERROR, message, *args)
