"""CURVE authentication for TCP endpoints: keys in the broker's data directory, clients authorized by public key.

An ``ipc://`` endpoint is protected by the file system (its directory is 0700: only the user reaches it). A TCP port
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

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import click
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .store import ensure_private_dir

__all__ = ('CurveKeys', 'CurveServer', 'client_keys', 'create_client_keys', 'curve_dir', 'ensure_server_keys')

LOGGER = logging.getLogger(__name__)

CURVE_DIRNAME = 'curve'
SERVER_NAME = 'server'
ZAP_DOMAIN = b'aiida-zmq'
LOOPBACK_HOSTS = ('127.0.0.1', 'localhost', '[::1]')


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
    """ZAP credentials provider: a client may connect when its public key is in ``authorized/`` right now (read on
    every new connection, so that authorizing or revoking a client needs no broker restart)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            allowed = zmq.auth.load_certificates(str(self.directory))
        except OSError:
            allowed = {}
        z85 = bytes(key)
        if z85 in allowed:
            return True
        LOGGER.warning('refused a CURVE client with unknown public key %s', z85.decode(errors='replace'))
        return False


class CurveServer:
    """CURVE on the broker's TCP sockets, with a ZAP handler that admits only authorized client keys."""

    def __init__(self, context: zmq.Context, data_dir: str | os.PathLike[str]) -> None:
        self.public, self.secret = ensure_server_keys(data_dir)
        self._authenticator = ThreadAuthenticator(context, log=LOGGER)
        self._authenticator.start()
        self._authenticator.configure_curve_callback(
            domain=ZAP_DOMAIN.decode(), credentials_provider=_AuthorizedKeys(curve_dir(data_dir) / 'authorized')
        )

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_server = True
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret
        socket.zap_domain = ZAP_DOMAIN

    def stop(self) -> None:
        self._authenticator.stop()


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


def register(group: click.Group) -> None:
    """Add ``aiida-zmq curve-client`` to the command group."""

    @group.command('curve-client')
    @click.option('--data-dir', required=True, type=click.Path(file_okay=False), help="The broker's data directory.")
    @click.argument('name')
    def curve_client(data_dir: str, name: str) -> None:
        """Create and authorize a CURVE key pair for client NAME; prints the files the client needs."""
        try:
            secret_file = create_client_keys(data_dir, name)
        except (ValueError, OSError) as exception:
            raise click.ClickException(str(exception)) from exception
        server_public = curve_dir(data_dir) / f'{SERVER_NAME}.key'
        click.echo(f'client secret key: {secret_file}\nbroker public key: {server_public}')
        click.echo(
            'Give both files to the client (keep the secret one private) and connect with '
            "aiida_zmq.connect('tcp://HOST:PORT', curve=aiida_zmq.security.client_keys(SECRET, PUBLIC)). "
            f'Revoke it by deleting {curve_dir(data_dir) / "authorized" / (name + ".key")}.'
        )
