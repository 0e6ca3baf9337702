"""Run a real ``circusd`` for tests: its own config, sockets and logs in a temporary directory."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aiida_zmq.circus import CircusCallError, CircusController, call_while_busy
from aiida_zmq.testing import stop_arbiter

CIRCUSD = str(Path(sys.executable).parent / 'circusd')
START_TIMEOUT = 20.0


@dataclass
class Arbiter:
    """A running ``circusd`` and what tests need to talk to it."""

    process: subprocess.Popen[bytes]
    controller: str
    workdir: Path

    def call(self, command: str, **properties: object) -> dict[str, object]:
        """Send a command; retried while the arbiter is busy (e.g. still starting a watcher just added)."""
        return call_while_busy(
            self.controller, lambda controller: controller.call(command, **properties), time.monotonic() + 15
        )

    def pids(self, name: str) -> list[int]:
        with CircusController(self.controller) as controller:
            return controller.watcher_pids(name)

    def wait_for(self, condition: object, timeout: float = 10.0, what: str = 'condition') -> None:
        """Poll ``condition`` with a deadline: circus publishes no event we could wait on from here."""
        assert callable(condition)
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f'timed out after {timeout}s waiting for {what}')
            time.sleep(0.05)


def start_circusd(workdir: Path, config: str) -> subprocess.Popen[bytes]:
    ini = workdir / 'circus.ini'
    ini.write_text(config)
    return subprocess.Popen(
        [CIRCUSD, '--log-output', str(workdir / 'circusd.log'), str(ini)],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_until_up(controller: str, process: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f'circusd exited with {process.returncode}')
        try:
            with CircusController(controller, timeout=1.0) as client:
                client.call('list')
            return
        except CircusCallError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def stop_circusd(process: subprocess.Popen[bytes], controller: str, timeout: float = 15.0) -> None:
    """``quit`` the arbiter (retried while another command holds its lock); kill what is left at the deadline."""
    stop_arbiter(process, controller, timeout)
