"""From core.zeromq to aiida-zmq and back with ``aiida-zmq configure``, on a real core.zeromq profile and daemon.

The profile is what ``verdi presto --use-zeromq`` makes (aiida-core 2.9.4's own ZeroMQ broker); its daemon is started
and stopped with ``verdi``, and the processes are submitted while it runs (core.zeromq cannot take a task without
it). Then the daemon is stopped and one command switches the profile, moving the tasks; the daemon is started again,
now on aiida-zmq, and every process must finish, none twice. The proof of "none twice" is threefold: the store holds
exactly one task per process after the switch (``verdi process repair --dry-run`` agrees), each work chain has
exactly one calcfunction child (a second run of its step would call a second one), and all finish ok.

Interruptions are SIGKILLs of the mover (``tests/core_zeromq_mover.py``) at chosen steps, or, in the slow variant, of
``aiida-zmq configure`` itself at random points; the rerun of the same ``aiida-zmq configure`` must finish the move.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiida_profile import BIN, AiidaZmqProfile

from aiida_zmq.codec import default_codec
from aiida_zmq.core_zeromq import CoreZeromqDir
from aiida_zmq.core_zeromq_move import import_from_core_zeromq
from aiida_zmq.store import STORE_FILENAME, TaskStore
from aiida_zmq.testing import wait_until

pytestmark = pytest.mark.aiida

MOVER = Path(__file__).parent.parent / 'core_zeromq_mover.py'


class CoreZeromqProfile(AiidaZmqProfile):
    """A profile made by ``verdi presto --use-zeromq``, with the paths of both brokers."""

    def __init__(self, name: str, aiida_path: Path) -> None:
        super().__init__(name, aiida_path)
        self.run(str(BIN / 'verdi'), 'presto', '--use-zeromq', '--profile-name', name)
        config = json.loads((aiida_path / '.aiida' / 'config.json').read_text())
        self.uuid = config['profiles'][name]['PROFILE_UUID']
        self.core_zeromq = CoreZeromqDir(aiida_path / '.aiida' / 'broker' / f'{self.uuid}-{name}')
        self.store_dir = aiida_path / '.aiida' / 'broker' / 'zmq' / self.uuid
        self.queue = f'aiida-{self.uuid}.process.queue'

    def backend(self) -> str:
        config = json.loads((self.aiida_path / '.aiida' / 'config.json').read_text())
        return config['profiles'][self.name]['process_control']['backend']

    def core_zeromq_daemon_start(self, workers: int) -> None:
        """``verdi daemon start`` on core.zeromq: its broker comes up with the daemon."""
        self.verdi('daemon', 'start', str(workers))
        wait_until(self.core_zeromq.broker_pid, timeout=60, interval=0.1, what='the core.zeromq broker to start')

    def stored_pids(self) -> list[int]:
        """The process pks of the tasks in the aiida-zmq store (read-only), in its order."""
        database = sqlite3.connect(f'file:{self.store_dir / "tasks.sqlite3"}?mode=ro', uri=True)
        try:
            rows = database.execute('SELECT queue, payload FROM tasks ORDER BY id').fetchall()
        finally:
            database.close()
        assert {queue for queue, _ in rows} <= {self.queue}, rows
        return [default_codec().decode(payload)['args']['pid'] for _, payload in rows]

    def core_zeromq_pids(self) -> list[int]:
        return [json.loads(task.path.read_text())['body']['args']['pid'] for task in self.core_zeromq.task_files()]

    def mover(self, *kill: str) -> subprocess.CompletedProcess:
        """The move alone, killed by SIGKILL at a chosen step (see ``core_zeromq_mover.py``)."""
        argv = [sys.executable, str(MOVER), 'in', str(self.core_zeromq.service_dir), str(self.store_dir), self.queue]
        return self.run(*argv, *kill, check=False)


@pytest.fixture
def core_zeromq_profile_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., CoreZeromqProfile]]:
    """core.zeromq profiles in an AIIDA_PATH of their own (``verdi presto`` makes a profile the default one)."""
    made: list[CoreZeromqProfile] = []

    def factory(name: str = 'czmq') -> CoreZeromqProfile:
        made.append(CoreZeromqProfile(name, tmp_path_factory.mktemp('aiida-czmq')))
        return made[-1]

    yield factory
    leftovers = [line for profile in made for line in profile.teardown()]
    assert not leftovers, f'processes left running after the daemon stopped (killed now): {leftovers}'


def _submit_to_core_zeromq(profile: CoreZeromqProfile, adds: int, held: int, hold_file: Path) -> tuple[list, list]:
    """Submit ``held`` jobs that a worker takes and holds, then ``adds`` work chains that wait (no worker left)."""
    profile.core_zeromq_daemon_start(1)
    hold_file.touch()
    held_pks = profile.driver('submit-held', str(held), str(hold_file))['pks'] if held else []
    wait_until(
        lambda: (
            len(profile.core_zeromq.task_files()) == held
            and all(task.state == 'processing' for task in profile.core_zeromq.task_files())
        ),
        timeout=60,
        what='the worker to take the held jobs',
    )
    profile.verdi('daemon', 'decr', '1')
    add_pks = profile.driver('submit', 'add', str(adds))['pks']
    wait_until(lambda: len(profile.core_zeromq.task_files()) == adds + held, timeout=60, what='the tasks stored')
    return held_pks, add_pks


def _finish_on_aiida_zmq(profile: CoreZeromqProfile, pks: list[int], hold_file: Path, timeout: float = 120) -> dict:
    """Start the daemon (now on aiida-zmq), release the held jobs, wait for every process; return their states."""
    profile.daemon_start(2)
    try:
        hold_file.unlink(missing_ok=True)
        answer = profile.driver('wait', *map(str, pks), '--timeout', str(timeout), timeout=timeout + 60)
    finally:
        profile.daemon_stop()
    assert answer['pending'] == [], answer
    return answer['states']


def _assert_each_ran_once(states: dict, add_pks: list[int]) -> None:
    assert all(state['ok'] for state in states.values()), states
    # A work chain's step that ran twice would have called its calcfunction twice.
    assert {pk: len(states[str(pk)]['children']) for pk in add_pks} == dict.fromkeys(add_pks, 1), states


def test_switch_from_core_zeromq_interrupted_twice_then_back(core_zeromq_profile_factory, tmp_path: Path) -> None:
    profile: CoreZeromqProfile = core_zeromq_profile_factory()
    hold = tmp_path / 'hold'
    held_pks, add_pks = _submit_to_core_zeromq(profile, adds=8, held=2, hold_file=hold)
    every = held_pks + add_pks

    refused = profile.aiida_zmq('configure', profile.name, check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f'`verdi -p {profile.name} daemon stop`' in refused.stderr and 'Nothing was moved' in refused.stderr
    assert profile.backend() == 'core.zeromq' and sorted(profile.core_zeromq_pids()) == sorted(every)
    looked = profile.aiida_zmq('configure', profile.name, '--dry-run')  # a dry run looks all the same, and warns
    assert 'Would move 10 task(s)' in looked.stdout and 'daemon stop' in looked.stderr, looked.stdout + looked.stderr

    profile.daemon_stop()
    assert profile.core_zeromq.broker_pid() is None and sorted(profile.core_zeromq_pids()) == sorted(every)
    dry = profile.aiida_zmq('configure', profile.name, '--dry-run')
    assert 'Would move 10 task(s)' in dry.stdout and 'Nothing was changed' in dry.stdout, dry.stdout
    assert profile.backend() == 'core.zeromq' and not profile.store_dir.exists()

    by_hand = profile.aiida_zmq('migrate', '--from', 'core.zeromq', '--profile', profile.name, '--dry-run', '--json')
    assert json.loads(by_hand.stdout)['moved'] == 10, by_hand.stdout
    bad = profile.aiida_zmq('migrate', '--from', 'core.zeromq', '-p', profile.name, '--queue', 'q', check=False)
    assert bad.returncode == 2 and 'not --endpoint' in bad.stderr, bad.stderr

    # Killed after the first batch of copies was committed, then after the first file of the second was retired.
    assert profile.mover('copied', '3', '4').returncode == -signal.SIGKILL
    assert profile.mover('retired', '5', '4').returncode == -signal.SIGKILL
    assert profile.backend() == 'core.zeromq'
    switched = profile.aiida_zmq('configure', profile.name)
    assert 'Finished the move of' in switched.stdout and 'broker `core.zeromq` -> `zmq`' in switched.stdout, switched
    assert profile.backend() == 'zmq'
    assert sorted(profile.stored_pids()) == sorted(every)  # each once
    assert profile.core_zeromq.task_files() == []
    repair = profile.verdi('process', 'repair', '--dry-run')
    assert 'No inconsistencies' in repair.stdout + repair.stderr, repair.stdout + repair.stderr

    _assert_each_ran_once(_finish_on_aiida_zmq(profile, every, hold), add_pks)

    # And back, by hand first: `migrate --to core.zeromq` moves the tasks submitted while the daemon is stopped (they
    # wait in the aiida-zmq store) and leaves the profile as it is; the switch then has nothing left to move.
    back = profile.driver('submit', 'add', '3')['pks']
    assert profile.stored_pids() == back
    moved = profile.aiida_zmq('migrate', '--to', 'core.zeromq', '--profile', profile.name)
    assert 'Moved 3 task(s)' in moved.stdout, moved.stdout
    assert profile.core_zeromq_pids() == back and profile.stored_pids() == [] and profile.backend() == 'zmq'
    switched = profile.aiida_zmq('configure', profile.name, '--to', 'core.zeromq')
    assert 'Moved 0 tasks' in switched.stdout and 'broker `zmq` -> `core.zeromq`' in switched.stdout, switched
    profile.core_zeromq_daemon_start(1)
    try:
        answer = profile.driver('wait', *map(str, back), '--timeout', '90', timeout=150)
    finally:
        profile.daemon_stop()
    assert answer['pending'] == [], answer
    _assert_each_ran_once(answer['states'], back)


# --- the figures: 100 processes, and 10 kills at random points ------------------------------------------------


def _kill_at_random_point(profile: CoreZeromqProfile, rng: random.Random) -> str:
    """Run ``aiida-zmq configure`` and SIGKILL it at a random point of its move; return where it was killed ('' if it
    finished first).

    The move of 100 tasks takes milliseconds after a second of start-up, so the point is chosen by what the move has
    done (the store created, k task files retired, k retired files deleted), plus a random delay under 1 ms.
    """
    total = len(profile.core_zeromq.task_files())
    store, retired = profile.store_dir / 'tasks.sqlite3', profile.core_zeromq.retired_dir
    stage, count, delay = rng.choice(['store', 'retired', 'deleted']), rng.randint(1, total), rng.uniform(0, 0.001)
    reached = {
        'store': store.exists,
        'retired': lambda: store.exists() and len(profile.core_zeromq.task_files()) <= total - count,
        'deleted': lambda: (
            retired.exists() and not profile.core_zeromq.task_files() and len(os.listdir(retired)) <= total - count
        ),
    }[stage]
    command = [str(BIN / 'aiida-zmq'), 'configure', profile.name]
    process = subprocess.Popen(command, env=profile.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Polled, not awaited: the point is in another process; tight, so that it lands inside the move.
        wait_until(
            lambda: process.poll() is not None or reached(), timeout=120, interval=0.0001, what=f'{stage} {count}'
        )
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(30)
    if process.returncode != -signal.SIGKILL:
        return ''  # it finished before the kill: not a try
    return f'{stage} {count} + {delay * 1000:.2f} ms: {_where(profile)}'


def _where(profile: CoreZeromqProfile) -> str:
    """How far a killed move got: the journal's entries by state, the files left on core.zeromq's side, the broker."""
    journal: dict[str, int] = {}
    if (profile.store_dir / 'tasks.sqlite3').exists():
        database = sqlite3.connect(f'file:{profile.store_dir / "tasks.sqlite3"}?mode=ro', uri=True)
        try:
            journal = dict(database.execute('SELECT state, count(*) FROM core_zeromq_moves GROUP BY state'))
        except sqlite3.Error:
            pass
        finally:
            database.close()
    files, retired = len(profile.core_zeromq.task_files()), len(profile.core_zeromq.retired_files())
    return f'journal {journal}, {files} task files, {retired} retired, profile on {profile.backend()}'


@pytest.mark.slow
def test_100_processes_switched_in_one_command_and_10_random_kills(core_zeromq_profile_factory, tmp_path) -> None:
    profile: CoreZeromqProfile = core_zeromq_profile_factory()
    _, pks = _submit_to_core_zeromq(profile, adds=100, held=0, hold_file=tmp_path / 'hold')
    profile.daemon_stop()
    snapshot = tmp_path / 'snapshot'
    shutil.copytree(profile.core_zeromq.service_dir, snapshot / 'service')
    config = profile.aiida_path / '.aiida' / 'config.json'
    shutil.copy(config, snapshot / 'config.json')

    def restore() -> None:
        shutil.rmtree(profile.store_dir, ignore_errors=True)
        shutil.rmtree(profile.core_zeromq.service_dir)
        shutil.copytree(snapshot / 'service', profile.core_zeromq.service_dir)
        shutil.copy(snapshot / 'config.json', config)

    started = time.perf_counter()
    switched = profile.aiida_zmq('configure', profile.name)
    elapsed = time.perf_counter() - started
    assert 'Moved 100 task(s)' in switched.stdout, switched.stdout
    assert sorted(profile.stored_pids()) == sorted(pks)
    print(f'switching 100 tasks with `aiida-zmq configure`: {elapsed:.2f} s')
    restore()
    started = time.perf_counter()
    report = import_from_core_zeromq(profile.core_zeromq, profile.store_dir, profile.queue, default_codec().encode)
    print(f'the move alone (import_from_core_zeromq): {(time.perf_counter() - started) * 1000:.1f} ms')
    assert report.moved == 100 and sorted(profile.stored_pids()) == sorted(pks)

    rng, kills = random.Random(16), 0
    for attempt in range(30):  # until 10 kills landed before the command finished by itself
        if kills == 10:
            break
        restore()
        point = _kill_at_random_point(profile, rng)
        if not point:
            continue
        kills += 1
        rerun = profile.aiida_zmq('configure', profile.name)  # the same command: it finishes the move (or nothing)
        assert profile.backend() == 'zmq', (attempt, point)
        assert sorted(profile.stored_pids()) == sorted(pks), (attempt, point)  # none lost, none doubled
        assert profile.core_zeromq.task_files() == [], (attempt, point)
        print(f'kill {kills}: {point}; rerun: {rerun.stdout.splitlines()[0]}')
    assert kills == 10

    states = _finish_on_aiida_zmq(profile, pks, tmp_path / 'hold', timeout=300)
    _assert_each_ran_once(states, pks)


def test_a_move_while_another_holds_the_store_says_what_holds_it(core_zeromq_profile_factory) -> None:
    """Two ``configure`` (or ``migrate``) at once (issue 21.6): the second is refused, naming the process that holds
    the store's lock; before, it said "an aiida-zmq broker is running", with none running."""
    profile = core_zeromq_profile_factory('czmq-busy')
    holder = subprocess.Popen(
        [
            sys.executable,
            '-c',
            'import sys\n'
            'from aiida_zmq.security import ensure_private_dir\n'
            'from aiida_zmq.store import broker_lock\n'
            'with broker_lock(ensure_private_dir(sys.argv[1]), blocking=False):\n'
            "    print('held', flush=True)\n"
            '    sys.stdin.read()\n',
            str(profile.store_dir),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == 'held'
        refused = profile.aiida_zmq('migrate', '--from', 'core.zeromq', '--profile', profile.name, check=False)
    finally:
        holder.communicate('', timeout=30)
    assert refused.returncode == 1, refused
    assert 'broker is running' not in refused.stderr, refused.stderr
    assert f'pid {holder.pid}' in refused.stderr and 'another' in refused.stderr, refused.stderr
    assert 'Nothing was moved or changed' in refused.stderr, refused.stderr


def _can_mount() -> bool:
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


@pytest.mark.skipif(not _can_mount(), reason='needs root (or CAP_SYS_ADMIN) to mount a small tmpfs')
def test_a_move_into_a_full_store_says_what_it_moved(core_zeromq_profile_factory, tmp_path: Path) -> None:
    """Issue 20.4: the store's disk fills after the first batch of 500. Before, the CLI said "Nothing was moved or
    changed" with 500 moved; now it says how many moved and how many are still in core.zeromq, and a rerun with room
    moves the rest, none twice."""
    profile = core_zeromq_profile_factory('czmq-full')
    for pid in range(700):
        body = {'task': 'continue', 'args': {'pid': pid, 'nowait': False, 'tag': None}, 'pad': 'x' * 3000}
        profile.core_zeromq.write_pending(f'task-{pid}', body, 1_700_000_000 + pid)
    disk = Path(tempfile.mkdtemp(prefix='azfd-'))
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3m,mode=0700', 'tmpfs', str(disk)], check=True)
    try:
        data_dir = disk / 'data'
        stopped = profile.aiida_zmq(
            'migrate', '--from', 'core.zeromq', '--profile', profile.name, '--data-dir', str(data_dir), check=False
        )
        assert stopped.returncode == 1, stopped
        assert 'Nothing was moved' not in stopped.stderr, stopped.stderr
        moved = int(stopped.stderr.split(' task(s) moved')[0].split()[-1])
        assert 0 < moved < 700, stopped.stderr
        assert f'{700 - moved} still in' in stopped.stderr and 'disk is full' in stopped.stderr, stopped.stderr
        shutil.copytree(data_dir, tmp_path / 'roomy')
    finally:
        subprocess.run(['umount', '-l', str(disk)], check=False)
        shutil.rmtree(disk, ignore_errors=True)
    assert len(profile.core_zeromq.task_files()) == 700 - moved
    profile.aiida_zmq(
        'migrate', '--from', 'core.zeromq', '--profile', profile.name, '--data-dir', str(tmp_path / 'roomy')
    )
    assert profile.core_zeromq.task_files() == []
    task_store = TaskStore(tmp_path / 'roomy' / STORE_FILENAME)
    try:
        rows = task_store.list_tasks(profile.queue, 10_000)
        pids = [
            default_codec().decode(task.payload)['args']['pid'] for task in task_store.load_tasks(r['id'] for r in rows)
        ]
    finally:
        task_store.close()
    assert sorted(pids) == list(range(700))
