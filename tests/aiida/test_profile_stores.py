"""``verdi profile delete`` leaves the broker's store; ``aiida-zmq stores`` finds it and removes it, and only it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from aiida_profile import BIN, AiidaZmqProfile

from aiida_zmq.discovery import wait_for_broker_info

pytestmark = pytest.mark.aiida


def test_stores_of_deleted_profiles_are_found_and_removed_and_no_other(
    aiida_zmq_profile_factory: Callable[..., AiidaZmqProfile], tmp_path: Path
) -> None:
    deleted = aiida_zmq_profile_factory()
    kept = aiida_zmq_profile_factory()
    shared = tmp_path / 'shared-store'
    kept.aiida_zmq('configure', kept.name, '--set', f'data_dir={shared}')
    for profile in (deleted, kept):
        profile.driver('submit', 'add', '1')  # the daemon is stopped: into the store
    gone_store = deleted.data_dir
    assert gone_store.is_dir() and shared.is_dir() and kept.data_dir == shared

    deleted.verdi('profile', 'delete', '--force', '--delete-data', deleted.name)
    # What aiida-core 2.9 does: it gives a broker no hook on deletion, the store stays with its tasks.
    assert (gone_store / 'tasks.sqlite3').exists()

    listed = kept.aiida_zmq('stores').stdout
    assert f'{gone_store.resolve()}: no profile (left by a deleted one)' in listed, listed
    assert f'{shared.resolve()}: {kept.name}' in listed, listed
    assert '1 store(s) of deleted profiles' in listed, listed

    # A store of no profile that a broker holds is not removed, and the command says so (exit 1).
    held = gone_store.parent / 'held-by-a-broker'
    broker = subprocess.Popen(
        [str(BIN / 'aiida-zmq'), 'serve', '--data-dir', str(held)],
        env=kept.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_broker_info(held, timeout=30)
        refused = kept.aiida_zmq('stores', '--remove-orphans', '--yes', check=False)
        assert refused.returncode == 1, refused
        assert f'not removed: a broker holds {held.resolve()}' in refused.stderr, refused.stderr
        assert f'removed {gone_store.resolve()}' in refused.stdout, refused.stdout
    finally:
        broker.terminate()
        broker.wait(timeout=30)
    assert not gone_store.exists()
    assert held.is_dir() and (shared / 'tasks.sqlite3').exists()
