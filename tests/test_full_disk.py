"""Moves from and to core.zeromq on a full file system (issue 20.4): no task lost, and the move says what it moved.

A small tmpfs holds one side of the move (root only: ``mount -t tmpfs``; the tests skip elsewhere, saying why).
Before: ``write_pending`` ignored what ``os.write`` returned, so a task file for core.zeromq was cut short (24,576 of
~100 KB) on a full disk, and its row deleted all the same; core.zeromq deletes a file it cannot parse, so the task was
gone. Now a file is written whole and synced (file and directory) before its row goes, and the move stops on the
full disk saying how many tasks it moved, the rest staying where they were. The CLI's side of it (the message after
500 moved) is in ``tests/aiida/test_core_zeromq_switch.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiida_zmq import store
from aiida_zmq.codec import default_codec
from aiida_zmq.core_zeromq import CoreZeromqDir
from aiida_zmq.core_zeromq_move import export_to_core_zeromq, import_from_core_zeromq
from aiida_zmq.exceptions import MoveStopped

QUEUE = 'aiida-test.process.queue'
PAD = 'x' * 100_000  # tasks of ~100 KB, as in the issue


def _can_mount() -> bool:
    if os.geteuid() != 0:
        return False
    probe = Path(tempfile.mkdtemp(prefix='azmnt-'))
    try:
        command = ['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(probe)]
        mount = subprocess.run(command, capture_output=True, check=False)
        if mount.returncode != 0:
            return False
        subprocess.run(['umount', str(probe)], check=True)
        return True
    finally:
        probe.rmdir()


needs_mount = pytest.mark.skipif(not _can_mount(), reason='needs root (or CAP_SYS_ADMIN) to mount a small tmpfs')


@contextlib.contextmanager
def small_disk(size: str) -> Iterator[Path]:
    """A directory on a tmpfs of ``size``, removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix='azfd-'))
    mounted = base / 'disk'
    mounted.mkdir(mode=0o700)
    subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size},mode=0700', 'tmpfs', str(mounted)], check=True)
    try:
        yield mounted
    finally:
        subprocess.run(['umount', '-l', str(mounted)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def _body(pid: int) -> dict:
    return {'task': 'continue', 'args': {'pid': pid, 'nowait': False, 'tag': None}, 'pad': PAD}


def _stored_pids(data_dir: Path) -> list[int]:
    task_store = store.TaskStore(data_dir / store.STORE_FILENAME)
    try:
        ids = [row['id'] for row in task_store.list_tasks(QUEUE, 10_000)]
        return sorted(default_codec().decode(task.payload)['args']['pid'] for task in task_store.load_tasks(ids))
    finally:
        task_store.close()


def _core_zeromq_pids(directory: CoreZeromqDir) -> tuple[list[int], list[str]]:
    """The pids of the task files core.zeromq would run, and the files it could not parse (it deletes those)."""
    pids, broken = [], []
    for task_file in directory.task_files():
        try:
            pids.append(directory.read(task_file)['body']['args']['pid'])
        except ValueError:
            broken.append(f'{task_file.path.name} ({task_file.path.stat().st_size} bytes)')
    return sorted(pids), broken


@needs_mount
def test_a_move_to_core_zeromq_on_a_full_disk_loses_no_task_and_says_what_it_moved(tmp_path: Path) -> None:
    data_dir = tmp_path / 'data'
    for pid in range(30):
        store.submit_offline(data_dir, QUEUE, default_codec().encode(_body(pid)))
    with small_disk('1m') as disk:
        target = CoreZeromqDir(disk / 'service')
        with pytest.raises(MoveStopped) as stopped:
            export_to_core_zeromq(data_dir, target, QUEUE, default_codec().decode)
        moved, broken = _core_zeromq_pids(target)
        assert broken == [], f'task files cut short, their rows deleted: {broken}'
        left = _stored_pids(data_dir)
        assert sorted(moved + left) == list(range(30)), (moved, left)
        assert set(moved).isdisjoint(left)
        assert 0 < len(moved) < 30
        assert stopped.value.moved == len(moved)
        message = str(stopped.value)
        assert f'{len(moved)} task(s) moved' in message and f'{len(left)} still in' in message, message
        assert 'No space left' in message or 'full' in message, message
        assert not [name for name in os.listdir(target.pending_dir) if name.endswith('.tmp')]  # no half file left


@needs_mount
def test_a_move_from_core_zeromq_into_a_full_store_loses_no_task_and_says_what_it_moved(tmp_path: Path) -> None:
    source = CoreZeromqDir(tmp_path / 'service')
    for pid in range(40):
        source.write_pending(f'task-{pid}', _body(pid), 1_700_000_000 + pid)
    with small_disk('2m') as disk:
        data_dir = disk / 'data'
        with pytest.raises(MoveStopped) as stopped:
            import_from_core_zeromq(source, data_dir, QUEUE, default_codec().encode, batch_size=5)
        left, broken = _core_zeromq_pids(source)
        assert broken == []
        moved = _stored_pids(data_dir)
        assert sorted(moved + left) == list(range(40)), (moved, left)
        assert 0 < len(moved) < 40
        assert stopped.value.moved == len(moved)
        assert f'{len(moved)} task(s) moved' in str(stopped.value), stopped.value
        # A rerun with room moves the rest, none twice.
        shutil.copytree(data_dir, tmp_path / 'roomy')
    report = import_from_core_zeromq(source, tmp_path / 'roomy', QUEUE, default_codec().encode)
    assert report.moved == len(left)
    assert _stored_pids(tmp_path / 'roomy') == list(range(40))
    assert json.dumps(_core_zeromq_pids(source)) == json.dumps([[], []])
