"""Moving tasks from and to core.zeromq (aiida-core 2.9's ZeroMQ broker), on the files of a real core.zeromq broker.

The tasks are stored by core.zeromq itself: its broker service (``python -m aiida.brokers.zeromq.service``, as
``verdi daemon broker`` runs it) receives them from its own communicator, and hands two to a consumer that never
acknowledges them, so they sit in ``processing/`` when the broker stops, as after ``verdi daemon stop`` with busy
workers. What core.zeromq reads back is checked with its own queue class. Crashes are real: a mover process kills
itself with SIGKILL right after a chosen step (``core_zeromq_mover.py``), and the rerun must move every task exactly
once. The same against a real AiiDA daemon is in ``tests/aiida/test_core_zeromq_switch.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import aiida_zmq
from aiida_zmq import store
from aiida_zmq.codec import default_codec
from aiida_zmq.core_zeromq import CoreZeromqDir, CoreZeromqRunning
from aiida_zmq.core_zeromq_move import export_to_core_zeromq, import_from_core_zeromq
from aiida_zmq.exceptions import BrokerRunning
from aiida_zmq.testing import BrokerProcess, wait_until

QUEUE = 'aiida-test.process.queue'
MOVER = Path(__file__).parent / 'core_zeromq_mover.py'
COUNT = 6
HELD = 2  # of which a consumer holds these when core.zeromq stops: its processing/


def _body(pid: int) -> dict:
    return {'task': 'continue', 'args': {'pid': pid, 'nowait': False, 'tag': None}}


class CoreZeromqService:
    """core.zeromq's own broker service in a subprocess, on a service directory."""

    def __init__(self, service_dir: Path, aiida_path: Path) -> None:
        self.dir = CoreZeromqDir(service_dir)
        env = {**os.environ, 'AIIDA_PATH': str(aiida_path)}
        env.pop('AIIDA_PROFILE', None)
        self.process = subprocess.Popen(
            [sys.executable, '-W', 'ignore', '-m', 'aiida.brokers.zeromq.service', '--service-dir', str(service_dir)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(
            lambda: self.process.poll() is not None or self.dir.broker_pid() == self.process.pid,
            timeout=30,
            what='the core.zeromq broker to write its pid file',
        )
        assert self.process.poll() is None, 'the core.zeromq broker exited'
        # Its status file comes last in its start-up. A SIGTERM before then can be lost: its handler may run before the
        # service marks itself running, which then runs on (a race of core.zeromq 2.9.4, seen here under load).
        wait_until((service_dir / 'broker.status').exists, timeout=30, what='its status file')
        self.endpoint = f'ipc://{(service_dir / "broker.sockets").read_text().strip()}/router.sock'

    def communicator(self, **options):
        from aiida.brokers.zeromq.communicator import ZeromqCommunicator

        communicator = ZeromqCommunicator(router_endpoint=self.endpoint, **options)
        communicator.start()
        return communicator

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


@pytest.fixture(scope='module')
def core_zeromq_snapshot() -> Iterator[Path]:
    """A stopped core.zeromq's service directory: COUNT tasks sent by its own client, HELD of them in processing."""
    base = Path(tempfile.mkdtemp(prefix='czmq-'))
    service = CoreZeromqService(base / 'service', base)
    sender = service.communicator()
    consumer = None
    try:
        for pid in range(COUNT):
            sender.task_send(_body(pid), no_reply=True)  # as AiiDA's submit() sends them
            # One at a time so that the order is unambiguous (file names carry microseconds).
            wait_until(lambda n=pid + 1: len(service.dir.task_files()) == n, timeout=30, what=f'task {pid} stored')
        consumer = service.communicator(task_prefetch_count=HELD)
        consumer.add_task_subscriber(lambda _communicator, _body: concurrent.futures.Future())  # never finishes
        wait_until(
            lambda: [task.state for task in service.dir.task_files()].count('processing') == HELD,
            timeout=30,
            what='the consumer to hold its tasks',
        )
    finally:
        service.stop()  # before the clients: the held tasks stay in processing/, unacknowledged
        sender.close()
        if consumer is not None:
            consumer.close()
    assert service.dir.broker_pid() is None
    yield service.dir.service_dir
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def core_zeromq(core_zeromq_snapshot: Path, tmp_path: Path) -> CoreZeromqDir:
    """A fresh copy of the stopped core.zeromq's directory."""
    shutil.copytree(core_zeromq_snapshot, tmp_path / 'service', symlinks=True)
    return CoreZeromqDir(tmp_path / 'service')


def _stored_pids(data_dir: Path, queue: str = QUEUE) -> list[int]:
    """The pids of the tasks waiting in the store, in its order (ready and held ones)."""
    task_store = store.TaskStore(data_dir / store.STORE_FILENAME)
    try:
        ids = [row['id'] for row in task_store.list_tasks(queue, 10_000) if row['state'] != 'dead']
        return [default_codec().decode(task.payload)['args']['pid'] for task in task_store.load_tasks(ids)]
    finally:
        task_store.close()


def _core_zeromq_pids(directory: CoreZeromqDir) -> list[int]:
    """The pids of the tasks core.zeromq would run, in its order, read with its own queue class."""
    from aiida.brokers.zeromq.queue import PersistentQueue

    queue = PersistentQueue(directory.tasks_dir)  # moves processing/ back to pending/, as its broker does at start
    pids = []
    while (task := queue.pop()) is not None:
        pids.append(task[1]['body']['args']['pid'])
        queue.ack(task[0])
    return pids


def _mover(direction: str, directory: CoreZeromqDir, data_dir: Path, *kill: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(MOVER), direction, str(directory.service_dir), str(data_dir), QUEUE, *kill],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _import(directory: CoreZeromqDir, data_dir: Path, **options):
    return import_from_core_zeromq(directory, data_dir, QUEUE, default_codec().encode, **options)


def test_every_task_moves_once_in_core_zeromqs_order(core_zeromq: CoreZeromqDir, tmp_path: Path) -> None:
    states = [task.state for task in core_zeromq.task_files()]
    assert len(states) == COUNT and states.count('processing') == HELD

    dry = _import(core_zeromq, tmp_path / 'data', dry_run=True)
    assert (dry.moved, dry.pending, dry.processing) == (COUNT, COUNT - HELD, HELD)
    assert len(core_zeromq.task_files()) == COUNT and not (tmp_path / 'data').exists()  # a dry run changes nothing

    report = _import(core_zeromq, tmp_path / 'data')
    assert (report.moved, report.pending, report.processing, report.left) == (COUNT, COUNT - HELD, HELD, [])
    # A move keeps the store's identity record as the broker does (issue 20.5): truncated later, it is refused.
    record = (tmp_path / 'data' / 'tasks.sqlite3.identity').read_text()
    assert record.endswith(f' {COUNT:020d}\n'), record
    assert _stored_pids(tmp_path / 'data') == list(range(COUNT))  # submission order, held ones in their place
    assert core_zeromq.task_files() == [] and not core_zeromq.retired_dir.exists()
    assert _import(core_zeromq, tmp_path / 'data').moved == 0
    assert _stored_pids(tmp_path / 'data') == list(range(COUNT))


def _kill_points(events: tuple[str, ...], count: int) -> list[tuple[str, int]]:
    return [(event, index) for event in events for index in range(1, count + 1)]


@pytest.mark.parametrize('batch', ['2', '500'])
def test_killed_after_any_step_a_rerun_moves_each_task_exactly_once(
    core_zeromq_snapshot: Path, tmp_path: Path, batch: str
) -> None:
    for point, (event, index) in enumerate(_kill_points(('copied', 'retired', 'moved'), COUNT)):
        directory = CoreZeromqDir(tmp_path / f'service-{point}')
        shutil.copytree(core_zeromq_snapshot, directory.service_dir, symlinks=True)
        data_dir = tmp_path / f'data-{point}'
        killed = _mover('in', directory, data_dir, event, str(index), batch)
        assert killed.returncode == -signal.SIGKILL, (event, index, killed.stdout, killed.stderr)
        report = _import(directory, data_dir)
        assert report.withdrawn == 0 and report.left == [], (event, index, report)
        assert _stored_pids(data_dir) == list(range(COUNT)), (event, index)
        assert directory.task_files() == [] and directory.retired_files() == {}, (event, index)


def test_a_task_core_zeromq_ran_after_an_interrupted_move_is_not_kept_twice(
    core_zeromq: CoreZeromqDir, tmp_path: Path
) -> None:
    """Killed after the copies were committed, before any file was retired; then core.zeromq's broker ran (the user
    started the old daemon instead of rerunning) and one task ran there. The rerun withdraws that copy, moves the
    rest."""
    from aiida.brokers.zeromq.queue import PersistentQueue

    data_dir = tmp_path / 'data'
    assert _mover('in', core_zeromq, data_dir, 'copied', '1').returncode == -signal.SIGKILL
    assert len(_stored_pids(data_dir)) == COUNT and len(core_zeromq.task_files()) == COUNT

    queue = PersistentQueue(core_zeromq.tasks_dir)  # what core.zeromq's broker does when it starts and serves one
    task_id, task = queue.pop()
    queue.ack(task_id)
    ran_there = task['body']['args']['pid']

    report = _import(core_zeromq, data_dir)
    assert (report.withdrawn, report.finished, report.moved) == (1, COUNT - 1, 0), report
    assert _stored_pids(data_dir) == [pid for pid in range(COUNT) if pid != ran_there]
    assert core_zeromq.task_files() == []


def test_refused_while_core_zeromqs_broker_runs(core_zeromq: CoreZeromqDir, tmp_path: Path) -> None:
    service = CoreZeromqService(core_zeromq.service_dir, tmp_path)
    try:
        with pytest.raises(CoreZeromqRunning, match=rf'running \(pid {service.process.pid}.*daemon stop.*kill'):
            _import(core_zeromq, tmp_path / 'data')
        assert _import(core_zeromq, tmp_path / 'data', dry_run=True).moved == COUNT  # a dry run looks all the same
        assert not (tmp_path / 'data').exists()
    finally:
        service.stop()
    assert len(core_zeromq.task_files()) == COUNT  # its own restart moved processing/ back to pending/: all still there


def test_a_stale_pid_file_does_not_block_the_move(core_zeromq: CoreZeromqDir, tmp_path: Path) -> None:
    """A broker killed with -9 leaves ``broker.pid``; its pid may belong to a newer process by now."""
    newer = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        core_zeromq.pid_file.write_text(f'aiida-zeromq-broker {newer.pid}')
        old = time.time() - 3600
        os.utime(core_zeromq.pid_file, (old, old))
        assert core_zeromq.broker_pid() is None
        assert _import(core_zeromq, tmp_path / 'data').moved == COUNT
    finally:
        newer.kill()
        newer.wait()


def test_a_pid_file_older_than_its_live_broker_still_refuses(core_zeromq: CoreZeromqDir, tmp_path: Path) -> None:
    """Issue 21.6: ``broker.pid`` two hours older than its process, as a forward clock step leaves it. Before, the
    live broker was taken for gone (its process younger than the file) and every task was moved from under it: stored
    twice. Liveness is decided from the process (its command line is core.zeromq's broker), not from file times."""
    service = CoreZeromqService(core_zeromq.service_dir, tmp_path)
    try:
        old = time.time() - 7200
        os.utime(core_zeromq.pid_file, (old, old))
        assert core_zeromq.broker_pid() == service.process.pid
        with pytest.raises(CoreZeromqRunning, match=rf'running \(pid {service.process.pid}'):
            _import(core_zeromq, tmp_path / 'data')
        assert not (tmp_path / 'data').exists()  # refused before anything was made
    finally:
        service.stop()
    assert len(core_zeromq.task_files()) == COUNT


def test_refused_while_an_aiida_zmq_broker_holds_the_store(core_zeromq: CoreZeromqDir, zmq_broker) -> None:
    with pytest.raises(BrokerRunning):
        _import(core_zeromq, zmq_broker.data_dir)
    assert len(core_zeromq.task_files()) == COUNT


def test_unreadable_and_foreign_files_stay_where_they_are(core_zeromq: CoreZeromqDir, tmp_path: Path) -> None:
    broken = core_zeromq.pending_dir / f'{int(time.time() * 1e6)}_broken.json'
    broken.write_text('{"id": "broken", "bo')
    unfinished = core_zeromq.pending_dir / '1_half.tmp'  # core.zeromq's own write that its broker never renamed
    unfinished.write_text('{"id": "half"')
    report = _import(core_zeromq, tmp_path / 'data')
    assert report.moved == COUNT
    assert any(str(broken) in line and 'unreadable' in line for line in report.left), report.left
    assert any(str(unfinished) in line and 'never finished' in line for line in report.left), report.left
    assert broken.exists() and unfinished.exists()


# --- back to core.zeromq -------------------------------------------------------------------------------------------


def _fill_store(data_dir: Path, pids: range, queue: str = QUEUE) -> None:
    for pid in pids:
        store.submit_offline(data_dir, queue, default_codec().encode(_body(pid)))


def _export(data_dir: Path, directory: CoreZeromqDir, **options):
    return export_to_core_zeromq(data_dir, directory, QUEUE, default_codec().decode, **options)


def test_back_to_core_zeromq_in_order_with_the_rest_left(tmp_path: Path) -> None:
    data_dir, directory = tmp_path / 'data', CoreZeromqDir(tmp_path / 'service')
    _fill_store(data_dir, range(4))
    _fill_store(data_dir, range(100, 102), queue='other.queue')
    store.submit_offline(data_dir, QUEUE, default_codec().encode({'not json': {1, 2}}))  # a set: YAML, not JSON

    dry = _export(data_dir, directory, dry_run=True)
    assert dry.moved == 5 and directory.task_files() == []
    report = _export(data_dir, directory)
    assert report.moved == 4, report
    assert any('other.queue (2)' in line for line in report.left), report.left
    assert any('cannot be written for core.zeromq' in line for line in report.left), report.left
    assert _core_zeromq_pids(directory) == [0, 1, 2, 3]
    assert len(_stored_pids(data_dir, 'other.queue')) == 2  # left as they were
    assert _export(data_dir, directory).moved == 0  # only the task core.zeromq cannot carry stays


def test_back_to_core_zeromq_killed_after_any_step(tmp_path: Path) -> None:
    for point, (event, index) in enumerate(_kill_points(('written', 'moved'), 4)):
        data_dir, directory = tmp_path / f'data-{point}', CoreZeromqDir(tmp_path / f'service-{point}')
        _fill_store(data_dir, range(4))
        killed = _mover('out', directory, data_dir, event, str(index), '2')
        assert killed.returncode == -signal.SIGKILL, (event, index, killed.stdout, killed.stderr)
        report = _export(data_dir, directory)
        assert report.withdrawn == 0, (event, index, report)
        assert _stored_pids(data_dir) == [], (event, index)
        assert _core_zeromq_pids(directory) == [0, 1, 2, 3], (event, index)


def test_an_interrupted_move_back_then_run_here_is_not_written_twice(tmp_path: Path) -> None:
    """Killed after the first file was written, before its row was deleted; then the daemon was started on aiida-zmq
    (the profile still on it) and ran every task. The rerun deletes the file it wrote: that task ran already."""
    data_dir, directory = Path(tempfile.mkdtemp(prefix='azmq-')) / 'data', CoreZeromqDir(tmp_path / 'service')
    _fill_store(data_dir, range(3))
    assert _mover('out', directory, data_dir, 'written', '1').returncode == -signal.SIGKILL
    assert len(directory.task_files()) == 1

    broker = BrokerProcess(data_dir).start()
    ran, done = [], threading.Event()
    try:
        worker = aiida_zmq.connect(broker.endpoint, task_queue=QUEUE)

        def run(_communicator, body):
            ran.append(body['args']['pid'])
            if len(ran) == 3:
                done.set()
            return True

        worker.add_task_subscriber(run)
        assert done.wait(30), ran
        # The answers go out after the subscriber returns: wait until the broker has all three before closing, or a
        # task whose answer was still on its way goes back to the queue (seen once on two busy cores: moved=2).
        wait_until(lambda: worker.admin('status')['stats'].get('tasks_acked') == 3, 10, what='the three answers')
        worker.close()
    finally:
        broker.stop()

    report = _export(data_dir, directory)
    assert (report.withdrawn, report.moved) == (1, 0), report
    assert directory.task_files() == [] and sorted(ran) == [0, 1, 2]
    shutil.rmtree(data_dir.parent, ignore_errors=True)


def test_moved_back_then_forth_again(core_zeromq: CoreZeromqDir, tmp_path: Path) -> None:
    """The ids written for core.zeromq are new ones: moving forth again is not mistaken for a task moved before."""
    data_dir = tmp_path / 'data'
    assert _import(core_zeromq, data_dir).moved == COUNT
    assert _export(data_dir, core_zeromq).moved == COUNT
    assert [json.loads(task.path.read_text())['body']['args']['pid'] for task in core_zeromq.task_files()] == list(
        range(COUNT)
    )
    assert _import(core_zeromq, data_dir).moved == COUNT
    assert _stored_pids(data_dir) == list(range(COUNT))


# --- Ctrl-C: an exception inside a batch must not commit half of it --------------------------------------------------


def _interrupt_on_call(monkeypatch: pytest.MonkeyPatch, number: int) -> None:
    """Ctrl-C while the ``number``-th journal entry is written: between a task's row and its entry."""
    from aiida_zmq.core_zeromq_move import MoveJournal

    original, calls = MoveJournal.record, []

    def record(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == number:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MoveJournal, 'record', record)


def test_ctrl_c_between_a_copy_and_its_journal_entry(
    core_zeromq: CoreZeromqDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _interrupt_on_call(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _import(core_zeromq, tmp_path / 'data')
    monkeypatch.undo()
    _import(core_zeromq, tmp_path / 'data')
    assert _stored_pids(tmp_path / 'data') == list(range(COUNT))


def test_ctrl_c_between_forgetting_a_row_and_its_journal_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, directory = tmp_path / 'data', CoreZeromqDir(tmp_path / 'service')
    _fill_store(data_dir, range(3))
    _interrupt_on_call(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _export(data_dir, directory)
    monkeypatch.undo()
    _export(data_dir, directory)
    assert _stored_pids(data_dir) == [] and _core_zeromq_pids(directory) == [0, 1, 2]


def test_files_written_from_another_store_are_left_alone(tmp_path: Path) -> None:
    """Two stores moved into one core.zeromq (a profile that changed its data directory): the second move's rerun
    must not take the first one's files for its own duplicates."""
    directory = CoreZeromqDir(tmp_path / 'service')
    first, second = tmp_path / 'first', tmp_path / 'second'
    _fill_store(first, range(2))
    assert _export(first, directory).moved == 2
    _fill_store(second, range(10, 13))
    assert _mover('out', directory, second, 'written', '1').returncode == -signal.SIGKILL
    report = _export(second, directory)
    assert (report.withdrawn, report.finished, report.moved) == (0, 1, 2), report
    assert sorted(_core_zeromq_pids(directory)) == [0, 1, 10, 11, 12]


@pytest.mark.parametrize(
    ('profile', 'advice'), [('my-profile', 'verdi -p my-profile daemon stop'), (None, 'verdi daemon stop')]
)
def test_refusal_names_the_profile(tmp_path: Path, profile: str | None, advice: str) -> None:
    """The advice names the profile itself: it used to say `verdi -p PROFILE daemon stop` for the CLI to fill in."""
    directory = CoreZeromqDir(tmp_path / 'service', profile=profile)
    directory.service_dir.mkdir()
    # A live process whose command line is the daemon's broker watcher's (`verdi -p NAME daemon broker`).
    verdi = tmp_path / 'verdi'
    verdi.write_text(f'#!{sys.executable}\nimport time\ntime.sleep(60)\n')
    verdi.chmod(0o700)
    broker = subprocess.Popen([str(verdi), '-p', profile or 'default', 'daemon', 'broker'])
    try:
        directory.pid_file.write_text(f'aiida-zeromq-broker {broker.pid}')
        wait_until(lambda: directory.broker_pid() == broker.pid, 10, what='the process to show its command line')
        with pytest.raises(CoreZeromqRunning) as refused:
            directory.refuse_if_running()
    finally:
        broker.kill()
        broker.wait()
    assert f'(`{advice}`)' in str(refused.value) and 'PROFILE' not in str(refused.value), refused.value
