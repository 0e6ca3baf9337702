"""pytest plugin (entry point ``pytest11``): a real broker process and communicators connected to it.

Fixtures:

- ``zmq_broker``: an ``aiida-zmq serve`` process on a temporary data directory (function scope), a
  :class:`BrokerProcess` that tests can stop, kill, freeze and restart;
- ``zmq_broker_factory``: makes more of them (e.g. with other options);
- ``zmq_communicator``: a started communicator connected to ``zmq_broker``, closed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .discovery import read_broker_info

__all__ = ('BrokerProcess', 'wait_until')


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = '') -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds.

    For conditions in another process (a file, a pid) there is no event to wait on; everything in this process
    should wait on a future instead.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f'timed out after {timeout}s waiting for {what or condition}')
        time.sleep(interval)


class BrokerProcess:
    """An ``aiida-zmq serve`` subprocess with a fixed endpoint, so that clients find it again after a restart."""

    def __init__(self, data_dir: Path, *args: str, endpoint: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.endpoint = endpoint or f'ipc://{self.data_dir}/broker.sock'
        self.args = args
        self.log_path = self.data_dir.parent / f'{self.data_dir.name}.log'
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 30.0) -> BrokerProcess:
        command = [sys.executable, '-m', 'aiida_zmq.cli', 'serve', '--data-dir', str(self.data_dir)]
        command += ['--bind', self.endpoint, *self.args]
        log = open(self.log_path, 'ab')
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        process = self.process
        wait_until(
            lambda: process.poll() is not None or (read_broker_info(self.data_dir) or {}).get('pid') == process.pid,
            timeout,
            what=f'broker pid {process.pid} to write broker.json',
        )
        if process.poll() is not None:
            raise RuntimeError(f'the broker exited with {process.returncode}:\n{self.log()}')
        return self

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None:
            return 0
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout)
        self.process = None
        return code

    def kill(self) -> None:
        """kill -9: no clean shutdown at all."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(15)
        self.process = None

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def restart(self) -> BrokerProcess:
        self.stop()
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors='replace')
        except OSError:
            return ''


@pytest.fixture
def zmq_broker_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., BrokerProcess]]:
    """Start ``aiida-zmq serve`` processes on fresh data directories; all are stopped at the end of the test."""
    started: list[BrokerProcess] = []
    # Unix socket paths must stay short: use a short private temporary directory rather than pytest's deep one.
    base = Path(tempfile.mkdtemp(prefix='azmq-'))

    def factory(*args: str, data_dir: Path | None = None) -> BrokerProcess:
        directory = data_dir or base / f'b{len(started)}'
        broker = BrokerProcess(directory, *args).start()
        started.append(broker)
        return broker

    yield factory
    for broker in started:
        broker.stop()


@pytest.fixture
def zmq_broker(zmq_broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    """A real broker process with short heartbeats, so that failure detection is quick in tests."""
    return zmq_broker_factory('--heartbeat', '0.2', '--peer-timeout', '2')


@pytest.fixture
def zmq_communicator(zmq_broker: BrokerProcess) -> Iterator[Any]:
    from .communicator import connect

    communicator = connect(zmq_broker.endpoint, heartbeat=0.2, broker_timeout=2.0)
    yield communicator
    communicator.close()
