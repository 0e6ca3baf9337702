"""``aiida-zmq presto`` and ``aiida-zmq configure``: select this broker for a profile, non-interactively."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiida_profile import AiidaZmqProfile

pytestmark = pytest.mark.aiida


def _broker(profile: AiidaZmqProfile) -> str:
    shown = profile.verdi('profile', 'show', profile.name).stdout
    lines = shown.splitlines()
    index = next(i for i, line in enumerate(lines) if line.strip().startswith('process_control'))
    return '\n'.join(lines[index : index + 12])


def test_presto_then_configure_round_trip(tmp_path: Path) -> None:
    profile = AiidaZmqProfile('cli', tmp_path)
    created = profile.aiida_zmq('presto', '--profile-name', 'cli', '--no-computer')
    assert 'Created profile `cli`' in created.stdout and 'daemon start' in created.stdout
    assert 'backend: zmq' in _broker(profile)

    again = profile.aiida_zmq('presto', '--profile-name', 'cli', check=False)
    assert again.returncode != 0 and 'already exists' in again.stderr

    switched = profile.aiida_zmq('configure', 'cli', '--to', 'core.rabbitmq', '--force', check=False)
    assert switched.returncode == 0, switched.stdout + switched.stderr
    assert 'broker `zmq` -> `core.rabbitmq`' in switched.stdout
    assert 'backend: core.rabbitmq' in _broker(profile)

    data_dir = tmp_path / 'broker-data'
    back = profile.aiida_zmq('configure', 'cli', '--data-dir', str(data_dir), '--start-timeout', '7')
    assert f'Broker data directory: {data_dir}' in back.stdout
    broker = _broker(profile)
    assert 'backend: zmq' in broker and str(data_dir) in broker and 'start_timeout: 7' in broker

    unknown = profile.aiida_zmq('configure', 'cli', '--to', 'no.such.broker', check=False)
    assert unknown.returncode != 0 and 'unknown broker `no.such.broker`' in unknown.stderr
    mixed = profile.aiida_zmq('configure', 'cli', '--to', 'none', '--data-dir', str(data_dir), check=False)
    assert mixed.returncode != 0 and 'only apply to `--to zmq`' in mixed.stderr
