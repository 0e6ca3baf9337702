"""The store's identity record (issue 20.5, 20.6): a store filled only offline is guarded like a served one, and
``accept-store`` refuses a directory with no store. Real ``aiida-zmq serve`` and ``aiida-zmq accept-store`` processes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiida_zmq.store import STORE_FILENAME, submit_offline
from aiida_zmq.store_identity import IDENTITY_FILENAME


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'aiida_zmq.cli', *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private directory with a short path (unix socket paths are limited to ~100 bytes)."""
    base = Path(tempfile.mkdtemp(prefix='azid-'))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_store_filled_offline_then_truncated_is_refused_like_a_served_one(short_dir):
    data = short_dir / 'data'
    for index in range(5):
        submit_offline(data, 'q', b'\x00J%d' % index)  # AiiDA's submit with the daemon stopped; no broker ever ran
    record = (data / IDENTITY_FILENAME).read_text()
    assert record.endswith(f' {5:020d}\n'), record
    (data / STORE_FILENAME).write_bytes(b'')  # truncated: SQLite would open it as an empty store
    for suffix in ('-wal', '-shm'):
        (data / (STORE_FILENAME + suffix)).unlink(missing_ok=True)
    result = cli('serve', '--data-dir', str(data), '--bind', f'ipc://{short_dir}/b.sock', timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert 'not the store the broker left' in result.stderr and 'up to id 5' in result.stderr, result.stderr
    # An offline submit into it is refused too, rather than adopting what is left.
    with pytest.raises(Exception, match='not the store the broker left'):
        submit_offline(data, 'q', b'\x00J9')


def test_accept_store_refuses_a_directory_with_no_store(short_dir):
    typo = short_dir / 'TYPO'
    result = cli('accept-store', '--data-dir', str(typo))
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'does not exist' in result.stderr and 'nothing to accept' in result.stderr, result.stderr
    assert not typo.exists()  # not created, with no empty store "accepted" in it
    empty = short_dir / 'empty'
    empty.mkdir()
    result = cli('accept-store', '--data-dir', str(empty))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f'has no task store ({STORE_FILENAME})' in result.stderr, result.stderr
    assert sorted(path.name for path in empty.iterdir()) == []
