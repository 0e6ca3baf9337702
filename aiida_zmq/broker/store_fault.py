"""The task store failing (disk full, read-only, I/O errors), as the broker lives with it.

The broker refuses new tasks, keeps everything it holds in memory, answers heartbeats and ADMIN, and tries the
store again after a backoff (``store_retry``, doubling up to ``store_retry_max``) instead of every turn of its loop:
194 ERROR lines in 10 s, and no ADMIN answer, before.
"""

from __future__ import annotations

import time

__all__ = ('StoreFault', 'describe_fault')


def describe_fault(exception: BaseException) -> str:
    """What kind of fault a store error is, in the words an operator acts on."""
    text = str(exception).lower()
    if 'full' in text:
        return 'disk full'
    if 'readonly' in text or 'read-only' in text:
        return 'read-only'
    if 'disk i/o' in text:
        return 'disk I/O error'
    return 'store error'


class StoreFault:
    """Whether the store fails now, since when and why, and when to try it again."""

    def __init__(self, retry: float, retry_max: float) -> None:
        self._retry = retry
        self._retry_max = retry_max
        self.current: dict | None = None  # kind, error, since (wall clock); None while the store writes
        self.backoff = 0.0
        self._retry_at = 0.0  # monotonic

    def writable(self) -> bool:
        """The store writes, or its next try is due."""
        return self.current is None or time.monotonic() >= self._retry_at

    def failed(self, exception: BaseException) -> None:
        """The store failed (again): wait longer before the next try."""
        if self.current is None:
            self.backoff = self._retry
            self.current = {'error': str(exception), 'kind': describe_fault(exception), 'since': time.time()}
        else:
            self.backoff = min(2 * self.backoff, self._retry_max)
            self.current['error'] = str(exception)
        self._retry_at = time.monotonic() + self.backoff

    def recovered(self) -> dict | None:
        """The store wrote: the fault that is over, if there was one."""
        fault, self.current = self.current, None
        return fault

    def retry_in(self) -> float:
        return max(0.0, self._retry_at - time.monotonic())

    def text(self, data_dir: object) -> str:
        """The fault in a sentence that says what to do."""
        assert self.current is not None
        return (
            f'the broker cannot write its task store ({self.current["kind"]}: {self.current["error"]}); '
            f'it tries again in {self.retry_in():.1f}s. Free space (df -h {data_dir}) or fix the file system'
        )

    def status(self) -> dict | None:
        """For ADMIN status: ``None`` while the store writes."""
        if self.current is None:
            return None
        return {**self.current, 'retry_in': round(self.retry_in(), 1)}
