"""``aiida-zmq migrate --profile``: a profile's stored tasks to RabbitMQ and back, then run by a daemon.

The tasks were stored by ``submit()`` with the ``hybrid`` codec (JSON-tagged); RabbitMQ gets AiiDA's YAML, which is
what AiiDA on RabbitMQ reads, and they come back readable. With the daemon stopped no broker runs: ``migrate`` works on
the broker's store itself (the documented recipe); with a broker running, through it.
"""

from __future__ import annotations

import re
import shlex
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from aiida_profile import AiidaZmqProfile

from aiida_zmq.testing import wait_until

RABBITMQ = ('127.0.0.1', 5672)


def _rabbitmq_running() -> bool:
    try:
        with socket.create_connection(RABBITMQ, timeout=1):
            return True
    except OSError:
        return False


pytestmark = [
    pytest.mark.aiida,
    pytest.mark.skipif(not _rabbitmq_running(), reason='no RabbitMQ on 127.0.0.1:5672 (tests/run.sh starts one)'),
]


def _stored(profile: AiidaZmqProfile) -> int:
    """Tasks in the profile's store (read-only: no broker runs)."""
    database = sqlite3.connect(f'file:{profile.data_dir / "tasks.sqlite3"}?mode=ro', uri=True)
    try:
        return database.execute('SELECT count(*) FROM tasks').fetchone()[0]
    finally:
        database.close()


def _wait_done(profile: AiidaZmqProfile, pks: list[int]) -> None:
    answer = profile.driver('wait', *map(str, pks), '--timeout', '90', timeout=150)
    assert answer['pending'] == [] and all(state['ok'] for state in answer['states'].values()), answer


def test_recipe_with_the_daemon_stopped(aiida_zmq_profile_factory) -> None:
    """The docs' recipe, typed as written: no broker is started by hand, none starts, the tasks run on RabbitMQ."""
    profile: AiidaZmqProfile = aiida_zmq_profile_factory()
    first = profile.driver('submit', 'add', '2')['pks']
    assert profile.broker_pid() is None and _stored(profile) == 2

    dry = profile.aiida_zmq('migrate', '--to', 'rabbitmq', '--profile', profile.name, '--dry-run')
    assert 'would move 2 task(s)' in dry.stdout, dry.stdout
    to = profile.aiida_zmq('migrate', '--to', 'rabbitmq', '--profile', profile.name)
    assert 'moved 2 task(s)' in to.stdout, to.stdout
    assert 'working on its store' in to.stderr, to.stderr
    assert _stored(profile) == 0
    assert profile.broker_pid() is None  # moved from the store: no broker (and no worker) was started for it
    again = profile.aiida_zmq('migrate', '--to', 'rabbitmq', '--profile', profile.name)
    assert 'moved 0 task(s)' in again.stdout, again.stdout  # none left behind, none moved twice

    # A task submitted after the move, then the switch first: ``configure`` says what to run, and that works.
    late = profile.driver('submit', 'add', '1')['pks']
    switched = profile.aiida_zmq('configure', profile.name, '--to', 'core.rabbitmq')
    hint = re.search(r'`(aiida-zmq migrate [^`]+)`', switched.stdout)
    assert hint, switched.stdout
    argv = hint.group(1).split()
    assert argv[:6] == ['aiida-zmq', 'migrate', '--to', 'rabbitmq', '--profile', profile.name], argv
    moved = profile.aiida_zmq(*argv[1:])
    assert 'moved 1 task(s)' in moved.stdout, moved.stdout
    assert _stored(profile) == 0

    profile.verdi('daemon', 'start', '2')
    try:
        _wait_done(profile, first + late)
    finally:
        profile.daemon_stop()

    # Coming (back) from RabbitMQ, as docs/coming-from-rabbitmq.md says: processes submitted on RabbitMQ with the
    # daemon stopped wait there; `migrate --from rabbitmq` (the profile's own server) moves them, then the switch.
    on_rabbitmq = profile.driver('submit', 'add', '2')['pks']
    assert profile.broker_pid() is None and _stored(profile) == 0
    dry = profile.aiida_zmq('migrate', '--from', 'rabbitmq', '--profile', profile.name, '--dry-run')
    assert 'would move 2 task(s)' in dry.stdout, dry.stdout
    moved = profile.aiida_zmq('migrate', '--from', 'rabbitmq', '--profile', profile.name)
    assert 'moved 2 task(s)' in moved.stdout and _stored(profile) == 2, moved.stdout
    switched = profile.aiida_zmq('configure', profile.name)
    assert 'broker `core.rabbitmq` -> `zmq`' in switched.stdout, switched.stdout
    hint = re.search(r'`(aiida-zmq migrate --from rabbitmq [^`]+)`', switched.stdout)
    assert hint, switched.stdout
    rest = profile.aiida_zmq(*shlex.split(hint.group(1))[1:])  # what was left in RabbitMQ: nothing, as it says
    assert 'moved 0 task(s)' in rest.stdout and _stored(profile) == 2, rest.stdout
    profile.daemon_start(2)
    try:
        _wait_done(profile, on_rabbitmq)
    finally:
        profile.daemon_stop()


def test_through_a_running_broker_and_back_into_the_stopped_store(aiida_zmq_profile_factory) -> None:
    profile: AiidaZmqProfile = aiida_zmq_profile_factory()
    submitted = profile.driver('submit', 'add', '3')['pks']
    serve = subprocess.Popen(
        [str(Path(sys.executable).parent / 'aiida-zmq'), 'serve', '--data-dir', str(profile.data_dir)],
        env=profile.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: profile.broker_pid() == serve.pid, timeout=30, what='the broker to start')
        to = profile.aiida_zmq('migrate', '--profile', profile.name, '--to')
        assert 'moved 3 task(s)' in to.stdout, to.stdout
        assert 'working on its store' not in to.stderr, to.stderr
        assert profile.broker_status()['queues'].get(profile.info()['queue'], {}).get('depth', 0) == 0
    finally:
        serve.terminate()
        serve.wait(30)

    assert profile.broker_pid() is None and _stored(profile) == 0
    back = profile.aiida_zmq('migrate', '--profile', profile.name, '--from')
    assert 'moved 3 task(s)' in back.stdout, back.stdout
    assert 'working on its store' in back.stderr, back.stderr
    assert _stored(profile) == 3
    empty = profile.aiida_zmq('migrate', '--profile', profile.name, '--from', '--dry-run')
    assert 'would move 0 task(s)' in empty.stdout, empty.stdout

    profile.daemon_start(2)
    try:
        _wait_done(profile, submitted)
    finally:
        profile.daemon_stop()
