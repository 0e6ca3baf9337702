"""Rate-limited logging: what a peer can make the broker (or a client) repeat is logged a few times, then counted.

A client that sends a million malformed messages must not write a million log lines: the disk under the daemon log
is shared with AiiDA's repository. Each kind of event from each peer (the ``key``) gets ``burst`` lines per
``interval`` seconds; what is held back past that is counted, and the next line for that key says how many were
suppressed meanwhile, so the log stays honest about volume without repeating it::

    LIMITED = RateLimitedLog(LOGGER)
    LIMITED.warning('dropped a malformed message from %r: %s', peer, exception, key=('malformed', peer))

Keys are forgotten once idle for a few intervals, so a flood of distinct peers cannot grow the table without bound
(it is also capped at ``max_keys``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ('RateLimitedLog',)


class _Window:
    __slots__ = ('logged', 'start', 'suppressed')

    def __init__(self, start: float) -> None:
        self.start = start
        self.logged = 0
        self.suppressed = 0


class RateLimitedLog:
    """Log through ``logger`` at most ``burst`` records per ``key`` every ``interval`` seconds.

    :param clock: the time source (monotonic seconds); tests pass their own.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 5,
        interval: float = 10.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or interval <= 0:
            raise ValueError('burst must be at least 1 and interval positive')
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._windows: dict[Hashable, _Window] = {}
        self._next_sweep = 0.0
        self.suppressed_total = 0

    def debug(self, message: str, *args: Any, key: Hashable) -> bool:
        return self.log(logging.DEBUG, message, *args, key=key)

    def info(self, message: str, *args: Any, key: Hashable) -> bool:
        return self.log(logging.INFO, message, *args, key=key)

    def warning(self, message: str, *args: Any, key: Hashable) -> bool:
        return self.log(logging.WARNING, message, *args, key=key)

    def error(self, message: str, *args: Any, key: Hashable) -> bool:
        return self.log(logging.ERROR, message, *args, key=key)

    def log(self, level: int, message: str, *args: Any, key: Hashable, exc_info: bool = False) -> bool:
        """Log the record unless ``key`` used up its burst in this interval; return whether it was logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        self._sweep(now)
        window = self._windows.get(key)
        if window is None or now - window.start >= self.interval:
            suppressed = window.suppressed if window is not None else 0
            if window is None and len(self._windows) >= self.max_keys:
                # Too many distinct keys at once (a flood of peers): they share one window, which still limits.
                key = ('__overflow__',)
                window = self._windows.get(key)
                if window is not None and now - window.start < self.interval:
                    return self._count(window, level, message, args, exc_info)
                suppressed = window.suppressed if window is not None else 0
            window = self._windows[key] = _Window(now)
            if suppressed:
                message = f'{message} ({suppressed} similar message(s) suppressed in the last {self.interval:.0f}s)'
        return self._count(window, level, message, args, exc_info)

    def _count(self, window: _Window, level: int, message: str, args: tuple, exc_info: bool) -> bool:
        if window.logged >= self.burst:
            window.suppressed += 1
            self.suppressed_total += 1
            return False
        window.logged += 1
        if window.logged == self.burst:
            message = f'{message} (further ones in the next {self.interval:.0f}s are counted, not logged)'
        self.logger.log(level, message, *args, exc_info=exc_info)
        return True

    def _sweep(self, now: float) -> None:
        """Forget keys idle for three intervals (reporting what they suppressed), at most once per interval."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.interval
        stale = [key for key, window in self._windows.items() if now - window.start >= 3 * self.interval]
        for key in stale:
            window = self._windows.pop(key)
            if window.suppressed:
                self.logger.log(
                    logging.INFO,
                    'suppressed %d more message(s) of kind %r in the last interval',
                    window.suppressed,
                    key,
                )
