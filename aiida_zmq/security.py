"""Who may reach the broker: private directories and sockets for ``ipc://``, CURVE keys for ``tcp://``.

An ``ipc://`` endpoint is protected by the file system: its directory is 0700 *and owned by the user*, is a real
directory (not a symbolic link), and sits under directories no other user can change. The mode alone proves nothing:
another user may create ``/tmp/aiida-zmq-<uid>`` first, with mode 0700, and put a fake broker's socket in it. The
broker checks this for its data directory and every socket directory (:func:`ensure_private_dir`), the client for the
endpoint it connects to (:func:`check_ipc_endpoint`); a ``--bind`` path is replaced only when it is a stale socket of
this user that nobody listens on (:func:`remove_stale_socket`).

A TCP port
is reachable by every user of the machine, and beyond it unless bound to loopback, so the broker binds ``tcp://``
only with CURVE (``aiida-zmq serve --curve``): the traffic is encrypted and only clients whose public key is in
``DATA_DIR/curve/authorized/`` may connect. Layout::

    DATA_DIR/curve/            0700
        server.key             the broker's public key (give it to clients)
        server.key_secret      the broker's secret key (0600, never leaves the data directory)
        authorized/            one ``NAME.key`` public certificate per client allowed to connect
        clients/               key pairs made by ``aiida-zmq curve-client NAME`` (each .key_secret goes to its client)

Plain TCP is refused, except on loopback with an explicit ``--insecure-tcp`` (then any local user can connect: for
tests and throwaway setups only). This module imports nothing from AiiDA.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import pwd
import socket as stdlib_socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85

from .endpoints import ipc_path
from .exceptions import UnsafePath

__all__ = (
    'CurveKeys',
    'CurveServer',
    'check_ipc_endpoint',
    'check_private_dir',
    'client_keys',
    'create_client_keys',
    'curve_dir',
    'ensure_private_dir',
    'ensure_server_keys',
    'make_private_dirs',
    'remove_stale_socket',
)

LOGGER = logging.getLogger(__name__)

CURVE_DIRNAME = 'curve'
SERVER_NAME = 'server'
ZAP_DOMAIN = b'aiida-zmq'
LOOPBACK_HOSTS = ('127.0.0.1', 'localhost', '[::1]')


# --------------------------------------------------------------------------------------------------------------------
# Private directories and sockets: trusted by their owner, not only by their mode


def _user(uid: int) -> str:
    try:
        return f'{pwd.getpwuid(uid).pw_name} (uid {uid})'
    except KeyError:
        return f'uid {uid}'


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, 'a regular file'),
        (stat.S_ISDIR, 'a directory'),
        (stat.S_ISLNK, 'a symbolic link'),
        (stat.S_ISFIFO, 'a named pipe'),
        (stat.S_ISCHR, 'a character device'),
        (stat.S_ISBLK, 'a block device'),
    ):
        if test(mode):
            return name
    return 'not a socket'


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path('/')


def _cannot_create(directory: Path, exception: OSError) -> str:
    """What went wrong creating ``directory``, in a sentence that says what to do (not ``[Errno 20] ...``)."""
    existing = _nearest_existing(directory.absolute())
    code = exception.errno
    if code == errno.ENOTDIR or (existing.exists() and not existing.is_dir()):
        return (
            f'cannot create the directory {directory}: {existing} is a file, not a directory. '
            'Choose a directory that is not under a file'
        )
    if code == errno.ENOENT:
        return (
            f'cannot create the directory {directory}: the file system of {existing} does not allow new directories '
            '(like /proc or /sys). Choose a directory on a disk, e.g. under your home directory'
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f'cannot create the directory {directory}: {existing} is not writable by {_user(os.geteuid())}. Choose a '
            'directory you can write, or have its owner create it for you'
        )
    if code == errno.EROFS:
        return (
            f'cannot create the directory {directory}: {existing} is on a read-only file system. Remount it '
            'read-write or choose another directory'
        )
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f'cannot create the directory {directory}: the disk (or your quota) is full. Free space and try again'
    return f'cannot create the directory {directory}: {exception.strerror or exception}. Choose another directory'


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (mode 0700, parents as needed) or check the one there with :func:`check_private_dir`.

    :raises UnsafePath: when the directory is not this user's alone.
    :raises OSError: when it cannot be created; the message says why and what to do.
    """
    directory = Path(path)
    try:
        make_private_dirs(directory)
    except FileExistsError:
        pass  # something that is not a directory, or a dangling link: check_private_dir says which
    except OSError as exception:
        raise OSError(_cannot_create(directory, exception)) from None
    check_private_dir(directory)
    return directory


def make_private_dirs(path: str | os.PathLike[str]) -> None:
    """Create ``path`` and its missing parents, each mode 0700 whatever the umask (``Path.mkdir(parents=True)`` gives
    parents the umask's mode: 0777 under umask 000, which :func:`check_private_dir` then refuses). What exists is
    left as it is."""
    directory = Path(path)
    missing = []
    while not os.path.lexists(directory) and directory.parent != directory:
        missing.append(directory)
        directory = directory.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            if directory == missing[0]:
                raise
            continue  # made meanwhile by someone else: checked as it is
        os.chmod(directory, 0o700)  # the umask may have taken bits from 0700


def check_private_dir(path: str | os.PathLike[str], *, client: bool = False) -> None:
    """Refuse a directory that another user could read, or swap for one of their own.

    It must be a real directory (a symbolic link is refused: whoever controls the link decides where the socket and
    the tasks go), owned by the effective user, with no access for group or others, and every directory above it
    must be owned by root or by this user and, if others may write in it, sticky (like ``/tmp``): otherwise another
    user could rename it away and put theirs in its place.

    :param client: the check is for a client about to connect (the advice differs: it did not create the directory).
    :raises UnsafePath: with what to do.
    """
    directory = Path(path)
    me = os.geteuid()
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        raise UnsafePath(f'{directory} does not exist') from None
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePath(
            f'{directory} is a symbolic link (to {os.readlink(directory)}): the broker uses only a real directory, '
            'since whoever controls the link decides where its socket and tasks go. Give the real path instead, or '
            'remove the link'
        )
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(f'{directory} is {_kind(info.st_mode)}, not a directory: choose another path')
    if info.st_uid != me:
        advice = f'Choose another directory, or if it is yours to take, `chown {_user(me).split(" ")[0]} {directory}`'
        if client:
            advice = (
                f'If it is the broker of {_user(info.st_uid)}, connect as that user; otherwise remove the directory '
                f'(as root: `rm -rf {directory}`) and start your broker again'
            )
        elif directory.name == f'aiida-zmq-{me}':
            advice = (
                f'Another user probably created it before the broker did (it is the fallback for socket paths that '
                f'would be too long). Remove it (as root: `rm -rf {directory}`), or set XDG_RUNTIME_DIR to a '
                'directory of yours'
            )
        raise UnsafePath(
            f'{directory} belongs to {_user(info.st_uid)}, not to {_user(me)}: its owner could read the tasks and put '
            f'a fake broker socket in it. {advice}'
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise UnsafePath(
            f'{directory} is open to other users (mode {mode:o}): run `chmod 700 {directory}` so that only you can '
            'reach the broker and its tasks'
        )
    _check_parents(directory)


def _check_parents(directory: Path) -> None:
    me = os.geteuid()
    parent = Path(os.path.realpath(directory.absolute().parent))
    for ancestor in (parent, *parent.parents):
        info = os.stat(ancestor)
        if info.st_uid not in (0, me):
            raise UnsafePath(
                f'{directory} is inside {ancestor}, which belongs to {_user(info.st_uid)}: that user could move '
                f'{directory} away and put a directory of their own in its place. Choose a directory under one that '
                'only you (or root) control, e.g. in your home directory'
            )
        if info.st_mode & 0o002 and not info.st_mode & stat.S_ISVTX:
            raise UnsafePath(
                f'{directory} is inside {ancestor}, which every user may write (mode '
                f'{stat.S_IMODE(info.st_mode):o}, not sticky like /tmp): any of them could replace {directory}. '
                f'Run `chmod o-w {ancestor}` (or +t), or choose another directory'
            )


def _check_own_socket(path: Path, info: os.stat_result) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePath(f'{path} is a symbolic link, not the broker socket: remove it, or choose another path')
    if not stat.S_ISSOCK(info.st_mode):
        raise UnsafePath(
            f'{path} is {_kind(info.st_mode)}, not a socket: refusing to replace it. Choose another path for the '
            'socket (--bind ipc://PATH)'
        )
    if info.st_uid != os.geteuid():
        raise UnsafePath(
            f'the socket {path} belongs to {_user(info.st_uid)}, not to {_user(os.geteuid())}: it is not this broker. '
            'Remove it, or choose another path'
        )


def check_ipc_endpoint(endpoint: str) -> None:
    """Refuse to connect to an ``ipc://`` socket that another user controls (a client's side of the checks).

    The socket's directory must be private to this user (:func:`check_private_dir`) and the socket, when it is there,
    a socket of this user. A socket that does not exist yet is not refused here: a broker starting creates it in
    the directory checked now, which no other user can write. Other endpoints pass (``tcp://`` is CURVE's business).

    :raises UnsafePath: with what to do.
    """
    name = ipc_path(endpoint)
    if name is None:
        return
    if name.startswith('@'):
        raise UnsafePath(
            f'{endpoint} is an abstract socket: it has no file permissions, any local user could listen there. Use '
            'ipc:///PATH in a private directory'
        )
    path = Path(name)
    if not os.path.lexists(path.parent):
        return
    check_private_dir(path.parent, client=True)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    _check_own_socket(path, info)


def remove_stale_socket(path: str | os.PathLike[str]) -> None:
    """Before a bind: remove ``path`` if it is a socket of this user that nobody listens on (left by a broker that
    was killed); refuse anything else there instead of unlinking it (a store, another broker's live socket).

    :raises UnsafePath: when something other than a stale socket of ours is at ``path``.
    """
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    _check_own_socket(path, info)
    probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        pass  # nobody listens: a stale socket
    except OSError as exception:
        if exception.errno not in (errno.ENOENT, errno.ECONNREFUSED):
            raise UnsafePath(f'{path} is in use ({exception.strerror}): another broker? Stop it, or bind another path')
    else:
        raise UnsafePath(
            f'{path} is in use: a running process accepts connections on it (another broker?). Stop it first, or '
            'bind another path'
        )
    finally:
        probe.close()
    # Unlink only what was just checked: the directory is this user's alone, so nobody else can swap it meanwhile.
    path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------------
# CURVE


def curve_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / CURVE_DIRNAME


def _key_pair(directory: Path, name: str) -> tuple[bytes, bytes]:
    """Load ``name``'s key pair from ``directory``, creating it (secret file 0600) when missing."""
    secret_file = directory / f'{name}.key_secret'
    if not secret_file.exists():
        zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret_file, 0o600)
    public, secret = zmq.auth.load_certificate(str(secret_file))
    assert secret is not None
    return public, secret


def ensure_server_keys(data_dir: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """The broker's (public, secret) CURVE keys, created on first use in ``DATA_DIR/curve``."""
    directory = ensure_private_dir(curve_dir(data_dir))
    ensure_private_dir(directory / 'authorized')
    return _key_pair(directory, SERVER_NAME)


@dataclass(frozen=True)
class CurveKeys:
    """What a client needs to reach a CURVE endpoint: the broker's public key and its own key pair (z85 bytes)."""

    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


def create_client_keys(data_dir: str | os.PathLike[str], name: str) -> Path:
    """Make a key pair for client ``name``, authorize its public key, and return the path of its secret file."""
    if not name or '/' in name or name.startswith('.') or name == SERVER_NAME:
        raise ValueError(f'invalid client name {name!r}: use letters, digits, dashes')
    ensure_server_keys(data_dir)
    clients = ensure_private_dir(curve_dir(data_dir) / 'clients')
    _key_pair(clients, name)
    public_file = clients / f'{name}.key'
    (curve_dir(data_dir) / 'authorized' / public_file.name).write_bytes(public_file.read_bytes())
    return clients / f'{name}.key_secret'


def client_keys(secret_file: str | os.PathLike[str], server_public_file: str | os.PathLike[str]) -> CurveKeys:
    """A client's :class:`CurveKeys` from its secret certificate and the broker's public certificate."""
    public, secret = zmq.auth.load_certificate(str(secret_file))
    if secret is None:
        raise ValueError(f'{secret_file} holds no secret key: give the client its .key_secret file')
    server_public, _ = zmq.auth.load_certificate(str(server_public_file))
    return CurveKeys(server_public, public, secret)


class _AuthorizedKeys:
    """The public keys in ``authorized/``, as they are now: authorizing or revoking a client needs no broker restart.

    Read again when the directory changes (adding, removing or renaming a key file changes its ``mtime``), and at
    least every ``max_age`` seconds (a key file edited in place); otherwise one ``stat`` per handshake. A flood of
    handshakes must not make the broker parse every certificate for every attempt.
    """

    def __init__(self, directory: Path, max_age: float = 2.0) -> None:
        self.directory = directory
        self.max_age = max_age
        self._signature: tuple[int, int] | None = None
        self._loaded = 0.0
        self._keys: frozenset[bytes] = frozenset()

    def allows(self, key: bytes) -> bool:
        """Whether the raw public ``key`` (32 bytes) is authorized."""
        try:
            info = os.stat(self.directory)
            signature: tuple[int, int] | None = (info.st_ino, info.st_mtime_ns)
        except OSError:
            signature = None
        now = time.monotonic()
        if signature != self._signature or now - self._loaded > self.max_age:
            try:
                # As the raw 32 bytes that ZAP hands over: no z85 encoding per handshake.
                self._keys = frozenset(
                    zmq.utils.z85.decode(key) for key in zmq.auth.load_certificates(str(self.directory))
                )
            except (OSError, ValueError):
                self._keys = frozenset()
            self._signature, self._loaded = signature, now
        return key in self._keys


class _FailureBudget:
    """Failed handshakes per source address: ``burst`` per ``interval`` seconds answered at once, the rest late.

    Bounded: at most ``max_addresses`` are tracked (the oldest window is forgotten first).
    """

    def __init__(self, burst: int, interval: float, max_addresses: int = 10_000) -> None:
        self.burst = burst
        self.interval = interval
        self.max_addresses = max_addresses
        self._windows: dict[bytes, list[float]] = {}  # address -> [window start, failures in it]

    def over(self, address: bytes, now: float) -> bool:
        """Count one failure of ``address``; return whether it is past its budget."""
        window = self._windows.get(address)
        if window is None or now - window[0] >= self.interval:
            if window is None and len(self._windows) >= self.max_addresses:
                del self._windows[next(iter(self._windows))]
            window = self._windows[address] = [now, 0]
            self._windows[address] = self._windows.pop(address)  # most recent last, for the eviction above
        window[1] += 1
        return window[1] > self.burst


class ZapHandler:
    """The ZAP handler (RFC 27) of the broker's CURVE sockets, in a thread of its own.

    A client whose public key is authorized is admitted at once. Every other one is denied; an address that keeps
    failing (past ``burst`` per ``interval``) has its denials held back ``delay`` seconds, so that a client retrying
    with wrong keys waits for each answer instead of costing the broker a handshake as fast as it can send one. At
    most ``max_pending`` denials wait at a time (each holds a connection): past that the oldest is answered at once.
    Refusals are logged a few times per address and interval, then counted (:class:`RateLimitedLog`).

    Not pyzmq's ``ThreadAuthenticator``: it reloads every certificate for every handshake, runs an asyncio loop in
    the broker's process for it, and answers in order, one at a time (a ``REP`` socket), so it cannot hold one
    denial back without holding back every admission behind it. This one uses a ``ROUTER`` socket (libzmq accepts
    one as the ZAP handler) to answer each request when it is due.
    """

    ENDPOINT = 'inproc://zeromq.zap.01'

    def __init__(
        self,
        context: zmq.Context,
        authorized: Path,
        *,
        domain: bytes = ZAP_DOMAIN,
        burst: int = 5,
        interval: float = 10.0,
        delay: float = 1.0,
        max_pending: int = 128,
    ) -> None:
        from .ratelimit import RateLimitedLog

        self._keys = _AuthorizedKeys(authorized)
        self._domain = domain
        self._budget = _FailureBudget(burst, interval)
        self._delay = delay
        self._max_pending = max_pending
        self._pending: collections.deque[tuple[float, list[bytes]]] = collections.deque()  # due in order
        self._log = RateLimitedLog(LOGGER, burst=burst, interval=interval)
        self._stop = threading.Event()
        self._socket = context.socket(zmq.ROUTER)
        self._socket.linger = 0
        self._socket.bind(self.ENDPOINT)  # before any CURVE socket binds: libzmq finds the handler at handshake time
        self._thread = threading.Thread(target=self._run, name='aiida-zmq-zap', daemon=True)
        self.counts: collections.Counter[str] = collections.Counter()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        socket = self._socket
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                self._release(now)
                wait = 0.2 if not self._pending else min(0.2, max(0.0, self._pending[0][0] - now))
                if not poller.poll(int(wait * 1000) + 1):
                    continue
                for _ in range(1000):  # a batch, then the due denials again
                    try:
                        frames = socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(frames, time.monotonic())
        except zmq.ContextTerminated:
            pass
        finally:
            for _, reply in self._pending:
                with contextlib.suppress(zmq.ZMQError):
                    socket.send_multipart(reply, zmq.NOBLOCK)
            socket.close(0)

    def _release(self, now: float) -> None:
        while self._pending and (self._pending[0][0] <= now or len(self._pending) > self._max_pending):
            _, reply = self._pending.popleft()
            with contextlib.suppress(zmq.ZMQError):
                self._socket.send_multipart(reply, zmq.NOBLOCK)

    def _handle(self, frames: list[bytes], now: float) -> None:
        # [peer, b'', version, request id, domain, address, identity, mechanism, *credentials]
        if len(frames) < 8 or frames[1] != b'' or frames[2] != b'1.0':
            LOGGER.debug('ignoring a malformed ZAP request: %r', frames[:3])
            return
        peer, _, version, request_id, domain, address, _identity, mechanism, *credentials = frames
        key = credentials[0] if mechanism == b'CURVE' and credentials else b''
        if domain == self._domain and len(key) == 32 and self._keys.allows(key):
            self.counts['admitted'] += 1
            user = zmq.utils.z85.encode(key)
            self._socket.send_multipart([peer, b'', version, request_id, b'200', b'OK', user, b''])
            return
        self.counts['refused'] += 1
        reply = [peer, b'', version, request_id, b'400', b'not authorized', b'', b'']
        self._log.warning(
            'refused a CURVE client with unknown public key %s from %s',
            _Z85(key, mechanism),
            address.decode(errors='replace') or '?',
            key=('curve-refused', address),
        )
        if self._budget.over(address, now):
            self.counts['delayed'] += 1
            self._pending.append((now + self._delay, reply))
            self._release(now)  # past max_pending the oldest goes now
        else:
            with contextlib.suppress(zmq.ZMQError):
                self._socket.send_multipart(reply, zmq.NOBLOCK)


class _Z85:
    """A key for a log line, encoded only if the line is written (most are counted, not written)."""

    __slots__ = ('key', 'mechanism')

    def __init__(self, key: bytes, mechanism: bytes) -> None:
        self.key, self.mechanism = key, mechanism

    def __str__(self) -> str:
        if len(self.key) == 32:
            return zmq.utils.z85.encode(self.key).decode()
        return f'(none: mechanism {self.mechanism.decode(errors="replace")})'


class CurveServer:
    """CURVE on the broker's TCP sockets, with a ZAP handler that admits only authorized client keys.

    The handshakes' cryptography runs in ZeroMQ's I/O threads. The broker gives its context a second I/O thread
    and pins its CURVE sockets to it (``AFFINITY``), its ipc sockets to the first, so that a flood of handshakes
    on the TCP port does not queue the local clients' messages behind it.
    """

    IO_THREADS = 2
    AFFINITY = 0b10  # the second I/O thread
    PLAIN_AFFINITY = 0b01  # for every other socket of the broker

    def __init__(self, context: zmq.Context, data_dir: str | os.PathLike[str]) -> None:
        self.public, self.secret = ensure_server_keys(data_dir)
        self.zap = ZapHandler(context, curve_dir(data_dir) / 'authorized')
        self.zap.start()

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_server = True
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret
        socket.zap_domain = ZAP_DOMAIN
        socket.setsockopt(zmq.AFFINITY, self.AFFINITY)

    def stop(self) -> None:
        self.zap.stop()


def check_tcp_bind(endpoint: str, *, curve: bool, insecure_tcp: bool) -> None:
    """Refuse a ``tcp://`` bind that would let others in: CURVE, or loopback with an explicit insecure flag."""
    host = endpoint[len('tcp://') :].rsplit(':', 1)[0]
    if curve:
        return
    if insecure_tcp and host in LOOPBACK_HOSTS:
        LOGGER.warning('binding %s without authentication (--insecure-tcp): any local user can connect', endpoint)
        return
    if insecure_tcp:
        raise ValueError(
            f'refusing to bind {endpoint} without CURVE: --insecure-tcp is for loopback (127.0.0.1) only. '
            'Add --curve to encrypt and authenticate TCP clients (keys in DATA_DIR/curve)'
        )
    raise ValueError(
        f'refusing to bind {endpoint} without authentication: any user of this machine could read and send tasks. '
        'Add --curve (clients need a key: `aiida-zmq curve-client NAME`), use an ipc:// endpoint, or, on 127.0.0.1 '
        'for tests only, add --insecure-tcp'
    )
