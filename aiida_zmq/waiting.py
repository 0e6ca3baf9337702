"""Waiting for a condition in another process (a file, a pid, a socket) by polling it, always with a bound.

Within one process, wait on a future or an event instead. Imports nothing (the test fixtures of
:mod:`aiida_zmq.testing` and the benchmark harness in ``bench/`` both use it, the latter without pytest).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ('wait_until',)


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = '') -> Any:
    """Poll ``condition`` until it returns something truthy and return that; :class:`TimeoutError` after ``timeout``
    seconds, naming ``what`` was waited for."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f'timed out after {timeout}s waiting for {what or condition}')
        time.sleep(interval)
