"""pytest plugin (entry point ``pytest11``): a real broker process and communicators connected to it.

Fixtures:

- ``zmq_broker``: an ``aiida-zmq serve`` process on a temporary data directory (function scope), a
  :class:`BrokerProcess` that tests can stop, kill, freeze and restart;
- ``zmq_broker_factory``: makes more of them (e.g. with other options);
- ``zmq_communicator``: a started communicator connected to ``zmq_broker``, closed afterwards;
- ``zmq_arbiter``: a real ``circusd`` running the broker and its events and health plugins on temporary paths, an
  :class:`ArbiterProcess` (``zmq_arbiter_factory`` makes more; ``zmq_arbiter_communicator`` connects to it). See
  ``docs/circus.md``;
- ``aiida_profile_zmq``: a temporary AiiDA profile whose broker is aiida-zmq, built on aiida-core's own fixtures
  (``pytest_plugins = ['aiida.tools.pytest_fixtures']``); see its docstring and ``docs/aiida.md``.

Option ``--aiida-broker=zmq`` (ini setting ``aiida_broker = zmq``): aiida-core's own session profile (``aiida_profile``
and the fixtures built on it) on this broker, whatever broker a conftest asks for; see :mod:`.pytest_aiida_broker` and
``docs/testing-plugins.md``.

Nothing here imports AiiDA until an AiiDA fixture is used: installing aiida-zmq must not change other projects' tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import pytest_aiida_broker
from .discovery import default_ipc_bind, read_broker_info
from .waiting import wait_until

__all__ = ('ArbiterProcess', 'BrokerProcess', 'forget_stored_tasks', 'wait_until')


class BrokerProcess:
    """An ``aiida-zmq serve`` subprocess with a fixed endpoint, so that clients find it again after a restart."""

    def __init__(self, data_dir: Path, *args: str, endpoint: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # ``DIR/broker.sock`` unless that is too long for a unix socket (a deep temporary directory): then a short one,
        # as the AiiDA plugin picks for a profile (the run's own TMPDIR can be deep enough for that).
        self.endpoint = (
            endpoint or default_ipc_bind(self.data_dir, uuid.uuid4().hex) or f'ipc://{self.data_dir}/broker.sock'
        )
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
    """Start ``aiida-zmq serve`` processes on fresh data directories; all are stopped at the end of the test, and
    the directories made here removed (a ``data_dir`` given by the caller stays: it is the caller's)."""
    import shutil

    started: list[BrokerProcess] = []
    # Unix socket paths must stay short: use a short private temporary directory rather than pytest's deep one.
    base = Path(tempfile.mkdtemp(prefix='azmq-'))

    def factory(*args: str, data_dir: Path | None = None) -> BrokerProcess:
        directory = data_dir or base / f'b{len(started)}'
        broker = BrokerProcess(directory, *args).start()
        started.append(broker)
        return broker

    try:
        yield factory
    finally:
        try:
            for broker in started:
                broker.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)


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


# --- circus arbiter fixtures ---------------------------------------------------------------------------------------


class ArbiterProcess:
    """A real ``circusd`` running a profile's broker and its plugins (events, health) on temporary paths.

    Built from the same watcher definitions as ``aiida-zmq circus-config`` (``via='ini'``, the default) or attached
    to a bare arbiter with ``add`` as the AiiDA daemon does (``via='add'``). Everything lives in ``base``: sockets
    (``c.sock``, ``p.sock``, ``s.sock``), the broker's data directory ``data/`` and the logs ``logs/``.
    """

    def __init__(
        self,
        base: Path,
        *,
        profile: str = 'test',
        broker_args: tuple[str, ...] = ('--heartbeat', '0.2', '--peer-timeout', '5'),
        health: Any = None,
        plugins: bool = True,
        stats: bool = False,
        via: str = 'ini',
    ) -> None:
        from .circus import HealthOptions, watcher_name

        self.base = Path(base)
        self.profile = profile
        self.broker_args = broker_args
        # Quick checks by default, so that tests of a hung broker finish in seconds; a broker that answered once gets
        # no grace, and a respawned one gets enough to start on a loaded machine (1 s killed it again and again).
        self.health = health or HealthOptions(interval=0.5, timeout=1.0, max_failures=2, start_grace=10.0)
        self.plugins = plugins
        self.via = via
        self.controller = f'ipc://{self.base}/c.sock'
        self.pubsub = f'ipc://{self.base}/p.sock'
        self.stats = f'ipc://{self.base}/s.sock' if stats else None
        self.data_dir = self.base / 'data'
        self.log_dir = self.base / 'logs'
        self.broker_watcher = watcher_name(profile)
        self.process: subprocess.Popen | None = None

    @property
    def broker_endpoint(self) -> str:
        return f'ipc://{self.data_dir}/broker.sock'

    def specs(self) -> list[Any]:
        from .circus import broker_watchers

        return broker_watchers(
            self.profile,
            str(self.data_dir),
            controller=self.controller,
            pubsub=self.pubsub,
            log_dir=str(self.log_dir),
            binds=[self.broker_endpoint],
            extra_args=self.broker_args,
            health=self.health,
            plugins=self.plugins,
        )

    def start(self, timeout: float = 30.0) -> ArbiterProcess:
        from .circus import attach_broker, render_ini

        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        specs = self.specs() if self.via == 'ini' else []
        ini = self.base / 'circus.ini'
        ini.write_text(render_ini(specs, controller=self.controller, pubsub=self.pubsub, stats=self.stats))
        circusd = Path(sys.executable).parent / 'circusd'
        command = (
            [str(circusd)] if circusd.exists() else [sys.executable, '-c', 'from circus.circusd import main; main()']
        )
        self.process = subprocess.Popen(
            [*command, '--log-output', str(self.log_dir / 'circusd.log'), str(ini)],
            cwd=self.base,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        process = self.process
        wait_until(lambda: process.poll() is not None or self._answers(), timeout, what='circusd to answer')
        if process.poll() is not None:
            raise RuntimeError(f'circusd exited with {process.returncode}; see {self.log_dir / "circusd.log"}')
        if self.via == 'add':
            attach_broker(
                self.controller,
                self.profile,
                str(self.data_dir),
                str(self.log_dir),
                binds=[self.broker_endpoint],
                extra_args=self.broker_args,
                health=self.health,
                plugins=self.plugins,
            )
        self.wait_for_broker(timeout)
        return self

    def _answers(self) -> bool:
        from .circus import CircusCallError

        try:
            self.call('list')
        except CircusCallError:
            return False
        return True

    def call(self, command: str, busy_timeout: float = 15.0, **properties: Any) -> dict[str, Any]:
        """Send a command to the arbiter's controller (``circusctl`` equivalent).

        Retried while the arbiter is busy with another exclusive command (e.g. still starting a watcher), for at most
        ``busy_timeout`` seconds, as an operator would.
        """
        from .circus import call_while_busy

        return call_while_busy(
            self.controller, lambda controller: controller.call(command, **properties), time.monotonic() + busy_timeout
        )

    def pids(self, name: str) -> list[int]:
        return [int(pid) for pid in self.call('list', name=name).get('pids', [])]

    def broker_pid(self) -> int | None:
        pids = self.pids(self.broker_watcher)
        return pids[0] if pids else None

    def wait_for_broker(self, timeout: float = 30.0, *, not_pid: int | None = None) -> dict[str, Any]:
        """Wait until the broker watcher's process wrote ``broker.json`` (a new one if ``not_pid``); return it."""

        def ready() -> dict[str, Any] | None:
            info = read_broker_info(self.data_dir)
            pid = self.broker_pid()
            if info is not None and pid is not None and info.get('pid') == pid and pid != not_pid:
                return info
            return None

        return wait_until(ready, timeout, interval=0.05, what=f'the broker of {self.base} to come up')

    def connect(self, **options: Any) -> Any:
        """Return a communicator connected to this arbiter's broker (the caller closes it)."""
        from .communicator import connect

        options.setdefault('heartbeat', 0.2)
        options.setdefault('broker_timeout', 2.0)
        return connect(self.broker_endpoint, **options)

    def log(self, name: str | None = None) -> str:
        """Return the log of a watcher (default: the broker's); ``circusd`` for the arbiter's own."""
        path = self.log_dir / f'{name or self.broker_watcher}.log'
        try:
            return path.read_text(errors='replace')
        except OSError:
            return ''

    def all_pids(self) -> list[int]:
        import psutil

        if self.process is None:
            return []
        try:
            return [child.pid for child in psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 20.0) -> None:
        """``quit`` the arbiter (retried while busy); kill whatever is left at the deadline. Leaves nothing running."""
        if self.process is None:
            return
        process, self.process = self.process, None
        stop_arbiter(process, self.controller, timeout)


def stop_arbiter(process: subprocess.Popen[bytes], controller: str, timeout: float = 20.0) -> None:
    """Stop the ``circusd`` run by ``process``: ``quit`` through ``controller`` (retried while another command holds
    the arbiter), and at the deadline kill it and its children. Raises if a child outlives it: nothing is left running.
    """
    import psutil

    from .circus import CircusCallError, call_while_busy

    children = []
    with contextlib.suppress(psutil.NoSuchProcess):
        children = psutil.Process(process.pid).children(recursive=True)
    for child in children:
        # A SIGSTOPped child would hold the arbiter's graceful shutdown for its whole timeout.
        with contextlib.suppress(psutil.NoSuchProcess):
            child.resume()
    deadline = time.monotonic() + timeout
    if process.poll() is None:
        with contextlib.suppress(CircusCallError):  # refused, or busy past the deadline: killed below
            call_while_busy(controller, lambda client: client.call('quit', waiting=True), deadline)
    try:
        process.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
    # circus gives its children sessions of their own: make sure none outlived the arbiter.
    _gone, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    if alive:
        raise RuntimeError(f'processes outlived the arbiter: {[child.pid for child in alive]}')


@pytest.fixture
def zmq_arbiter_factory() -> Iterator[Callable[..., ArbiterProcess]]:
    """Boot real ``circusd`` arbiters running the broker and its plugins; all are stopped after the test.

    Keyword arguments go to :class:`ArbiterProcess` (``profile``, ``broker_args``, ``health``, ``plugins``, ``stats``,
    ``via``). Sockets live in a short private directory under ``/tmp`` (unix socket paths are limited to ~100 bytes).
    """
    import shutil

    started: list[ArbiterProcess] = []
    bases: list[Path] = []

    def factory(**options: Any) -> ArbiterProcess:
        base = Path(tempfile.mkdtemp(prefix='azarb-'))
        bases.append(base)
        arbiter = ArbiterProcess(base, **options)
        started.append(arbiter)
        return arbiter.start()

    yield factory
    errors = []
    for arbiter in started:
        try:
            arbiter.stop()
        except Exception as exception:
            errors.append(exception)
    for base in bases:
        shutil.rmtree(base, ignore_errors=True)
    if errors:
        raise errors[0]


@pytest.fixture
def zmq_arbiter(zmq_arbiter_factory: Callable[..., ArbiterProcess]) -> ArbiterProcess:
    """A real ``circusd`` with the broker, events and health watchers of profile ``test``, on temporary paths."""
    return zmq_arbiter_factory()


@pytest.fixture
def zmq_arbiter_communicator(zmq_arbiter: ArbiterProcess) -> Iterator[Any]:
    """A communicator connected to ``zmq_arbiter``'s broker, closed afterwards."""
    communicator = zmq_arbiter.connect()
    yield communicator
    communicator.close()


# --- AiiDA profiles on this broker: the ``--aiida-broker`` option and ``aiida_profile_zmq`` --------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    pytest_aiida_broker.add_option(parser)


def pytest_configure(config: pytest.Config) -> None:
    pytest_aiida_broker.configure(config)


def _stop_daemon(profile: Any, timeout: float = 60.0) -> list[int]:
    """Stop ``profile``'s daemon if it runs and wait until its processes (workers, broker, plugins) are gone.

    Returns the pids that had to be killed (nothing, normally): nothing of the session is left running.
    """
    import psutil
    from aiida.engine.daemon.client import DaemonException, get_daemon_client

    client = get_daemon_client(profile.name)
    pid = client.get_daemon_pid()
    if pid is None:
        return []
    processes: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        circusd = psutil.Process(pid)
        processes = [circusd, *circusd.children(recursive=True)]
    with contextlib.suppress(DaemonException):
        client.stop_daemon(wait=True, timeout=int(timeout))
    _gone, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    return [process.pid for process in alive]


@contextlib.contextmanager
def profile_on_zmq(aiida_profile_factory: Any, aiida_config: Any, **options: Any) -> Iterator[Any]:
    """Create and load a profile with aiida-core's ``aiida_profile_factory``, its broker aiida-zmq.

    ``options`` go to the factory (``storage_backend``, ``storage_config``, ``name``, ...); ``broker_backend`` and
    ``broker_config`` become ``zmq`` with ``ZmqBroker``'s default configuration (unless already ``zmq``). The broker's
    data directory is inside the temporary configuration. The broker starts with the daemon (a process submitted while
    the daemon is stopped waits in its store) and is stopped with it, at the end at the latest.
    """
    from .aiida.broker import ENTRY_POINT_NAME, ZmqBroker

    if options.get('broker_backend') != ENTRY_POINT_NAME or options.get('broker_config') is None:
        options['broker_backend'] = ENTRY_POINT_NAME
        options['broker_config'] = ZmqBroker.get_default_config()
    with aiida_profile_factory(aiida_config, **options) as profile:
        reset_storage = profile.reset_storage

        def reset_storage_and_its_tasks() -> None:
            # aiida-core's reset_storage stops the daemon (the broker with it) and empties the storage; the tasks in
            # the broker's store then name processes that are gone, and pks start again: a worker of a later test
            # would continue whatever new process got a stale task's pk (aiida-core's own suite leaves such tasks:
            # its `verdi process repair` tests revive made-up pks into the queue). A fresh storage, a fresh queue.
            reset_storage()
            forget_stored_tasks(profile)

        profile.reset_storage = reset_storage_and_its_tasks
        try:
            yield profile
        finally:
            killed = _stop_daemon(profile)
            if killed:
                import warnings

                message = f'processes of the daemon of {profile.name} outlived `verdi daemon stop`: killed {killed}'
                warnings.warn(message, stacklevel=2)


def forget_stored_tasks(profile: Any) -> int:
    """Delete every task in the store of a profile whose broker is not running; return how many there were.

    With a broker running (it outlived its daemon), its launch queue's waiting tasks are purged through it instead.
    """
    from . import store
    from .aiida.broker import broker_data_dir, launch_queue_name
    from .exceptions import BrokerRunning

    data_dir = broker_data_dir(profile)
    try:
        with store.stopped_store(data_dir) as task_store:
            if task_store is None:
                return 0
            ids = [task.id for task in task_store.load_delivered()]
            for queue in task_store.ready_counts():
                ids.extend(task_store.ready_ids(queue))
            ids.extend(task_store.dead_ids())
            task_store.delete(ids)
            return len(ids)
    except BrokerRunning:
        import aiida_zmq

        communicator = aiida_zmq.connect(data_dir=data_dir)
        try:
            return int(communicator.admin('tasks-purge', queue=launch_queue_name(profile))['purged'])
        finally:
            communicator.close()


@pytest.fixture(scope='session')
def aiida_profile_zmq(aiida_config: Any, aiida_profile_factory: Any) -> Iterator[Any]:
    """A temporary AiiDA profile (``core.sqlite_dos`` storage) whose broker is aiida-zmq, loaded for the session.

    With ``--aiida-broker=zmq`` (or ``aiida_broker = zmq`` in the pytest configuration) aiida-core's own
    ``aiida_profile`` is such a profile, with no change to any conftest; see ``docs/testing-plugins.md``. Without it,
    make this fixture the session's profile, and aiida-core's daemon fixtures (``started_daemon_client``,
    ``submit_and_await``) run their daemon with this broker::

        pytest_plugins = ['aiida.tools.pytest_fixtures']

        @pytest.fixture(scope='session', autouse=True)
        def aiida_profile(aiida_profile_zmq):
            return aiida_profile_zmq

    The broker's data directory is inside the temporary configuration. The broker starts with the daemon (a process
    submitted while the daemon is stopped waits in its store) and is stopped with it, at the end at the latest.
    """
    with profile_on_zmq(aiida_profile_factory, aiida_config) as profile:
        yield profile
