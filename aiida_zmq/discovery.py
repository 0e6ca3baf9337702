"""Find a running broker: from its data directory (``broker.json``) or through a circus arbiter.

No AiiDA import here: the AiiDA plugin (:mod:`aiida_zmq.aiida.broker`) maps a profile to a data directory and a circus
controller endpoint, everything below works from those two.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import tempfile
import time
import typing as t
from pathlib import Path

from .endpoints import ipc_path
from .exceptions import BrokerNotFound

__all__ = (
    'BROKER_INFO_FILENAME',
    'BrokerNotFound',
    'broker_info_alive',
    'choose_endpoint',
    'data_dir_from_watcher',
    'default_ipc_bind',
    'discover_endpoint',
    'find_broker_via_arbiter',
    'lock_held',
    'lock_holder',
    'read_broker_info',
    'short_socket_dir',
    'silent_broker',
    'wait_for_broker_info',
    'watcher_pids_from_stats',
)

LOGGER = logging.getLogger(__name__)

BROKER_INFO_FILENAME = 'broker.json'
BROKER_SOCKET_FILENAME = 'broker.sock'
# Seconds a broker's process may seem to be created after the ``started`` time it wrote (clock granularity and
# steps); used only where the broker's lock cannot be probed.
CREATE_TIME_TOLERANCE = 60.0
# ``sun_path`` is 108 bytes on Linux and 104 on macOS; stay clearly below both, the broker may add a suffix.
MAX_IPC_PATH = 100

BrokerInfo = dict[str, t.Any]


def read_broker_info(data_dir: str | os.PathLike[str]) -> BrokerInfo | None:
    """Return the content of ``DIR/broker.json`` written by ``aiida-zmq serve``, or ``None``.

    ``None`` when the file is absent, unreadable, or not the expected shape: the broker writes it atomically once its
    sockets are bound, so a partial file only means "not ready yet" to the caller. The result also names the directory
    it was read from (``data_dir``): :func:`broker_info_alive` looks at the broker's lock there.
    """
    path = Path(data_dir) / BROKER_INFO_FILENAME
    try:
        info = json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exception:
        LOGGER.debug('ignoring unreadable %s: %s', path, exception)
        return None
    if not isinstance(info, dict) or not isinstance(info.get('endpoints'), list) or not info['endpoints']:
        LOGGER.debug('ignoring malformed %s: %r', path, info)
        return None
    # The directory the file was read from, not one the file might name: the lock that proves the broker alive is
    # beside this very file.
    info['data_dir'] = str(data_dir)
    return info


def _process_alive_since(pid: int, started: object) -> bool:
    """Whether ``pid`` runs, is not a zombie and existed at ``started`` (a wall-clock time), when that is a number.

    A pid alone proves nothing after kill -9 or a reboot: the kernel hands it to the next process. A process created
    after the broker wrote ``started`` cannot be that broker. The comparison is one-sided on purpose: a broker run in
    a thread of an older process (tests) or after a slow interpreter start has a process older than ``started``.
    """
    try:
        import psutil

        process = psutil.Process(pid)
        if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
            return False
        if isinstance(started, (int, float)) and not isinstance(started, bool):
            # On Linux ``create_time`` is derived from the boot time, which /proc/stat gives in whole seconds and which
            # moves when the clock is stepped: allow a minute. A pid recycled after a reboot is younger by far more.
            return process.create_time() <= started + CREATE_TIME_TOLERANCE
        return True
    except Exception:  # psutil.NoSuchProcess, AccessDenied (a process of another user: not our broker)
        return False


def _lock_free(data_dir: str | os.PathLike[str]) -> bool | None:
    """Whether nobody holds the data directory's lock (``broker.lock``) now; ``None`` when that cannot be told.

    The broker takes that lock (:func:`aiida_zmq.store.broker_lock`, an exclusive ``flock``) before it writes
    ``broker.json`` and lets go of it only after removing the file, and the kernel releases it when the process dies
    however it dies. A free lock thus proves that no broker runs, whatever pid ``broker.json`` names. A held lock
    does not prove the opposite: :func:`aiida_zmq.store.submit_offline` holds the same lock for a few milliseconds,
    and a new broker holds it before it rewrites ``broker.json``; the caller checks the pid for that.

    The probe must neither block nor steal the lock, nor disturb :func:`~aiida_zmq.store.broker_lock`'s protocol:

    - it never creates the file (no ``O_CREAT``) and never removes it: only a holder removes it, while holding it. A
      missing file is a free lock, since a holder's file stays in place until it lets go;
    - a shared, non-blocking ``flock`` fails at once while anyone holds the exclusive lock, and probes never exclude
      each other. When it succeeds, closing the descriptor right away releases it: a broker starting in that instant
      retries after 50 ms, an offline submit gets ``BrokerRunning`` and its caller looks again;
    - ``flock``, not ``fcntl``/``lockf``: POSIX record locks belong to the process, so a probe from inside the
      broker's process (a broker in a thread) would see its own lock as free and, on closing, drop it; ``flock``
      locks belong to the open file and conflict across descriptors, the same on Linux and macOS.
    """
    from .store import LOCK_FILENAME  # here, not at the top: ``store`` pulls in kiwipy, discovery stays light

    path = Path(data_dir) / LOCK_FILENAME
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0))
        except FileNotFoundError:
            return True
        except OSError as exception:
            LOGGER.debug('cannot open %s to probe it: %s', path, exception)
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            except OSError as exception:  # e.g. ENOLCK on a file system without locks
                LOGGER.debug('cannot probe the lock %s: %s', path, exception)
                return None
            try:
                same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                return True  # its holder let go and removed it, and nobody took it since
            if same_file:
                return True
            # The file we opened was removed by its holder and another took its place: probe that one.
        finally:
            os.close(fd)  # releases the shared lock if we got it
    return None


def lock_held(data_dir: str | os.PathLike[str]) -> bool:
    """Whether someone (a running or starting broker, an offline submit) holds the data directory's lock now."""
    return _lock_free(data_dir) is False


def broker_info_alive(info: BrokerInfo) -> bool:
    """Return whether the broker that wrote ``info`` still runs.

    The broker removes ``broker.json`` on a clean exit, but not when it is killed (-9, OOM) or the machine stops: then
    the file outlives the process and must not send clients to a dead socket, even when its pid now belongs to another
    process. Alive means: the pid runs, and the broker's lock in ``info['data_dir']`` (set by
    :func:`read_broker_info`) is held.

    The lock decides whenever it can be probed. A held lock with a recycled pid can only mean a broker starting on
    that directory (or an offline submit for a few milliseconds): clients then reach the endpoint the new broker is
    binding, which is right. The process's age against ``started`` decides only when the lock cannot be probed (no
    ``data_dir``, a file system without ``flock``): it depends on the wall clock, and a clock stepped while a broker
    runs must not make a live broker look dead for good.
    """
    pid = info.get('pid')
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    data_dir = info.get('data_dir')
    lock_free = _lock_free(data_dir) if isinstance(data_dir, str) and data_dir else None
    if lock_free:
        return False
    # Held (or not to be probed): the pid must run; its age counts only where the lock could not be probed.
    return _process_alive_since(pid, info.get('started') if lock_free is None else None)


def read_live_broker_info(data_dir: str | os.PathLike[str]) -> BrokerInfo | None:
    """Return ``broker.json`` of ``data_dir`` if the broker that wrote it is alive, else ``None``."""
    info = read_broker_info(data_dir)
    if info is not None and broker_info_alive(info):
        return info
    return None


def silent_broker(data_dir: str | os.PathLike[str] | None, endpoint: str | None = None) -> BrokerInfo | None:
    """For a broker that did not answer: its ``broker.json`` if it still runs, with ``process_state`` added.

    A broker that runs but does not answer (stopped by SIGSTOP, stuck on a disk, busy) is not a broker that is not
    running: the fix differs (``kill -CONT``, a look at its log, a restart) and a second broker would be refused.
    Without ``data_dir``, an ``ipc://`` endpoint's directory is looked at (the default socket is beside
    ``broker.json``). ``None`` when no live broker announced itself there.
    """
    if data_dir is None and endpoint and (socket_path := ipc_path(endpoint)) is not None:
        candidate = Path(socket_path).parent
        info = read_broker_info(candidate)
        if info is not None and endpoint in info['endpoints']:
            data_dir = candidate
    if data_dir is None:
        return None
    info = read_live_broker_info(data_dir)
    if info is None:
        return None
    try:
        import psutil

        info['process_state'] = psutil.Process(info['pid']).status()
    except Exception:  # gone meanwhile, or not ours to look at
        return None
    return info


def wait_for_broker_info(
    data_dir: str | os.PathLike[str],
    timeout: float,
    *,
    poll_interval: float = 0.1,
    still_starting: t.Callable[[], bool] | None = None,
) -> BrokerInfo:
    """Wait until a live broker has written ``DIR/broker.json`` and return its content.

    Polling with a deadline: there is no event to wait on across processes (the file is written by another process
    that may not even exist yet). ``still_starting`` is consulted every second: when it returns ``False`` (e.g. the
    circus watcher is gone) the wait ends early instead of running into the timeout.

    :raises BrokerNotFound: when no live broker appeared within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + 1.0
    while True:
        info = read_live_broker_info(data_dir)
        if info is not None:
            return info
        now = time.monotonic()
        if now >= deadline:
            raise BrokerNotFound(f'no running broker wrote {Path(data_dir) / BROKER_INFO_FILENAME} within {timeout}s')
        if still_starting is not None and now >= next_check:
            next_check = now + 1.0
            if not still_starting():
                raise BrokerNotFound(f'the broker for {data_dir} is not starting (its watcher is not active)')
        time.sleep(min(poll_interval, max(deadline - now, 0.0)))


def choose_endpoint(info: BrokerInfo) -> str:
    """Pick the endpoint a local client should use: ``ipc://`` first (cheapest, protected by file permissions)."""
    endpoints = [str(endpoint) for endpoint in info['endpoints']]
    for endpoint in endpoints:
        if ipc_path(endpoint) is not None:
            return endpoint
    return endpoints[0]


def short_socket_dir() -> Path:
    """This user's private directory for broker sockets whose default path would be too long.

    ``$XDG_RUNTIME_DIR/aiida-zmq-<uid>``, or the same under the temporary directory (``$TMPDIR``, ``/tmp``). Any user
    may create a name in ``/tmp`` first, so the directory is checked for its owner, not only its mode
    (:func:`aiida_zmq.security.ensure_private_dir`), before a socket is put in it or looked for there.

    :raises aiida_zmq.exceptions.UnsafePath: when it belongs to another user, is a link, or is open to others.
    """
    from .security import ensure_private_dir  # here: security pulls in zmq, discovery stays light

    base = os.environ.get('XDG_RUNTIME_DIR') or tempfile.gettempdir()
    return ensure_private_dir(Path(base) / f'aiida-zmq-{os.geteuid()}')


def default_ipc_bind(data_dir: str | os.PathLike[str], key: str) -> str | None:
    """Return an explicit ``ipc://`` bind for ``data_dir`` when ``DIR/broker.sock`` would be too long, else ``None``.

    ``None`` means "let ``aiida-zmq serve`` bind its default". Otherwise the socket goes into this user's
    :func:`short_socket_dir`, named by ``key`` (e.g. the profile UUID) so two profiles never share it.
    """
    default = Path(data_dir) / BROKER_SOCKET_FILENAME
    if len(os.fsencode(str(default))) < MAX_IPC_PATH:
        return None
    path = short_socket_dir() / f'{key[:16]}.sock'
    if len(os.fsencode(str(path))) >= MAX_IPC_PATH:
        raise OSError(f'cannot find a short enough directory for the broker socket of {data_dir}')
    return f'ipc://{path}'


def lock_holder(data_dir: str | os.PathLike[str]) -> int | None:
    """The pid holding the data directory's lock, from ``/proc/locks`` (Linux); ``None`` when unknown or free.

    Only to name the holder in a message: the lock itself is what decides (:func:`_lock_free`).
    """
    from .store import LOCK_FILENAME

    try:
        info = os.stat(Path(data_dir) / LOCK_FILENAME)
        lines = Path('/proc/locks').read_text().splitlines()
    except OSError:
        return None
    wanted = f'{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}'
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have "->" after the number.
        if len(fields) >= 6 and fields[1] == 'FLOCK' and fields[5] == wanted and fields[4].isdigit():
            return int(fields[4])
    return None


def data_dir_from_watcher(options: dict[str, t.Any]) -> str | None:
    """Return the ``--data-dir`` of a broker watcher from its circus ``options`` (``cmd`` and ``args``)."""
    argv: list[str] = []
    cmd = options.get('cmd')
    if isinstance(cmd, str):
        argv.extend(shlex.split(cmd))
    args = options.get('args')
    if isinstance(args, list):
        argv.extend(str(arg) for arg in args)
    elif isinstance(args, str):
        argv.extend(shlex.split(args))
    for index, arg in enumerate(argv):
        if arg == '--data-dir' and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith('--data-dir='):
            return arg.split('=', 1)[1]
    return None


def _ipc_missing(endpoint: str) -> bool:
    """Whether ``endpoint`` is an ``ipc://`` socket that does not exist: no arbiter there, no need to wait for one."""
    path = ipc_path(endpoint)
    return path is not None and not os.path.exists(path)


def watcher_pids_from_stats(
    stats_endpoint: str, watcher: str, *, timeout: float = 3.0, wait_all: bool = False
) -> list[int]:
    """Return the pids of ``watcher`` as published on an arbiter's stats endpoint (``circusd-stats``).

    ``circusd-stats`` publishes ``stat.<watcher>.<pid>`` for every live process about once a second, so this waits for
    the next report (half a second on average): slower than asking the controller, but it needs no controller access.
    The first pid reported is returned (the broker watcher is a singleton); ``wait_all`` waits for a whole round
    instead, to name every process of a watcher with several.

    :raises BrokerNotFound: when nothing about ``watcher`` was published within ``timeout`` seconds.
    """
    import zmq

    prefix = f'stat.{watcher}.'.encode()
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    try:
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, prefix)
        socket.connect(stats_endpoint)
        deadline = time.monotonic() + timeout
        pids: set[int] = set()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not socket.poll(int(remaining * 1000) + 1):
                break
            suffix = socket.recv_multipart()[0][len(prefix) :]
            if not suffix.isdigit():
                continue
            pid = int(suffix)
            if pid in pids:
                # A second report of a pid: a whole round went by, every live process has been named.
                break
            pids.add(pid)
            if not wait_all:
                break
        if not pids:
            raise BrokerNotFound(
                f'the stats endpoint {stats_endpoint} reported no process of {watcher} within {timeout}s: '
                'is the watcher running and the arbiter started with statsd?'
            )
        return sorted(pids)
    finally:
        socket.close(0)
        context.term()


def find_broker_via_arbiter(
    controller: str,
    watcher: str,
    *,
    stats_endpoint: str | None = None,
    timeout: float = 5.0,
) -> BrokerInfo:
    """Find the broker run by the watcher ``watcher`` of the arbiter at ``controller``; return its ``broker.json``.

    The arbiter says whether the watcher is active and with which pid (its controller, or its stats endpoint if
    given), and where the broker keeps its data (``--data-dir`` of the watcher's command); the broker's own
    ``broker.json`` there gives the endpoints. The pid must match: a ``broker.json`` left by a killed broker or written
    by a broker outside this arbiter is not this watcher's broker.

    :raises BrokerNotFound: when the arbiter has no such active watcher, or its broker is not up (yet).
    :raises aiida_zmq.circus.CircusCallError: when the arbiter does not answer within ``timeout``.
    """
    from .circus import CircusCallError, CircusController

    if _ipc_missing(controller):
        raise CircusCallError(f'no circus arbiter at {controller} (the socket does not exist)')
    with CircusController(controller, timeout=timeout) as client:
        status = client.watcher_status(watcher)
        if status is None:
            raise BrokerNotFound(
                f'the arbiter at {controller} has no watcher {watcher}: start the daemon (`verdi daemon start`) or '
                'run `circusd` with the file of `aiida-zmq circus-config`'
            )
        if status != 'active':
            raise BrokerNotFound(
                f'the broker watcher {watcher} at {controller} is {status}: `circusctl start {watcher}`'
            )
        options = client.watcher_options(watcher)
        pids = client.watcher_pids(watcher) if stats_endpoint is None else []
    if stats_endpoint is not None:
        pids = watcher_pids_from_stats(stats_endpoint, watcher, timeout=timeout)
    data_dir = data_dir_from_watcher(options) or options.get('working_dir')
    if not data_dir:
        raise BrokerNotFound(f'the watcher {watcher} at {controller} does not run `aiida-zmq serve --data-dir DIR`')
    info = read_broker_info(data_dir)
    if info is None or info.get('pid') not in pids:
        raise BrokerNotFound(
            f'the broker of {watcher} (pid {", ".join(map(str, pids)) or "none"}) has not written '
            f'{Path(data_dir) / BROKER_INFO_FILENAME} yet: it is starting, or failing (see its log)'
        )
    info = dict(info)
    info.setdefault('data_dir', data_dir)
    return info


def discover_endpoint(
    *,
    controller: str | None = None,
    watcher: str | None = None,
    stats_endpoint: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    endpoint: str | None = None,
    timeout: float = 5.0,
) -> str:
    """Return a broker's endpoint: through an arbiter first, then ``data_dir``'s ``broker.json``, then ``endpoint``.

    The explicit ``endpoint`` is the fallback when there is no circus (no arbiter socket, or it does not answer) and
    no live broker announced itself in ``data_dir``.

    :raises BrokerNotFound: when none of the given ways leads to a broker; the message says what each one found.
    """
    from .circus import CircusCallError

    reasons = []
    if controller and watcher:
        try:
            return choose_endpoint(
                find_broker_via_arbiter(controller, watcher, stats_endpoint=stats_endpoint, timeout=timeout)
            )
        except (BrokerNotFound, CircusCallError) as exception:
            LOGGER.debug('no broker through the arbiter at %s: %s', controller, exception)
            reasons.append(str(exception))
    if data_dir is not None:
        info = read_live_broker_info(data_dir)
        if info is not None:
            return choose_endpoint(info)
        reasons.append(f'no live broker announced itself in {Path(data_dir) / BROKER_INFO_FILENAME}')
    if endpoint:
        return endpoint
    raise BrokerNotFound(
        '; '.join(reasons) or 'give an arbiter (controller and watcher), a data directory or an endpoint'
    )
