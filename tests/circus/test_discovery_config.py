"""Finding the broker through an arbiter, and ``aiida-zmq circus-config`` files run by a real ``circusd``."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from circusd_helpers import CIRCUSD, stop_circusd, wait_until_up

from aiida_zmq import connect
from aiida_zmq.circus import CircusController, missing_control_socket, watcher_name
from aiida_zmq.discovery import (
    BrokerNotFound,
    broker_info_alive,
    discover_endpoint,
    find_broker_via_arbiter,
    read_broker_info,
    read_live_broker_info,
)
from aiida_zmq.exceptions import BrokerRunning, BrokerUnavailable
from aiida_zmq.store import broker_lock, submit_offline
from aiida_zmq.testing import ArbiterProcess, BrokerProcess, wait_until

AIIDA_ZMQ = [sys.executable, '-m', 'aiida_zmq.cli']


def first_rpc_seconds(find_endpoint: Callable[[], str], rounds: int = 15) -> float:
    """Median seconds from nothing to the answer of a first request (``status``) on a fresh communicator."""
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        communicator = connect(find_endpoint())
        try:
            communicator.admin('status')
            samples.append(time.perf_counter() - started)
        finally:
            communicator.close()
    return statistics.median(samples)


def test_a_control_socket_is_gone_only_with_its_directory(tmp_path: Path) -> None:
    """An arbiter that starts writes its pid file before it binds: its socket file missing is no verdict. aiida-core
    removes the whole socket directory after a refused stop: that one is."""
    starting = tmp_path / 'starting'
    starting.mkdir()
    assert missing_control_socket(f'ipc://{starting}/circus.c.sock') is None
    gone = tmp_path / 'gone' / 'circus.c.sock'
    assert missing_control_socket(f'ipc://{gone}') == str(gone)
    assert missing_control_socket('tcp://127.0.0.1:5555') is None


def test_discovery_through_arbiter(zmq_arbiter_factory) -> None:
    arbiter: ArbiterProcess = zmq_arbiter_factory(stats=True)
    pid = arbiter.broker_pid()

    info = find_broker_via_arbiter(arbiter.controller, arbiter.broker_watcher)
    assert info['pid'] == pid
    assert info['endpoints'] == [arbiter.broker_endpoint]
    assert Path(info['data_dir']) == arbiter.data_dir
    # circusd-stats publishes the watcher's pids: the same broker without asking the controller for them.
    assert arbiter.stats is not None
    assert find_broker_via_arbiter(arbiter.controller, arbiter.broker_watcher, stats_endpoint=arbiter.stats) == info

    explicit = first_rpc_seconds(lambda: arbiter.broker_endpoint)
    controller = first_rpc_seconds(
        lambda: discover_endpoint(controller=arbiter.controller, watcher=arbiter.broker_watcher)
    )
    stats = first_rpc_seconds(
        lambda: discover_endpoint(
            controller=arbiter.controller, watcher=arbiter.broker_watcher, stats_endpoint=arbiter.stats
        ),
        rounds=3,
    )
    print(
        f'\nconnect + first RPC (median): explicit endpoint {explicit * 1000:.1f} ms, through the controller '
        f'{controller * 1000:.1f} ms, through the stats endpoint {stats * 1000:.1f} ms'
    )


def test_discovery_reports_a_stopped_broker(zmq_arbiter: ArbiterProcess) -> None:
    zmq_arbiter.call('stop', name=zmq_arbiter.broker_watcher, waiting=True)
    with pytest.raises(BrokerNotFound, match='is stopped: `circusctl start'):
        find_broker_via_arbiter(zmq_arbiter.controller, zmq_arbiter.broker_watcher)
    with pytest.raises(BrokerNotFound, match='has no watcher zmq-broker-other'):
        find_broker_via_arbiter(zmq_arbiter.controller, 'zmq-broker-other')


def test_discovery_falls_back_to_the_explicit_endpoint(zmq_broker: BrokerProcess, tmp_path: Path) -> None:
    """No circus at all: the explicit endpoint is used, without waiting for an arbiter that is not there."""
    started = time.monotonic()
    endpoint = discover_endpoint(
        controller=f'ipc://{tmp_path}/no-arbiter.sock', watcher=watcher_name('x'), endpoint=zmq_broker.endpoint
    )
    assert endpoint == zmq_broker.endpoint
    assert time.monotonic() - started < 0.5
    with pytest.raises(BrokerNotFound, match='no circus arbiter'):
        discover_endpoint(controller=f'ipc://{tmp_path}/no-arbiter.sock', watcher=watcher_name('x'))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private directory with a short path (unix socket paths are limited to ~100 bytes)."""
    import shutil

    path = Path(tempfile.mkdtemp(prefix='azcc-'))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_generated(ini: Path, controller: str) -> subprocess.Popen[bytes]:
    """``circusd FILE``, exactly as the generated file says to run it (its own log output setting included)."""
    process = subprocess.Popen(
        [CIRCUSD, str(ini)],
        cwd=ini.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_until_up(controller, process)
    return process


def test_circus_config_standalone_runs_and_is_found(short_dir: Path) -> None:
    data_dir, ini = short_dir / 'data', short_dir / 'broker.ini'
    result = subprocess.run(
        [*AIIDA_ZMQ, 'circus-config', '--data-dir', str(data_dir), '--name', 'solo', '-o', str(ini)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    controller = f'ipc://{data_dir}/circus-c.sock'
    assert f'circusctl --endpoint {controller} status' in result.stderr
    process = run_generated(ini, controller)
    children: list[psutil.Process] = []
    try:
        info = wait_until(
            lambda: _found(controller, 'zmq-broker-solo'), 30, interval=0.05, what='the broker through the arbiter'
        )
        children = psutil.Process(process.pid).children(recursive=True)
        with CircusController(controller) as client:
            assert client.call('status')['statuses'] == {
                'zmq-broker-solo': 'active',
                'zmq-events-solo': 'active',
                'zmq-health-solo': 'active',
            }
        communicator = connect(discover_endpoint(controller=controller, watcher='zmq-broker-solo'))
        try:
            communicator.add_task_subscriber(lambda _communicator, task: f'{task} done')
            assert communicator.task_send('job').result(timeout=10) == 'job done'
            assert communicator.admin('status')['pid'] == info['pid']
        finally:
            communicator.close()
        assert (data_dir / 'log' / 'zmq-broker-solo.log').exists()
        assert (data_dir / 'log' / 'circusd.log').exists()
    finally:
        stop_circusd(process, controller)
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    # One time stamp per line: the watcher's FileStream writes it, the broker (`serve --no-log-time`) does not.
    broker_lines = [
        line for line in (data_dir / 'log' / 'zmq-broker-solo.log').read_text().splitlines() if 'aiida_zmq' in line
    ]
    assert broker_lines, 'the broker logged nothing through its watcher stream'
    assert all(len(TIME_STAMP.findall(line)) == 1 for line in broker_lines), broker_lines[:3]


TIME_STAMP = re.compile(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d')


def _found(controller: str, watcher: str) -> dict | None:
    try:
        return find_broker_via_arbiter(controller, watcher)
    except BrokerNotFound:
        return None


AIIDA_CLIENT = """
import sys
from aiida import load_profile
from aiida.manage import get_manager

load_profile(sys.argv[1], allow_switch=True)
communicator = get_manager().get_communicator()
print(communicator.connection.admin('status')['pid'])
"""


def test_circus_config_profile_serves_aiida_clients(short_dir: Path) -> None:
    """``circus-config --profile``: circusd runs the profile's broker and an AiiDA process uses it."""
    env = {**os.environ, 'AIIDA_PATH': str(short_dir / 'aiida')}
    data_dir, ini = short_dir / 'data', short_dir / 'p.ini'
    subprocess.run(
        [*AIIDA_ZMQ, 'presto', '-p', 'circ', '--no-computer', '--data-dir', str(data_dir)],
        env=env,
        capture_output=True,
        timeout=120,
        check=True,
    )
    subprocess.run([*AIIDA_ZMQ, 'circus-config', '--profile', 'circ', '-o', str(ini)], env=env, timeout=60, check=True)
    controller = f'ipc://{data_dir}/circus-c.sock'
    rendered = ini.read_text()
    assert f'--data-dir {data_dir}' in rendered
    # The profile's broker options reach `serve` as the daemon would pass them (here the defaults).
    assert '--heartbeat 1.0 --peer-timeout 10.0 --max-deliveries 20 --no-log-time' in rendered
    process = run_generated(ini, controller)
    try:
        info = wait_until(lambda: _found(controller, 'zmq-broker-circ'), 30, interval=0.05, what='the broker')
        answer = subprocess.run(
            [sys.executable, '-c', AIIDA_CLIENT, 'circ'],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert answer.returncode == 0, answer.stderr
        assert int(answer.stdout.split()[-1]) == info['pid']
    finally:
        stop_circusd(process, controller)


def test_circus_config_needs_a_broker(short_dir: Path) -> None:
    result = subprocess.run([*AIIDA_ZMQ, 'circus-config'], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert 'give --profile PROFILE' in result.stderr


def test_wheel_ships_templates_and_plugins(short_dir: Path) -> None:
    """From an installed wheel, not only a checkout: templates are package data, the plugins a package."""
    import shutil

    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout others work in.
    source = short_dir / 'src'
    shutil.copytree(
        Path(__file__).resolve().parents[2],
        source,
        ignore=shutil.ignore_patterns('.venv*', '.git', 'build', 'dist', '*.egg-info', '__pycache__', '.*_cache'),
    )
    # pip's isolated build fetches the build backend named in pyproject.toml (setuptools>=68), as users' pip does.
    build = subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps', '-w', str(short_dir), str(source)],
        check=False,
        timeout=300,
        capture_output=True,
        text=True,
    )
    if build.returncode != 0 and any(
        marker in build.stderr
        for marker in ('NewConnectionError', 'No matching distribution', 'Could not find a version')
    ):
        pytest.skip(f'cannot fetch the build backend to build a wheel (offline?): {build.stderr[-300:]}')
    assert build.returncode == 0, build.stderr
    (wheel,) = short_dir.glob('aiida_zmq-*.whl')
    site = short_dir / 'site'
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    for name in ('circus.ini.tmpl', 'watcher.ini.tmpl'):
        assert f'aiida_zmq/config/{name}' in names
    for name in ('events', 'health', 'hooks'):
        assert f'aiida_zmq/circus_plugins/{name}.py' in names
    code = (
        'import aiida_zmq, sys; from circus.util import resolve_name; '
        'from aiida_zmq.cli.circus import render_config; from pathlib import Path; '
        f'assert aiida_zmq.__file__.startswith({str(site)!r}), aiida_zmq.__file__; '
        "resolve_name('aiida_zmq.circus_plugins.events.BrokerEventsPlugin'); "
        "resolve_name('aiida_zmq.circus_plugins.health.BrokerHealthPlugin'); "
        "print(render_config('w', Path('/tmp/w'), key='w')[0])"
    )
    result = subprocess.run(
        [sys.executable, '-c', code],
        check=False,
        env={**os.environ, 'PYTHONPATH': str(site)},
        cwd=short_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert '[watcher:zmq-health-w]' in result.stdout


# Liveness of ``broker.json``: more than "the pid exists" -----------------------------------------------------------


@pytest.fixture
def unrelated_process() -> Iterator[psutil.Process]:
    """A live process that is not a broker: what a recycled pid names after kill -9 or a reboot."""
    process = subprocess.Popen(['sleep', '300'])
    try:
        yield psutil.Process(process.pid)
    finally:
        process.kill()
        process.wait(10)


def write_broker_info(data_dir: Path, pid: int, started: float) -> None:
    """A ``broker.json`` as ``aiida-zmq serve`` writes it, naming ``pid``."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = {'pid': pid, 'endpoints': [f'ipc://{data_dir}/broker.sock'], 'epoch': 'stale', 'started': started}
    (data_dir / 'broker.json').write_text(json.dumps(info))


def test_stale_broker_json_naming_a_live_unrelated_process_is_no_broker(
    short_dir: Path, unrelated_process: psutil.Process
) -> None:
    """The pid runs, and even the ``started`` time fits it, but nobody holds the broker's lock: no broker runs.

    Clients must say so at once instead of connecting to a dead socket and failing after their connect timeout.
    """
    data_dir = short_dir / 'd'
    for pid in (unrelated_process.pid, os.getpid()):
        write_broker_info(data_dir, pid, started=time.time())
        info = read_broker_info(data_dir)
        assert info is not None and info['pid'] == pid
        assert not broker_info_alive(info)
        assert read_live_broker_info(data_dir) is None
        started = time.monotonic()
        with pytest.raises(BrokerNotFound, match='no live broker announced itself'):
            discover_endpoint(data_dir=data_dir)
        with pytest.raises(BrokerUnavailable, match='no running aiida-zmq broker found'):
            connect(data_dir=str(data_dir), connect_timeout=10.0)
        assert time.monotonic() - started < 1.0
    # The probe neither creates the lock file nor leaves a lock behind: an offline submit goes through.
    assert not (data_dir / 'broker.lock').exists()
    submit_offline(data_dir, 'work', b'x')


def test_liveness_with_the_lock_held_by_someone_else(short_dir: Path, unrelated_process: psutil.Process) -> None:
    """An offline submit (or a new broker still starting) holds the lock: the probe waits for nothing and takes
    nothing, and a held lock with a running pid counts as a broker (a starting one binds the endpoint named)."""
    data_dir = short_dir / 'd'
    data_dir.mkdir(mode=0o700)
    with broker_lock(data_dir, blocking=False):
        write_broker_info(data_dir, unrelated_process.pid, started=time.time() + 3600)  # even a clock stepped back
        started = time.monotonic()
        assert read_live_broker_info(data_dir) is not None
        assert time.monotonic() - started < 1.0
        # Probing did not take the lock away from its holder, nor remove its file.
        assert (data_dir / 'broker.lock').exists()
        with pytest.raises(BrokerRunning):
            submit_offline(data_dir, 'work', b'x')
    # Its holder let go: the same file now names no broker.
    assert read_live_broker_info(data_dir) is None


def test_without_a_lock_to_probe_the_process_age_decides(unrelated_process: psutil.Process) -> None:
    """Information from elsewhere than a data directory (no lock to probe): a process created well after the broker
    wrote ``started`` is a recycled pid; one created before it (or just after: clock granularity) may be the broker."""
    created = unrelated_process.create_time()
    info = {'pid': unrelated_process.pid, 'endpoints': ['ipc:///nowhere.sock']}
    assert not broker_info_alive({**info, 'started': created - 3600})  # a broker that started an hour earlier
    assert broker_info_alive({**info, 'started': created - 1})
    assert broker_info_alive({**info, 'started': created + 5})
    assert broker_info_alive(info)  # no ``started``: the pid alone


def test_a_real_broker_is_live_until_killed(zmq_broker: BrokerProcess, unrelated_process: psutil.Process) -> None:
    info = read_live_broker_info(zmq_broker.data_dir)
    assert info is not None and info['pid'] == zmq_broker.pid
    assert broker_info_alive(info)
    assert discover_endpoint(data_dir=zmq_broker.data_dir) == zmq_broker.endpoint
    communicator = connect(data_dir=str(zmq_broker.data_dir))
    try:
        assert communicator.admin('status')
    finally:
        communicator.close()

    zmq_broker.kill()  # kill -9: broker.json stays behind
    stale = read_broker_info(zmq_broker.data_dir)
    assert stale is not None and stale['pid'] == info['pid']
    assert read_live_broker_info(zmq_broker.data_dir) is None
    # Its pid handed to another process, as after a reboot: still no broker.
    write_broker_info(zmq_broker.data_dir, unrelated_process.pid, started=time.time())
    assert read_live_broker_info(zmq_broker.data_dir) is None


def test_a_broker_in_a_thread_of_an_older_process_is_live(short_dir: Path) -> None:
    """Its process (this one) was created long before the broker wrote ``started``: that is no reason to doubt it."""
    from aiida_zmq.broker.server import Broker

    broker = Broker(short_dir / 'b', [f'ipc://{short_dir}/b.sock']).start_in_thread()
    try:
        info = wait_until(lambda: read_live_broker_info(short_dir / 'b'), what='the broker in a thread')
        assert info['pid'] == os.getpid()
    finally:
        broker.stop()
    assert read_live_broker_info(short_dir / 'b') is None
