"""``aiida-zmq migrate --profile``: a profile's stored tasks to RabbitMQ and back, then run by the daemon.

The tasks were stored by ``submit()`` with the ``hybrid`` codec (JSON-tagged); RabbitMQ gets AiiDA's YAML, which is
what AiiDA on RabbitMQ reads, and they come back readable.
"""

from __future__ import annotations

import socket
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


def test_profile_tasks_to_rabbitmq_and_back(aiida_zmq_profile_factory) -> None:
    profile: AiidaZmqProfile = aiida_zmq_profile_factory()
    submitted = profile.driver('submit', 'add', '3')
    # ``migrate`` talks to a running broker; with the daemon stopped, run one on the profile's data directory.
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
        assert profile.broker_status()['queues'].get(profile.info()['queue'], {}).get('depth', 0) == 0
        back = profile.aiida_zmq('migrate', '--profile', profile.name, '--from')
        assert 'moved 3 task(s)' in back.stdout, back.stdout
    finally:
        serve.terminate()
        serve.wait(30)

    profile.daemon_start(2)
    answer = profile.driver('wait', *map(str, submitted['pks']), '--timeout', '60')
    assert answer['pending'] == [] and all(state['ok'] for state in answer['states'].values()), answer
    profile.daemon_stop()
