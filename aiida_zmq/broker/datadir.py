"""What a broker holds in its data directory while it serves: the lock, the bound sockets and ``broker.json``.

Clients find a broker by two files: ``broker.json`` (its pid, endpoints and epoch) and the ipc socket it names. A
broker takes the directory's lock before it touches either, binds only where nobody else is or could listen, and
on the way out removes only the very files it made: never what another process put at the same path since. While it
serves, :meth:`DataDirectory.check_endpoints` (once per heartbeat) puts back a socket file or a ``broker.json``
deleted under it, since without them a running broker looks gone.

This module imports nothing from AiiDA.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time
import typing as t
from collections.abc import Sequence
from pathlib import Path

import zmq

from .. import __version__, security
from ..discovery import (
    BROKER_INFO_FILENAME,
    BROKER_SOCKET_FILENAME,
    MAX_IPC_PATH,
    lock_holder,
    read_live_broker_info,
    short_socket_dir,
)
from ..endpoints import ipc_path, socket_file
from ..exceptions import BrokerRunning, StoreError
from ..fsync import write_synced
from ..ratelimit import RateLimitedLog
from ..security import ensure_private_dir, remove_stale_socket
from ..store import broker_lock
from .config import BrokerConfig

__all__ = ('DataDirectory', 'default_endpoint')

# How long a broker waits for a lock holder that does not serve (a broker starting or closing, an offline submit).
LOCK_WAIT_NOT_SERVING = 30.0


def default_endpoint(data_dir: str | os.PathLike[str]) -> str:
    """The ipc endpoint a broker binds by default for ``data_dir``, shortened when the path is too long.

    The short form lives in this user's private socket directory (:func:`aiida_zmq.discovery.short_socket_dir`),
    named by a digest of the long path so that two data directories never share a socket.
    """
    path = Path(data_dir).absolute() / BROKER_SOCKET_FILENAME
    if len(str(path)) <= MAX_IPC_PATH:
        return f'ipc://{path}'
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:16]
    return f'ipc://{short_socket_dir()}/{digest}.sock'


class DataDirectory:
    """One broker's hold on its data directory and endpoints, from :meth:`take_lock` to :meth:`release`."""

    def __init__(
        self,
        path: Path,
        endpoints: Sequence[str],
        config: BrokerConfig,
        *,
        epoch: str,
        started: float,
        log: RateLimitedLog,
    ) -> None:
        self.path = path
        self.endpoints = list(endpoints)
        self.config = config
        self.epoch = epoch
        self.started = started
        self._log = log  # the broker's: a socket file that keeps failing is reported a few times, then counted
        # With CURVE, a second I/O thread for the CURVE sockets' handshakes (see security.CurveServer).
        self._context = zmq.Context(io_threads=security.CurveServer.IO_THREADS if config.curve else 1)
        self._curve: security.CurveServer | None = None
        self.sockets: list[zmq.Socket] = []
        # ipc endpoint -> (socket, (st_dev, st_ino) of the file its bind made): what release() may unlink, and how a
        # socket file deleted or replaced under the running broker is noticed.
        self._ipc_files: dict[str, tuple[zmq.Socket, tuple[int, int]]] = {}
        self._info_stat: tuple[int, int] | None = None  # broker.json as this broker wrote it
        self._lock: t.Any = None

    # The lock -----------------------------------------------------------------------------------------------------

    def take_lock(self) -> None:
        """Hold the data directory's lock, or refuse with the holder's pid.

        A broker that serves the directory (its ``broker.json`` is live) is refused at once unless
        ``config.lock_timeout`` asks to wait for it; any other holder (a broker starting or closing, an offline
        submit) is waited for, up to ``lock_timeout`` or 30 s.
        """
        timeout = self.config.lock_timeout
        deadline = time.monotonic() + (LOCK_WAIT_NOT_SERVING if timeout is None else timeout)
        waiting_logged = False
        while True:
            lock = broker_lock(self.path, blocking=False)
            try:
                lock.__enter__()
                self._lock = lock
                return
            except BrokerRunning:
                pass
            info = read_live_broker_info(self.path)
            serving = info is not None and info.get('pid') != os.getpid()
            if (serving and timeout is None) or time.monotonic() >= deadline:
                raise StoreError(self._lock_refusal(info if serving else None, lock_holder(self.path)))
            if not waiting_logged:
                waiting_logged = True
                holder = lock_holder(self.path)
                self._log.info(
                    'waiting for the lock of %s, held by %s',
                    self.path,
                    f'pid {holder}' if holder else 'another process',
                    key=('lock-wait',),
                )
            time.sleep(0.05)  # the lock has no event to wait on: poll it, up to the deadline

    def _lock_refusal(self, info: dict | None, holder: int | None) -> str:
        wait = 'or give --lock-timeout SECONDS to wait for it to exit'
        if info is not None:
            since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('started', 0)))
            return (
                f'a broker already serves {self.path} (pid {info["pid"]}, since {since}, on '
                f'{", ".join(map(str, info["endpoints"]))}): one broker per data directory. Stop it first (`kill '
                f'{info["pid"]}`; for an AiiDA profile, `verdi daemon stop`), {wait}'
            )
        who = f'pid {holder}' if holder else 'another process'
        waited = LOCK_WAIT_NOT_SERVING if self.config.lock_timeout is None else self.config.lock_timeout
        return (
            f'{self.path / "broker.lock"} is held by {who} for more than {waited:.0f}s: is another broker running '
            f'on the same data directory? Stop it first (one broker per data directory), {wait}'
        )

    # The sockets --------------------------------------------------------------------------------------------------

    def check_binds(self) -> None:
        """Refuse, before anything is touched, an endpoint that :meth:`bind` would refuse."""
        for endpoint in self.endpoints:
            self._check_bind(endpoint)

    def _check_bind(self, endpoint: str) -> Path | None:
        """Refuse an endpoint that would let others in or replace what is not ours; return an ipc socket's path.

        A stale socket of ours (left by a broker that was killed) is removed; anything else at the path is refused.
        """
        path: Path | None = None
        if endpoint.startswith('tcp://'):
            security.check_tcp_bind(endpoint, curve=self.config.curve, insecure_tcp=self.config.insecure_tcp)
        elif (name := ipc_path(endpoint)) is not None:
            if name.startswith('@'):
                raise ValueError(
                    f'refusing to bind {endpoint}: an abstract socket has no file permissions, any local user could '
                    'connect. Use ipc:///PATH in a private directory (the default is DATA_DIR/broker.sock)'
                )
            path = Path(name)
            if len(str(path)) > MAX_IPC_PATH:
                raise ValueError(f'ipc path {path} is longer than {MAX_IPC_PATH} bytes: choose a shorter --bind')
            ensure_private_dir(path.parent)  # only the user may reach the socket
            remove_stale_socket(path)  # a socket left by a broker that died; anything else there is refused
        else:
            raise ValueError(f'unsupported endpoint {endpoint!r}: use ipc://PATH or tcp://127.0.0.1:PORT')
        return path

    def bind(self) -> None:
        """Bind a ROUTER socket on every endpoint (:attr:`sockets`)."""
        for endpoint in self.endpoints:
            self._bind(endpoint)

    def _bind(self, endpoint: str) -> None:
        path = self._check_bind(endpoint)
        socket = self._context.socket(zmq.ROUTER)
        try:
            if endpoint.startswith('tcp://') and self.config.curve:
                if self._curve is None:
                    self._curve = security.CurveServer(self._context, self.path)
                self._curve.apply(socket)  # before bind: only authorized client keys get through the handshake
            elif self.config.curve:
                socket.setsockopt(zmq.AFFINITY, security.CurveServer.PLAIN_AFFINITY)  # off the CURVE I/O thread
            socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable send raises instead of vanishing
            # No handover: a second connection with a live one's routing id is not attached, so it cannot take the
            # first one's deliveries and RPCs (issue 21.2). A client's own reconnection gets in once its old pipe is
            # closed: at once on ipc, within the ZMTP heartbeat timeout below over a TCP connection that died.
            socket.setsockopt(zmq.ROUTER_HANDOVER, 0)
            socket.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(self.config.heartbeat * 1000)))
            socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(self.config.peer_timeout * 1000)))
            # A connection that does not finish ZeroMQ's handshake (an idle TCP connection, a CURVE peer that never
            # authenticates) is closed after this, instead of 30 s: each holds a descriptor (issue 21.3).
            socket.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(self.config.peer_timeout * 1000)))
            # ZeroMQ counts its queues in messages; bytes are bounded by the broker's own outbound queue
            # (outbound_bytes) and the message size: a short queue here keeps what waits for a peer within that.
            socket.setsockopt(zmq.SNDHWM, self.config.send_hwm)
            socket.setsockopt(zmq.RCVHWM, self.config.receive_hwm)
            socket.setsockopt(zmq.LINGER, 1000)
            # A safety net under the per-message check: ZeroMQ drops a peer that sends a frame larger than this.
            socket.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes + 4096)
            try:
                socket.bind(endpoint)
            except zmq.ZMQError as exception:
                raise OSError(f'cannot bind {endpoint}: {exception}') from exception
            if path is not None:
                self._own_ipc_file(endpoint, socket, path)
        except BaseException:
            socket.close(0)  # a socket left open would make release() wait for ever in context.term()
            raise
        self.sockets.append(socket)

    def _own_ipc_file(self, endpoint: str, socket: zmq.Socket, path: Path) -> None:
        """Make the socket file just bound 0600 and remember it as ours (release() unlinks only that very file)."""
        os.chmod(path, 0o600)
        info = os.lstat(path)
        self._ipc_files[endpoint] = (socket, (info.st_dev, info.st_ino))

    # broker.json --------------------------------------------------------------------------------------------------

    def write_info(self) -> None:
        """Write ``broker.json``: from now on clients find this broker."""
        info = {
            'pid': os.getpid(),
            'endpoints': self.endpoints,
            'epoch': self.epoch,
            'started': self.started,
            'version': __version__,
        }
        path = self.path / BROKER_INFO_FILENAME
        # Whole and synced: after a power cut the file names this broker or the one before, never half of either.
        write_synced(path, json.dumps(info).encode())
        written = os.stat(path)
        self._info_stat = (written.st_ino, written.st_mtime_ns)

    def withdraw_info(self) -> None:
        """Remove ``broker.json`` if it is still this broker's: from then on it no longer serves, and a broker
        starting meanwhile waits for the lock instead of being refused as a second broker."""
        info = self.path / BROKER_INFO_FILENAME
        try:
            if json.loads(info.read_text()).get('epoch') == self.epoch:
                info.unlink()
        except (OSError, ValueError):
            pass

    # While serving ------------------------------------------------------------------------------------------------

    def check_endpoints(self) -> None:
        """Bind again an ipc socket file deleted under the running broker, rewrite a deleted ``broker.json``.

        Clients find the broker by these two files; without them a running broker looks gone (``status`` says "not
        running", clients wait in vain). Called once per heartbeat: two ``lstat`` calls per endpoint.
        """
        for endpoint, (socket, identity) in list(self._ipc_files.items()):
            self._check_ipc_file(endpoint, socket, identity)
        info_path = self.path / BROKER_INFO_FILENAME
        try:
            info = os.stat(info_path)
            current: tuple[int, int] | None = (info.st_ino, info.st_mtime_ns)
        except OSError:
            current = None
        if current != self._info_stat:
            try:
                self.write_info()
            except OSError as exception:
                self._log.error('cannot write %s: %s', info_path, exception, key=('broker-info', str(info_path)))
                return
            self._log.warning(
                '%s was deleted or changed while the broker ran: written again', info_path, key=('broker-info-lost',)
            )

    def _check_ipc_file(self, endpoint: str, socket: zmq.Socket, identity: tuple[int, int]) -> None:
        path = socket_file(endpoint)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            info = None
        except OSError as exception:
            self._log.warning('cannot check the socket %s: %s', path, exception, key=('socket-check', endpoint))
            return
        if info is not None and (info.st_dev, info.st_ino) == identity:
            return
        if info is not None:
            self._log.error(
                'the socket file %s was replaced by something else: clients cannot reach this broker there. '
                'Remove what is at that path (the broker binds it again), or restart the broker',
                path,
                key=('socket-replaced', endpoint),
            )
            return
        try:
            with contextlib.suppress(zmq.ZMQError):
                socket.unbind(endpoint)
            socket.bind(endpoint)
            self._own_ipc_file(endpoint, socket, path)
        except (zmq.ZMQError, OSError) as exception:
            self._log.error(
                'the socket file %s was deleted; binding it again failed: %s',
                path,
                exception,
                key=('socket-rebind', endpoint),
            )
            return
        self._log.warning(
            'the socket file %s was deleted while the broker ran: bound it again', path, key=('socket-lost', endpoint)
        )

    # The end ------------------------------------------------------------------------------------------------------

    def release(self) -> None:
        """Close the sockets, unlink the socket files this broker made, release the lock (after the store closed)."""
        for socket in self.sockets:
            socket.close(linger=500)
        self.sockets.clear()
        for endpoint, (_, identity) in self._ipc_files.items():
            # Only the very file this broker's bind made: never what another process put at that path since.
            path = socket_file(endpoint)
            with contextlib.suppress(OSError):
                found = os.lstat(path)
                if stat.S_ISSOCK(found.st_mode) and (found.st_dev, found.st_ino) == identity:
                    path.unlink()
        self._ipc_files.clear()
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None
        if self._curve is not None:
            self._curve.stop()
            self._curve = None
        self._context.term()
