"""pytest plugin of the upstream runner: aiida-core's ``stop_daemon`` asks again while circus is still starting.

Loaded for aiida-core's suite on both brokers (``-p daemon_stop_when_busy``), so that the reference run on RabbitMQ
and the run on aiida-zmq are of the same code.

An upstream race, not a broker's: aiida-core 2.9.4 writes the daemon's PID file before circus has started its
watchers, and its test fixtures (``started_daemon_client``, ``stopped_daemon_client``) stop a daemon the moment it
counts as running. circus refuses a ``quit`` that arrives while it still starts its watchers ("arbiter is already
running arbiter_start_watchers command"), and ``DaemonClient.stop_daemon`` then deletes the daemon's socket
directory all the same: the arbiter runs on, nobody can reach it, and every later test that needs the daemon fails or
waits for its timeout. Measured on ``tests/cmdline/commands/test_daemon.py`` alone, unpatched: 3 of 14 runs on
RabbitMQ 3.10.8, 3 of 19 on aiida-zmq, each time with that refusal as ``quit``'s answer; once in a full run on
aiida-zmq, 92 tests failed after it.

The patch: a ``quit`` that circus refuses as busy is sent again (every 50 ms, for up to 10 s), as
``aiida_zmq.testing.stop_arbiter`` does for this project's own tests. Nothing else changes. Users meet the same race
when ``verdi daemon stop`` follows ``verdi daemon start`` within a fraction of a second (docs/aiida.md, known limits).
"""

from __future__ import annotations

import time
from typing import Any

BUSY_RETRY_FOR = 10.0
BUSY_RETRY_EVERY = 0.05


def _refused_as_busy(response: Any) -> bool:
    from aiida_zmq.circus import is_busy

    return isinstance(response, dict) and response.get('status') == 'error' and is_busy(str(response.get('reason')))


def pytest_configure(config: Any) -> None:
    from aiida.engine.daemon.client import DaemonClient

    original = DaemonClient.call_client

    def call_client(self: Any, command: dict[str, Any], timeout: int | None = None) -> dict[str, Any]:
        response = original(self, command, timeout=timeout)
        if command.get('command') != 'quit':
            return response
        deadline = time.monotonic() + BUSY_RETRY_FOR
        while _refused_as_busy(response) and time.monotonic() < deadline:
            time.sleep(BUSY_RETRY_EVERY)  # circus says nothing when its command ends: ask again
            response = original(self, command, timeout=timeout)
        return response

    DaemonClient.call_client = call_client  # type: ignore[method-assign]
