"""``aiida-zmq presto`` and ``aiida-zmq configure``: select this broker for a profile, non-interactively."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from aiida_profile import AiidaZmqProfile

pytestmark = pytest.mark.aiida


def _broker(profile: AiidaZmqProfile) -> str:
    shown = profile.verdi('profile', 'show', profile.name).stdout
    lines = shown.splitlines()
    index = next(i for i, line in enumerate(lines) if line.strip().startswith('process_control'))
    return '\n'.join(lines[index : index + 16])


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


def test_configure_sets_broker_options_and_keeps_the_others(tmp_path: Path) -> None:
    """`configure --set` changes options of a profile already on this broker, keeping the rest (its data directory);
    `circus-config --profile` (and the daemon, which builds the same watcher) passes them to `aiida-zmq serve`."""
    profile = AiidaZmqProfile('opts', tmp_path)
    data_dir = tmp_path / 'custom-store'
    profile.aiida_zmq('presto', '--profile-name', 'opts', '--no-computer', '--data-dir', str(data_dir))

    changed = profile.aiida_zmq(
        'configure', 'opts', '--set', 'peer_timeout=30', '--set', 'fsync=no', '--set', 'max-deliveries=5'
    )
    assert 'peer_timeout 10.0 -> 30.0' in changed.stdout and 'fsync True -> False' in changed.stdout
    broker = _broker(profile)
    assert str(data_dir) in broker  # kept
    assert 'peer_timeout: 30.0' in broker and 'fsync: false' in broker and 'max_deliveries: 5' in broker

    ini = profile.aiida_zmq('circus-config', '--profile', 'opts').stdout
    assert '--heartbeat 1.0 --peer-timeout 30.0 --max-deliveries 5 --no-fsync' in ini
    assert f'--data-dir {data_dir}' in ini

    for bad, says in (
        ('nope=1', 'OPTION one of'),
        ('fsync=maybe', 'expected true or false'),
        ('max_deliveries=0', 'at least 1'),
        ('peer_timeout=-2', 'above 0'),
        ('codec=xml', 'choose one of hybrid, yaml'),
        ('peer_timeout', 'give OPTION=VALUE'),
    ):
        refused = profile.aiida_zmq('configure', 'opts', '--set', bad, check=False)
        assert refused.returncode == 2 and says in refused.stderr, (bad, refused.stderr)
    elsewhere = profile.aiida_zmq('configure', 'opts', '--to', 'none', '--set', 'fsync=true', check=False)
    assert elsewhere.returncode != 0 and 'only apply to `--to zmq`' in elsewhere.stderr
    assert 'peer_timeout: 30.0' in _broker(profile)  # nothing refused was stored


def test_a_stale_daemon_pid_file_is_no_running_daemon(tmp_path: Path) -> None:
    """A daemon pid file whose pid is no circusd (the daemon was killed with -9, its pid went to another process) is
    no running daemon, for every command alike (:mod:`aiida_zmq.aiida.daemon`). `configure` used to warn that the
    daemon runs (it read the pid file only) where the core.zeromq move and `status` took the file for stale."""
    profile = AiidaZmqProfile('stale', tmp_path)
    profile.aiida_zmq('presto', '--profile-name', 'stale', '--no-computer')
    pid_file = tmp_path / '.aiida' / 'daemon' / 'circus-stale.pid'
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(os.getpid()))  # this test's process: alive, and not a daemon
    switched = profile.aiida_zmq('configure', 'stale', '--to', 'core.rabbitmq', '--force')
    assert 'broker `zmq` -> `core.rabbitmq`' in switched.stdout, switched.stdout + switched.stderr
    assert 'is running' not in switched.stderr, switched.stderr
