"""Server side: start and stop each broker as a subprocess, with bounded waits.

``BROKERS`` names the variants the harness knows: a broker kind plus the codec its clients use.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from .clients import ClientSpec
from .procs import BenchError, child_env, popen, stop_popen, wait_until

# name -> (kind, codec)
BROKERS: dict[str, tuple[str, str]] = {
    'aiida-zmq': ('aiida-zmq', 'default'),
    'aiida-zmq-fast': ('aiida-zmq', 'default'),  # serve --no-fsync: survives crashes, not power cuts (as core.zeromq)
    'aiida-zmq-yaml': ('aiida-zmq', 'aiida'),
    'core.zeromq': ('core.zeromq', 'default'),
    'rabbitmq-yaml': ('rabbitmq', 'aiida'),
    'rabbitmq-json': ('rabbitmq', 'json'),
    # Run from an earlier source tree given with ``--baseline`` (a before/after comparison in one run): not by default.
    'aiida-zmq-baseline': ('aiida-zmq', 'default'),
    # The same broker with each task's history switched off: what the history costs, measured in the same run.
    'aiida-zmq-no-history': ('aiida-zmq', 'default'),
    # Without the fsync and the history that later defaults added: the settings of a baseline from before them
    # (917f59f), so that a before/after run compares code with code as well as defaults with defaults.
    'aiida-zmq-no-fsync-no-history': ('aiida-zmq', 'default'),
}
OPT_IN = {'aiida-zmq-baseline', 'aiida-zmq-no-history', 'aiida-zmq-no-fsync-no-history'}
# ``aiida-zmq serve`` options of a variant (the others run with the defaults).
SERVE_OPTIONS: dict[str, tuple[str, ...]] = {
    'aiida-zmq-no-history': ('--no-task-history',),
    'aiida-zmq-no-fsync-no-history': ('--no-fsync', '--no-task-history'),
    'aiida-zmq-fast': ('--no-fsync',),  # the default is durable: a commit synced before its confirms
}
RMQ_HOST, RMQ_PORT = '127.0.0.1', 5672
RMQ_URL = f'amqp://guest:guest@{RMQ_HOST}:{RMQ_PORT}/'
READY_TIMEOUT = 30.0
RMQ_BOOT_TIMEOUT = 120.0


def _venv_script(name: str) -> str:
    """A console script beside this interpreter (the venv's), else from PATH."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise BenchError(f'{name} not found beside {sys.executable} nor on PATH')
    return found


class BrokerServer:
    """A broker subprocess in its own temporary directory."""

    kind = ''

    def __init__(self, root: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f'{self.kind[:4]}-', dir=root))
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ''

    @property
    def log(self) -> str:
        return str(self.dir / 'server.log')

    def start(self) -> str:
        """Start the broker; return the client endpoint once it is ready."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            stop_popen(self.proc)
            self.proc = None

    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f'{self.kind} is not running')
        return self.proc.pid

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f'{self.kind} exited with {self.proc.returncode}; see {self.log}')
        return True


class AiidaZmqServer(BrokerServer):
    """``aiida-zmq serve --data-dir DIR --bind ipc://DIR/b.sock``; ready once ``broker.json`` exists.

    With ``source``, the broker of that source tree (an earlier aiida-zmq) instead of the installed one.
    """

    kind = 'aiida-zmq'

    def __init__(self, root: Path, source: str | None = None, options: tuple[str, ...] = ()) -> None:
        super().__init__(root)
        self.source = source
        self.options = options

    def start(self) -> str:
        self.endpoint = f'ipc://{self.dir}/b.sock'
        serve = ['serve', '--data-dir', str(self.dir), '--bind', self.endpoint, *self.options]
        if self.source is None:
            self.proc = popen([_venv_script('aiida-zmq'), *serve], self.log, env=child_env())
        else:
            # From the baseline's tree (``-m`` puts the working directory first on ``sys.path``).
            command = [sys.executable, '-m', 'aiida_zmq.cli', *serve]
            self.proc = popen(command, self.log, env=child_env(PYTHONPATH=self.source), cwd=self.source)
        wait_until(lambda: self._alive() and (self.dir / 'broker.json').exists(), READY_TIMEOUT, 'aiida-zmq ready')
        return self.endpoint

    def info(self) -> dict | None:
        try:
            return json.loads((self.dir / 'broker.json').read_text())
        except (OSError, ValueError):
            return None


class CoreZeromqServer(BrokerServer):
    """aiida-core's ``core.zeromq`` service run standalone (no profile), as its circus watcher runs it.

    It binds ``ipc://<mkdtemp>/router.sock`` and writes that directory to ``broker.sockets``, then ``broker.status``
    once the server has started.
    """

    kind = 'core.zeromq'

    def start(self) -> str:
        service_dir = self.dir / 'service'
        args = [sys.executable, '-m', 'aiida.brokers.zeromq.service', '--service-dir', str(service_dir)]
        self.proc = popen(args, self.log, env=child_env())
        status, sockets = service_dir / 'broker.status', service_dir / 'broker.sockets'
        wait_until(lambda: self._alive() and status.exists() and sockets.exists(), READY_TIMEOUT, 'core.zeromq ready')
        self.endpoint = f'ipc://{sockets.read_text().strip()}/router.sock'
        return self.endpoint


def port_open(host: str = RMQ_HOST, port: int = RMQ_PORT) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _sbin(name: str) -> str | None:
    """``name`` on PATH or in /usr/sbin (not always on a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    return f'/usr/sbin/{name}' if Path(f'/usr/sbin/{name}').exists() else None


class RabbitMQ:
    """The local RabbitMQ: used if listening on 127.0.0.1:5672, else started (and stopped again) if installed."""

    def __init__(self, keep: bool = False) -> None:
        self.started_here = False
        self.keep = keep
        self.endpoint = RMQ_URL
        self.skip_reason = ''

    def ensure(self) -> bool:
        """True when RabbitMQ answers; otherwise ``skip_reason`` says why not."""
        if port_open():
            return True
        server = _sbin('rabbitmq-server')
        if not server:
            self.skip_reason = 'rabbitmq-server is not installed (apt-get install -y rabbitmq-server)'
            return False
        env = child_env(
            RABBITMQ_NODE_IP_ADDRESS=RMQ_HOST,
            ERL_EPMD_ADDRESS=RMQ_HOST,
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}',
        )
        print(f'starting RabbitMQ ({server} -detached, bound to {RMQ_HOST}) ...', flush=True)
        try:
            subprocess.run([server, '-detached'], env=env, timeout=60, check=True, capture_output=True)
            self.started_here = True
            wait_until(port_open, RMQ_BOOT_TIMEOUT, 'RabbitMQ to listen on 5672', interval=0.5)
        except (subprocess.SubprocessError, OSError, BenchError) as exc:
            self.skip_reason = f'could not start RabbitMQ: {exc}'
            return False
        return True

    def stop(self) -> None:
        if not self.started_here or self.keep:
            return
        ctl = _sbin('rabbitmqctl') or 'rabbitmqctl'
        try:
            subprocess.run([ctl, 'shutdown'], check=False, timeout=60, capture_output=True)
        except (subprocess.SubprocessError, OSError) as exc:
            print(f'warning: rabbitmqctl shutdown failed: {exc}', flush=True)
        self.started_here = False

    def version(self) -> str:
        ctl = _sbin('rabbitmqctl') or 'rabbitmqctl'
        try:
            out = subprocess.run(
                [ctl, 'version'], check=False, timeout=30, capture_output=True, text=True
            ).stdout.strip()
        except (subprocess.SubprocessError, OSError):
            return 'unknown'
        return out or 'unknown'


def make_spec(name: str, endpoint: str, source: str | None = None) -> ClientSpec:
    kind, codec = BROKERS[name]
    return ClientSpec(kind=kind, endpoint=endpoint, codec=codec, source=source)
