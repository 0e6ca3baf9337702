"""Fixtures for the circus attachment tests: a real ``circusd``."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from circusd_helpers import Arbiter, start_circusd, stop_circusd, wait_until_up


def ignores_sigterm(pids: list[int]) -> bool:
    """Whether the (single) process ignores SIGTERM yet: Python needs a moment to install the handler."""
    if len(pids) != 1:
        return False
    for line in Path(f'/proc/{pids[0]}/status').read_text().splitlines():
        if line.startswith('SigIgn:'):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.fixture
def arbiter(tmp_path: Path) -> Iterator[Arbiter]:
    """A ``circusd`` with one unrelated watcher (``workers``, two processes), standing in for AiiDA's workers.

    The ``stubborn`` watcher ignores SIGTERM and has a graceful timeout: stopping it keeps the arbiter busy for a while,
    which is how tests make ``add`` collide with another exclusive command.
    """
    # Short socket paths: pytest's tmp_path can exceed the 107 bytes of a unix socket path.
    sockets = Path(os.environ.get('XDG_RUNTIME_DIR') or '/tmp') / f'azc-{os.getpid()}-{time.monotonic_ns() % 10**8}'
    sockets.mkdir(mode=0o700)
    controller = f'ipc://{sockets}/c.sock'
    config = textwrap.dedent(
        f"""
        [circus]
        endpoint = {controller}
        pubsub_endpoint = ipc://{sockets}/p.sock
        statsd = false
        warmup_delay = 0

        [watcher:workers]
        cmd = {sys.executable} -c "import time; time.sleep(600)"
        numprocesses = 2

        [watcher:stubborn]
        cmd = {sys.executable} -c "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        graceful_timeout = 1.5
        numprocesses = 1
        """
    )
    process = start_circusd(tmp_path, config)
    try:
        wait_until_up(controller, process)
        arbiter = Arbiter(process=process, controller=controller, workdir=tmp_path)
        arbiter.wait_for(lambda: len(arbiter.pids('workers')) == 2, what='the workers')
        arbiter.wait_for(lambda: ignores_sigterm(arbiter.pids('stubborn')), what='stubborn to ignore SIGTERM')
        yield arbiter
        # It would hold the arbiter's quit for its whole graceful timeout: a second and a half per test.
        with contextlib.suppress(Exception):
            arbiter.call('signal', name='stubborn', signum=signal.SIGKILL)
    finally:
        stop_circusd(process, controller)
        for path in sockets.iterdir():
            path.unlink()
        sockets.rmdir()
