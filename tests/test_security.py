"""Access and storage faults, through the real ``aiida-zmq serve`` process.

Access: directories only for the user (refused at start if wider), files 0600, TCP only with CURVE (a client without
an authorized key cannot connect nor read), plain TCP only on loopback with an explicit flag, no pickle anywhere.
Storage: read-only data directory, corrupt store, full disk: a clear error, a refusal to start rather than data loss,
and the recovery that docs/reliability.md describes, carried out here.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import aiida_zmq
from aiida_zmq import protocol, security
from aiida_zmq.exceptions import BrokerUnavailable, TaskNotAccepted
from aiida_zmq.store import STORE_FILENAME, submit_offline
from aiida_zmq.testing import BrokerProcess, wait_until

ROOT = Path(__file__).resolve().parent.parent
FAST = {'heartbeat': 0.2, 'broker_timeout': 2.0}


def serve(data_dir: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``aiida-zmq serve`` expecting it to refuse to start; a broker that does start is stopped and reported."""
    command = [sys.executable, '-m', 'aiida_zmq.cli', 'serve', '--data-dir', str(data_dir), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
        output += '\n[it started instead of refusing]'
    return subprocess.CompletedProcess(command, process.returncode, output)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private directory with a short path (unix socket paths are limited to ~100 bytes)."""
    base = Path(tempfile.mkdtemp(prefix='azsec-'))
    yield base
    subprocess.run(['rm', '-rf', str(base)], check=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Modes


def test_socket_directory_open_to_others_is_refused(short_dir):
    sockets = short_dir / 'sockets'
    sockets.mkdir(mode=0o755)
    os.chmod(sockets, 0o755)
    result = serve(short_dir / 'data', '--bind', f'ipc://{sockets}/broker.sock')
    assert result.returncode == 2, result.stdout
    assert 'open to other users' in result.stdout and f'chmod 700 {sockets}' in result.stdout


def test_modes_of_everything_the_broker_creates(short_dir):
    """Directories 0700, store, socket, lock and broker.json 0600; a store left wider is tightened at start."""
    data = short_dir / 'data'
    data.mkdir(mode=0o700)
    submit_offline(data, 'q', b'\x00J1')
    os.chmod(data / STORE_FILENAME, 0o644)  # e.g. copied over by hand
    broker = BrokerProcess(data).start()
    try:
        mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
        assert mode(data) == 0o700
        for name in (STORE_FILENAME, 'broker.sock', 'broker.lock', 'broker.json'):
            assert mode(data / name) == 0o600, name
        for extra in data.glob(STORE_FILENAME + '-*'):  # SQLite's -wal and -shm files
            assert mode(extra) & 0o077 == 0, extra
    finally:
        broker.stop()


# --------------------------------------------------------------------------------------------------------------------
# TCP and CURVE


def test_plain_tcp_is_refused_with_what_to_do(short_dir):
    port = free_port()
    result = serve(short_dir / 'a', '--bind', f'tcp://127.0.0.1:{port}')
    assert result.returncode == 2
    assert 'without authentication' in result.stdout and '--curve' in result.stdout
    result = serve(short_dir / 'b', '--bind', f'tcp://0.0.0.0:{port}', '--insecure-tcp')
    assert result.returncode == 2
    assert 'loopback (127.0.0.1) only' in result.stdout


def test_insecure_tcp_on_loopback_works_and_warns(short_dir):
    endpoint = f'tcp://127.0.0.1:{free_port()}'
    broker = BrokerProcess(short_dir / 'data', '--insecure-tcp', endpoint=endpoint).start()
    try:
        communicator = aiida_zmq.connect(endpoint, **FAST)
        communicator.add_rpc_subscriber(lambda _comm, msg: msg, 'echo')
        assert communicator.rpc_send('echo', 1).result(timeout=10) == 1
        communicator.close()
        assert 'any local user can connect' in broker.log()
    finally:
        broker.stop()


@pytest.fixture
def curve_broker(short_dir) -> Iterator[BrokerProcess]:
    endpoint = f'tcp://127.0.0.1:{free_port()}'
    broker = BrokerProcess(short_dir / 'data', '--curve', '--heartbeat', '0.2', endpoint=endpoint).start()
    yield broker
    broker.stop()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'aiida_zmq.cli', *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_curve_authorized_client_is_served(curve_broker):
    result = cli('curve-client', '--data-dir', str(curve_broker.data_dir), 'alice')
    assert result.returncode == 0, result.stderr
    curve_dir = security.curve_dir(curve_broker.data_dir)
    secret_file = curve_dir / 'clients' / 'alice.key_secret'
    assert str(secret_file) in result.stdout
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((curve_dir / 'server.key_secret').stat().st_mode) == 0o600
    keys = security.client_keys(secret_file, curve_dir / 'server.key')
    queue = f'q-{uuid.uuid4().hex[:8]}'
    communicator = aiida_zmq.connect(curve_broker.endpoint, curve=keys, task_queue=queue, **FAST)
    communicator.add_task_subscriber(lambda _comm, task: task * 2)
    assert communicator.task_send(21).result(timeout=10) == 42
    communicator.close()


def test_curve_client_without_an_authorized_key_cannot_connect_or_read(curve_broker):
    """A plain client, a client with its own unauthorized keys, and one with revoked keys all get nothing."""
    curve_dir = security.curve_dir(curve_broker.data_dir)
    # Someone is using the broker: an outsider must not see any of it.
    secret_file = security.create_client_keys(curve_broker.data_dir, 'insider')
    insider_keys = security.client_keys(secret_file, curve_dir / 'server.key')
    insider = aiida_zmq.connect(curve_broker.endpoint, curve=insider_keys, **FAST)
    insider.add_broadcast_subscriber(lambda *args, **kwargs: None)
    insider.broadcast_send('secret broadcast')

    with pytest.raises(BrokerUnavailable):
        aiida_zmq.connect(curve_broker.endpoint, connect_timeout=2, **FAST)

    public, secret = zmq.curve_keypair()
    server_public = zmq.auth.load_certificate(str(curve_dir / 'server.key'))[0]
    stranger = security.CurveKeys(server_public, public, secret)
    with pytest.raises(BrokerUnavailable):
        aiida_zmq.connect(curve_broker.endpoint, curve=stranger, connect_timeout=2, **FAST)
    wait_until(lambda: 'refused a CURVE client with unknown public key' in curve_broker.log(), 10)

    # A raw plain socket says HELLO and listens: nothing comes back, not even an error.
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(curve_broker.endpoint)
    raw.send_multipart(protocol.encode(protocol.Command.HELLO, b'spy', b'200', b'', b'0', b''), zmq.NOBLOCK)
    insider.broadcast_send('another secret')
    assert raw.poll(1500) == 0
    raw.close(0)

    # Revoking a key (deleting it from authorized/) shuts its next connection out, without a broker restart.
    (curve_dir / 'authorized' / 'insider.key').unlink()
    with pytest.raises(BrokerUnavailable):
        aiida_zmq.connect(curve_broker.endpoint, curve=insider_keys, connect_timeout=2, **FAST)
    insider.close()


# --------------------------------------------------------------------------------------------------------------------
# No pickle


FORBIDDEN_MODULES = {'pickle', 'cPickle', '_pickle', 'dill', 'cloudpickle', 'shelve', 'marshal', 'jsonpickle'}
FORBIDDEN_CALLS = {'unsafe_load', 'UnsafeLoader', 'full_load_all', 'load_all'}


def python_sources() -> list[Path]:
    return sorted(
        path
        for folder in ('aiida_zmq', 'circus_plugins')
        if (ROOT / folder).is_dir()
        for path in (ROOT / folder).rglob('*.py')
    )


def test_no_pickle_anywhere():
    """Nothing in the package can turn bytes from the wire into arbitrary objects: no pickle-like module is imported
    and no unsafe YAML loader is named (the broker itself never decodes payloads)."""
    sources = python_sources()
    assert len(sources) > 10
    offences = []
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or '']
            elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_CALLS:
                offences.append(f'{path.relative_to(ROOT)}:{node.lineno}: {node.attr}')
                continue
            else:
                continue
            offences += [
                f'{path.relative_to(ROOT)}:{node.lineno}: import {name}'
                for name in names
                if name.split('.')[0] in FORBIDDEN_MODULES
            ]
    assert not offences, offences
    # The broker never decodes payloads: no module of the broker package imports a codec at all.
    imported = set()
    for path in sorted((ROOT / 'aiida_zmq' / 'broker').glob('*.py')):
        tree = ast.parse(path.read_text())
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {
            f'{node.module or ""}.{alias.name}' for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }  # fmt: skip
    assert not {name for name in imported if 'codec' in name or 'yaml' in name}, imported


# --------------------------------------------------------------------------------------------------------------------
# Storage faults


def can_mount() -> bool:
    if os.geteuid() != 0:
        return False
    probe = Path(tempfile.mkdtemp(prefix='azmnt-'))
    try:
        command = ['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(probe)]
        if subprocess.run(command, capture_output=True, check=False).returncode != 0:
            return False
        subprocess.run(['umount', str(probe)], check=True)
        return True
    finally:
        probe.rmdir()


MOUNTABLE = can_mount()
needs_mount = pytest.mark.skipif(not MOUNTABLE, reason='needs root (or CAP_SYS_ADMIN) to mount a small tmpfs')


@contextlib.contextmanager
def small_fs(where: Path, size: str) -> Iterator[Path]:
    """A real file system of ``size`` mounted at ``where`` (a full disk and a read-only mount are real faults)."""
    where.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size},mode=0700', 'tmpfs', str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(['umount', '-l', str(where)], check=False)


def remount(where: Path, options: str) -> None:
    subprocess.run(['mount', '-o', f'remount,{options}', str(where)], check=True)


def drain(broker: BrokerProcess, queue: str, expected: int) -> list:
    got: list = []
    done = threading.Event()

    def subscriber(_comm, task):
        got.append(task)
        if len(got) >= expected:
            done.set()
        return task

    consumer = aiida_zmq.connect(broker.endpoint, task_queue=queue, task_prefetch_count=100, **FAST)
    consumer.add_task_subscriber(subscriber)
    assert done.wait(30), f'{len(got)} of {expected} delivered'
    consumer.close()
    return got


def test_corrupt_store_refuses_to_start_and_is_left_untouched(short_dir):
    data = short_dir / 'data'
    data.mkdir(mode=0o700)
    for index in range(200):
        submit_offline(data, 'q', b'\x00J' + str(index).encode() + b' ' * 500)
    store = data / STORE_FILENAME
    raw = bytearray(store.read_bytes())
    raw[4096 : 4096 * 3] = os.urandom(8192)  # pages in the middle of the file, not only the header
    store.write_bytes(bytes(raw))
    before = sha(store)
    result = serve(data, '--bind', f'ipc://{data}/broker.sock')
    assert result.returncode == 2, result.stdout
    assert 'corrupt' in result.stdout and 'sqlite3' in result.stdout and 'move the file aside' in result.stdout
    assert sha(store) == before  # nothing was "repaired" away


def test_garbage_store_refuses_to_start(short_dir):
    data = short_dir / 'data'
    data.mkdir(mode=0o700)
    (data / STORE_FILENAME).write_bytes(b'not a database' * 1000)
    before = sha(data / STORE_FILENAME)
    result = serve(data, '--bind', f'ipc://{data}/broker.sock')
    assert result.returncode == 2 and 'move the file aside' in result.stdout
    assert sha(data / STORE_FILENAME) == before


@needs_mount
def test_read_only_data_dir_refuses_to_start_then_recovers(short_dir):
    with small_fs(short_dir / 'data', '8m') as data:
        for index in range(20):
            submit_offline(data, 'q', b'\x00J%d' % index)
        remount(data, 'ro')
        result = serve(data, '--bind', f'ipc://{short_dir}/broker.sock')
        assert result.returncode == 2, result.stdout
        assert 'read-only' in result.stdout and 'remount it read-write' in result.stdout
        remount(data, 'rw')  # the documented recovery
        broker = BrokerProcess(data, endpoint=f'ipc://{short_dir}/broker.sock').start()
        try:
            assert sorted(drain(broker, 'q', 20)) == list(range(20))  # nothing lost
        finally:
            broker.stop()


@needs_mount
def test_full_disk_at_start_refuses_with_what_to_do(short_dir):
    with small_fs(short_dir / 'data', '1m') as data:
        for index in range(5):
            submit_offline(data, 'q', b'\x00J%d' % index)
        filler = data / 'filler'
        with open(filler, 'wb') as out, contextlib.suppress(OSError):
            while True:
                out.write(b'\0' * 65536)
        with contextlib.suppress(OSError):
            os.remove(data / (STORE_FILENAME + '-wal'))  # the next start must need new space to open the store
        result = serve(data, '--bind', f'ipc://{short_dir}/broker.sock')
        assert result.returncode == 2, result.stdout
        assert 'disk' in result.stdout and 'full' in result.stdout and 'free space' in result.stdout.lower()
        filler.unlink()  # the documented recovery: free space, start again
        broker = BrokerProcess(data, endpoint=f'ipc://{short_dir}/broker.sock').start()
        try:
            assert sorted(drain(broker, 'q', 5)) == list(range(5))
        finally:
            broker.stop()


@needs_mount
def test_disk_filling_up_while_running_refuses_loudly_and_loses_nothing(short_dir):
    """Sends fail with TaskNotAccepted once the disk is full (never a silent drop), the broker stays up, and every
    confirmed task is delivered once space is freed."""
    with small_fs(short_dir / 'data', '2m') as data:
        broker = BrokerProcess(data, '--heartbeat', '0.2', endpoint=f'ipc://{short_dir}/broker.sock').start()
        try:
            producer = aiida_zmq.connect(broker.endpoint, task_queue='q', **FAST)
            confirmed, refused = [], 0
            for index in range(80):
                try:
                    producer.task_send({'i': index, 'pad': 'x' * 60_000}, no_reply=True)
                    confirmed.append(index)
                except TaskNotAccepted as exception:
                    assert 'disk is full' in str(exception) or 'disk' in str(exception)
                    refused += 1
            assert confirmed and refused, (len(confirmed), refused)
            assert broker.process is not None and broker.process.poll() is None
            assert 'refusing the tasks of this batch' in broker.log()
            remount(data, 'size=64m')  # the documented recovery: free or add space; no restart needed
            producer.task_send({'i': 'after', 'pad': ''}, no_reply=True)
            got = drain(broker, 'q', len(confirmed) + 1)
            assert {task['i'] for task in got} == {*confirmed, 'after'}
            producer.close()
        finally:
            broker.stop()
