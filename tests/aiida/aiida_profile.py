"""A throwaway AiiDA profile with the ``zmq`` broker, driven through subprocesses (see ``conftest.py``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from aiida_zmq.testing import wait_until

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
DRIVER = HERE / 'zmq_test_driver.py'
COMMAND_TIMEOUT = 180.0
#: How long the arbiter may take to exit after ``quit``: every watcher's graceful stop, on a loaded machine.
ARBITER_EXIT_TIMEOUT = 120.0


def _exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class CommandFailed(AssertionError):
    """A subprocess of a test exited with an error; the message has its output."""


class AiidaZmqProfile:
    """A throwaway AiiDA profile with the ``zmq`` broker, driven through subprocesses."""

    def __init__(self, name: str, aiida_path: Path) -> None:
        self.name = name
        self.aiida_path = aiida_path
        self.env = dict(os.environ)
        self.env.update(
            {
                'AIIDA_PATH': str(aiida_path),
                'PATH': f'{BIN}{os.pathsep}{os.environ.get("PATH", "")}',
                'PYTHONUNBUFFERED': '1',
                # The driver imports its helper modules from here; the daemon workers do not need them.
                'PYTHONPATH': os.pathsep.join(filter(None, [str(HERE), os.environ.get('PYTHONPATH')])),
            }
        )
        self.env.pop('AIIDA_PROFILE', None)
        self._info: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f'<AiidaZmqProfile {self.name} in {self.aiida_path}>'

    # --- running things --------------------------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        """Run a command with this profile's environment; raise :class:`CommandFailed` (with its output) on error."""
        result = subprocess.run(
            list(argv), check=False, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.aiida_path
        )
        if check and result.returncode != 0:
            raise CommandFailed(
                f'{" ".join(argv)} exited with {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n'
                f'{result.stderr}'
            )
        return result

    def verdi(self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        return self.run(str(BIN / 'verdi'), '-p', self.name, *args, check=check, timeout=timeout)

    def aiida_zmq(
        self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess:
        return self.run(str(BIN / 'aiida-zmq'), *args, check=check, timeout=timeout)

    def driver(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
        """Run a :mod:`zmq_test_driver` command in this profile and return its JSON answer."""
        result = self.run(sys.executable, str(DRIVER), self.name, *args, check=False, timeout=timeout)
        lines = [line for line in result.stdout.splitlines() if line.startswith('{')]
        if result.returncode != 0 or not lines:
            raise CommandFailed(
                f'driver {" ".join(args)} exited with {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n'
                f'{result.stderr}'
            )
        return json.loads(lines[-1])

    # --- what the profile is -----------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Profile facts from the driver: uuid, broker data dir, launch queue, daemon log dir."""
        if self._info is None:
            self._info = self.driver('info')
        return self._info

    @property
    def data_dir(self) -> Path:
        return Path(self.info()['data_dir'])

    @property
    def watcher(self) -> str:
        from aiida_zmq.circus import watcher_name

        return watcher_name(self.name)

    # --- the daemon --------------------------------------------------------------------------------------------------

    def daemon_start(self, workers: int = 2) -> None:
        self.verdi('daemon', 'start', str(workers))
        # The broker comes up when the first worker asks for it: wait for it, so tests start from a running system.
        wait_until(self.broker_pid, timeout=60, interval=0.1, what=f'the broker of {self.name} to start')
        wait_until(
            lambda: len(self.worker_pids()) == workers and self.broker_consumers() >= workers,
            timeout=60,
            interval=0.1,
            what=f'{workers} workers of {self.name} to consume',
        )

    def daemon_stop(self) -> None:
        # ``verdi daemon stop`` waits ``daemon.timeout`` (2 s by default) for circus, while busy workers can take longer
        # to stop: ask with a generous timeout, as a user with busy workers would.
        self.verdi('daemon', 'stop', '--timeout', '60', timeout=90)

    def daemon_log(self) -> Path:
        """The daemon workers' log (aiida-core's ``daemon/log/aiida-PROFILE.log``)."""
        return self.aiida_path / '.aiida' / 'daemon' / 'log' / f'aiida-{self.name}.log'

    def daemon_pid(self) -> int | None:
        pid_file = self.aiida_path / '.aiida' / 'daemon' / f'circus-{self.name}.pid'
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if psutil.pid_exists(pid) else None

    def circus_endpoint(self) -> str:
        sockets = (self.aiida_path / '.aiida' / 'daemon' / f'circus-{self.name}.sockets').read_text().strip()
        return f'ipc://{sockets}/circus.c.sock'

    def watcher_pids(self, watcher: str) -> list[int]:
        from aiida_zmq.circus import CircusCallError, CircusController

        try:
            with CircusController(self.circus_endpoint(), timeout=5.0) as controller:
                return controller.watcher_pids(watcher)
        except (CircusCallError, OSError):
            return []

    def worker_pids(self) -> list[int]:
        return self.watcher_pids(f'aiida-{self.name}')

    def broker_pid(self) -> int | None:
        from aiida_zmq.discovery import read_live_broker_info

        info = read_live_broker_info(self.data_dir)
        return int(info['pid']) if info else None

    def broker_status(self) -> dict[str, Any]:
        """The broker's own ``admin('status')``, through a plain communicator (no AiiDA in this process)."""
        import aiida_zmq

        communicator = aiida_zmq.connect(data_dir=self.data_dir, connect_timeout=10.0)
        try:
            return communicator.admin('status', timeout=10.0)
        finally:
            communicator.close()

    def task_holders(self) -> dict[int, int]:
        """How many of the profile's process tasks each consumer (by pid) holds now, per the broker."""
        queue = self.info()['queue']
        clients = self.broker_status()['clients']
        return {client['pid']: client['held'] for client in clients if queue in (client.get('prefetch') or {})}

    def broker_consumers(self) -> int:
        status = self.broker_status()
        return int(status['queues'].get(self.info()['queue'], {}).get('consumers', 0))

    def processes(self) -> list[psutil.Process]:
        """Every process that still runs for this profile: arbiter, workers, broker, plugins."""
        marker = str(self.aiida_path)
        found = []
        for process in psutil.process_iter(['pid', 'cmdline', 'environ']):
            try:
                cmdline = ' '.join(process.info['cmdline'] or [])
                environ = process.info['environ'] or {}
            except (psutil.Error, TypeError):
                continue
            if process.pid == os.getpid():
                continue
            if marker in cmdline or environ.get('AIIDA_PATH') == marker:
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
        return found

    def teardown(self) -> list[str]:
        """Stop the daemon, kill what is left by pid; return what had to be killed."""
        arbiter = self.daemon_pid()
        if arbiter is not None:
            try:
                self.daemon_stop()
            except (CommandFailed, subprocess.TimeoutExpired):
                pass
            # ``quit`` answers before circus has stopped its watchers (the broker's before_stop hook waits for the
            # workers, each stopped gracefully): the arbiter exits once they are all stopped or killed, so wait for
            # the arbiter itself, bounded; a process still running after it is one that `verdi daemon stop` left.
            # (Polled: psutil's wait on a process not our child would wait out the bound on a zombie.)
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: _exited(arbiter), timeout=ARBITER_EXIT_TIMEOUT, interval=0.2, what='circusd to exit')
        leftovers = []
        try:
            # The arbiter's children were reaped before it exited; a moment for any exit still on its way.
            wait_until(lambda: not self.processes(), timeout=15, interval=0.2, what='the processes to exit')
        except TimeoutError:
            pass
        for process in self.processes():
            leftovers.append(f'{process.pid}: {" ".join(process.cmdline())}')
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        return leftovers


class ProfileFactory:
    def __init__(self, aiida_path: Path) -> None:
        self.aiida_path = aiida_path
        self.profiles: list[AiidaZmqProfile] = []

    def __call__(self, name: str | None = None, workers: int = 0) -> AiidaZmqProfile:
        name = name or f'zmq-test-{len(self.profiles) + 1}'
        profile = AiidaZmqProfile(name, self.aiida_path)
        self.profiles.append(profile)
        profile.aiida_zmq('presto', '--profile-name', name, '--no-set-default')
        if workers:
            profile.daemon_start(workers)
        return profile
