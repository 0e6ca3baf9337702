"""``aiida-zmq top`` in a real terminal (tmux: send-keys, capture-pane) against a broker with known queues."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import aiida_zmq
from aiida_zmq.testing import wait_until

pytestmark = pytest.mark.skipif(shutil.which('tmux') is None, reason='tmux is not installed')


class Tmux:
    """A tmux server of this test only (its own socket in the test's directory), one window running a command."""

    def __init__(self, directory: Path) -> None:
        self.socket = str(directory / 'tmux.sock')

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ['tmux', '-S', self.socket, *args], capture_output=True, text=True, timeout=30, check=check
        )

    def screen(self) -> str:
        return self('capture-pane', '-p', '-t', 'top').stdout

    def screen_with(self, text: str) -> str | None:
        screen = self.screen()
        return screen if text in screen else None

    def running(self) -> bool:
        return self('has-session', '-t', 'top', check=False).returncode == 0


def _row(screen: str, name: str) -> list[str]:
    for line in screen.splitlines():
        if line.split()[:1] == [name]:
            return line.split()
    raise AssertionError(f'no row {name!r} in:\n{screen}')


def _order(screen: str) -> list[str]:
    names = ('alpha', 'beta', 'gamma')
    return [line.split()[0] for line in screen.splitlines() if line.split()[:1] and line.split()[0] in names]


def test_top_shows_queues_workers_and_quits(zmq_broker, tmp_path: Path) -> None:
    sender = aiida_zmq.connect(zmq_broker.endpoint, name='sender')
    worker = aiida_zmq.connect(zmq_broker.endpoint, name='busy-worker')
    release = threading.Event()
    holding = threading.Semaphore(0)

    def hold(_communicator, body):
        holding.release()
        release.wait(60)
        return body

    tmux = Tmux(tmp_path)
    try:
        for _ in range(3):
            sender.task_queue('alpha').task_send('x', no_reply=True)
        sender.task_queue('beta').task_send('y', no_reply=True)
        worker.task_queue('gamma', prefetch_count=2).add_task_subscriber(hold)
        for index in range(3):
            sender.task_queue('gamma').task_send(index, no_reply=True)
        assert holding.acquire(timeout=10)

        def held() -> bool:
            clients = sender.admin('status', timeout=10)['clients']
            return any(client['name'] == 'busy-worker' and client['held'] == 2 for client in clients)

        wait_until(held, timeout=10, what='the worker to hold two tasks (prefetch 2), the third to wait')
        command = f'{sys.executable} -m aiida_zmq.cli top --endpoint {zmq_broker.endpoint} --interval 0.5'
        tmux('new-session', '-d', '-s', 'top', '-x', '80', '-y', '24', command)  # the smallest usual terminal
        screen = wait_until(lambda: tmux.screen_with('gamma'), timeout=30, what='top to draw')
        assert _row(screen, 'alpha')[1:4] == ['3', '0', '0'], screen
        assert _row(screen, 'beta')[1:4] == ['1', '0', '0'], screen
        assert _row(screen, 'gamma')[1:4] == ['1', '1', '2'], screen  # one waits, one consumer, two in flight
        busy = _row(screen, 'busy-worker')
        assert busy[2:4] == ['2', '2'] and len(busy[4:]) == 2, screen  # two slots, two held, their ids
        assert 'sorted by depth' in screen and 'q quit' in screen, screen
        assert _order(screen) == ['alpha', 'beta', 'gamma'], screen  # deepest first, by name when equal
        assert 'dead letters 0' in screen and 'commits' in screen, screen
        tmux('send-keys', '-t', 'top', 's')  # by in flight
        screen = wait_until(lambda: tmux.screen_with('sorted by in flight'), timeout=10, what='top to sort again')
        assert _order(screen) == ['gamma', 'alpha', 'beta'], screen
        tmux('send-keys', '-t', 'top', 'r')  # reversed
        screen = wait_until(lambda: tmux.screen_with('(reversed)'), timeout=10, what='top to reverse')
        assert _order(screen) == ['beta', 'alpha', 'gamma'], screen
        tmux('send-keys', '-t', 'top', 'q')
        wait_until(lambda: not tmux.running(), timeout=10, what='top to quit on q')
    finally:
        release.set()
        tmux('kill-server', check=False)
        worker.close()
        sender.close()
