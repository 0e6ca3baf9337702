"""The broker's circus plugins against a real ``circusd`` (the ``zmq_arbiter`` fixtures of ``aiida_zmq.testing``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from aiida_zmq.circus_plugins.events import parse_topic
from aiida_zmq.circus_plugins.health import read_health

from aiida_zmq.circus import ROLES, HealthOptions, WatcherSpec, attach_broker, attach_watcher, watcher_name
from aiida_zmq.testing import ArbiterProcess, wait_until

HOLDER = str(Path(__file__).with_name('holder.py'))


class Received:
    """Tasks a test consumer got, with the time each arrived."""

    def __init__(self) -> None:
        self.tasks: list[object] = []
        self.times: list[float] = []
        self.changed = threading.Condition()

    def __call__(self, _communicator: object, task: object) -> object:
        with self.changed:
            self.tasks.append(task)
            self.times.append(time.monotonic())
            self.changed.notify_all()
        return f'done {task}'

    def wait_for(self, count: int, timeout: float) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.tasks) >= count, timeout):
                raise AssertionError(f'got {len(self.tasks)} of {count} tasks within {timeout}s: {self.tasks}')


def status_answers(communicator: object) -> bool:
    try:
        communicator.admin('status', timeout=1.0)  # type: ignore[attr-defined]
    except Exception:
        return False
    return True


def test_parse_topic() -> None:
    assert parse_topic(b'watcher.aiida-workers.reap') == ('aiida-workers', 'reap')
    assert parse_topic('watcher.my.profile.reap') == ('my.profile', 'reap')
    assert parse_topic(b'stat.x.1') is None


def test_reaped_worker_tasks_requeued_at_once(zmq_arbiter_factory) -> None:
    """A worker holding a task is killed: the task reaches another consumer long before the peer timeout (60 s)."""
    arbiter: ArbiterProcess = zmq_arbiter_factory(broker_args=('--heartbeat', '0.2', '--peer-timeout', '60'))
    holder = WatcherSpec(
        name='workers',
        argv=[sys.executable, HOLDER, arbiter.broker_endpoint],
        log_file=str(arbiter.log_dir / 'workers.log'),
    )
    attach_watcher(arbiter.controller, holder)
    wait_until(lambda: 'ready' in arbiter.log('workers'), 20, what='the holding worker to subscribe')
    worker_pid = arbiter.pids('workers')[0]

    producer = arbiter.connect()
    consumer = arbiter.connect()
    try:
        producer.task_send('task-held', no_reply=True)
        wait_until(lambda: 'holding task-held' in arbiter.log('workers'), 10, what='the worker to take the task')
        received = Received()
        consumer.add_task_subscriber(received)

        killed = time.monotonic()
        os.kill(worker_pid, signal.SIGKILL)
        received.wait_for(1, timeout=15)
        requeue_seconds = received.times[0] - killed
    finally:
        producer.close()
        consumer.close()

    assert received.tasks == ['task-held']
    # The peer timeout is 60 s: only the arbiter's reap event can explain a redelivery within seconds.
    assert requeue_seconds < 10, requeue_seconds
    events = watcher_name(arbiter.profile, 'events')
    events_log = wait_until(lambda: 'requeued' in (log := arbiter.log(events)) and log, 5, what='the events log')
    assert (
        f'process {worker_pid} of workers reaped: the broker dropped 1 session(s) and requeued 1 task(s)' in events_log
    )
    print(f'\nrequeue after a reaped worker: {requeue_seconds * 1000:.0f} ms (peer timeout 60 s)')


def test_sigstopped_broker_killed_by_health_plugin_and_clients_carry_on(zmq_arbiter: ArbiterProcess) -> None:
    arbiter = zmq_arbiter
    client = arbiter.connect()
    try:
        for index in range(5):
            client.task_send(f'stored-{index}', no_reply=True)
        frozen_pid = arbiter.broker_pid()
        assert frozen_pid is not None

        frozen = time.monotonic()
        os.kill(frozen_pid, signal.SIGSTOP)
        arbiter.wait_for_broker(30, not_pid=frozen_pid)
        respawned = time.monotonic()
        wait_until(lambda: status_answers(client), 30, interval=0.05, what='the client to reach the new broker')
        answering = time.monotonic()

        received = Received()
        client.add_task_subscriber(received)
        future = client.task_send('after-recovery')
        assert future.result(timeout=20) == 'done after-recovery'
        received.wait_for(6, timeout=20)
    finally:
        client.close()

    assert sorted(map(str, received.tasks)) == ['after-recovery', *(f'stored-{index}' for index in range(5))]
    health_log = arbiter.log(watcher_name(arbiter.profile, 'health'))
    assert f'broker pid {frozen_pid} failed its check (1/2 in a row)' in health_log
    assert 'asked the arbiter to kill it' in health_log
    health = wait_until(
        lambda: (read_health(arbiter.data_dir) or {}).get('verdict') == 'ok' and read_health(arbiter.data_dir), 10
    )
    assert health['actions'] == 1 and health['last_action'] == f'kill pid {frozen_pid}'
    # ``circusctl stats --extended <broker>`` shows the verdict (the broker watcher's extended_stats hook).
    stats = arbiter.call('stats', name=arbiter.broker_watcher, extended=True)['info']
    (process_stats,) = stats.values()
    assert process_stats['health']['actions'] == 1
    assert '[health: ok' in process_stats['cmdline']
    # What an operator sees: ``circusctl stats --extended <broker>`` prints the verdict in the process line.
    circusctl = subprocess.run(
        [
            str(Path(sys.executable).parent / 'circusctl'),
            '--endpoint',
            arbiter.controller,
            'stats',
            '--extended',
            arbiter.broker_watcher,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert circusctl.returncode == 0, circusctl.stderr
    assert '1 action(s), last: kill pid' in circusctl.stdout
    print(
        f'\nSIGSTOP recovery: new broker up after {respawned - frozen:.2f} s, '
        f'existing client answered after {answering - frozen:.2f} s '
        f'(checks every {arbiter.health.interval} s, timeout {arbiter.health.timeout} s, '
        f'{arbiter.health.max_failures} failures)'
    )


def test_sigkilled_broker_respawned_with_stored_tasks(zmq_arbiter: ArbiterProcess) -> None:
    arbiter = zmq_arbiter
    client = arbiter.connect()
    try:
        for index in range(20):
            client.task_send(f'stored-{index}', no_reply=True)
        pid = arbiter.broker_pid()
        assert pid is not None

        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        arbiter.wait_for_broker(30, not_pid=pid)
        respawned = time.monotonic()
        wait_until(lambda: status_answers(client), 30, interval=0.05, what='the client to reach the new broker')
        answering = time.monotonic()

        received = Received()
        client.add_task_subscriber(received)
        received.wait_for(20, timeout=20)
        delivered = time.monotonic()
    finally:
        client.close()

    assert sorted(received.tasks) == sorted(f'stored-{index}' for index in range(20))
    # circus, not the health plugin, brought it back.
    assert (read_health(arbiter.data_dir) or {}).get('actions', 0) == 0
    print(
        f'\nSIGKILL recovery: respawned after {respawned - killed:.2f} s, client answered after '
        f'{answering - killed:.2f} s, 20 stored tasks delivered after {delivered - killed:.2f} s'
    )


def test_health_plugin_leaves_a_stopped_broker_alone(zmq_arbiter_factory) -> None:
    """``circusctl stop`` of the broker is an operator's decision: no verdict of "hung", no action."""
    arbiter: ArbiterProcess = zmq_arbiter_factory(
        health=HealthOptions(interval=0.2, timeout=0.5, max_failures=1, start_grace=1)
    )
    wait_until(lambda: (read_health(arbiter.data_dir) or {}).get('verdict') == 'ok', 10, what='a first good check')
    arbiter.call('stop', name=arbiter.broker_watcher, waiting=True)
    wait_until(
        lambda: (read_health(arbiter.data_dir) or {}).get('verdict') == 'not-running', 10, what='a not-running verdict'
    )
    health = read_health(arbiter.data_dir) or {}
    assert health['actions'] == 0
    assert arbiter.pids(arbiter.broker_watcher) == []


def test_arbiter_fixture_leaves_nothing_running(zmq_arbiter_factory) -> None:
    arbiter: ArbiterProcess = zmq_arbiter_factory(via='add')
    statuses = arbiter.call('status')['statuses']
    assert statuses == {
        arbiter.broker_watcher: 'active',
        watcher_name(arbiter.profile, 'events'): 'active',
        watcher_name(arbiter.profile, 'health'): 'active',
    }
    children = arbiter.all_pids()
    assert len(children) == 3
    arbiter.stop()
    assert not [pid for pid in children if Path(f'/proc/{pid}').exists()]
    assert not (arbiter.data_dir / 'broker.json').exists()
    assert not (arbiter.data_dir / 'broker.sock').exists()


def test_concurrent_attach_broker_adds_each_watcher_once(zmq_arbiter_factory) -> None:
    """Every daemon worker attaches the broker and its plugins when it boots: they race, each watcher comes once."""
    arbiter: ArbiterProcess = zmq_arbiter_factory(via='add')
    other = ArbiterProcess(arbiter.base, profile='second', health=arbiter.health)
    results: list[dict[str, str]] = []
    errors: list[BaseException] = []

    def attach() -> None:
        try:
            results.append(
                attach_broker(
                    arbiter.controller,
                    other.profile,
                    str(arbiter.base / 'second'),
                    str(arbiter.log_dir),
                    binds=[f'ipc://{arbiter.base}/second.sock'],
                    health=other.health,
                    timeout=30,
                )
            )
        except BaseException as exception:
            errors.append(exception)

    (arbiter.base / 'second').mkdir(mode=0o700)
    threads = [threading.Thread(target=attach) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not errors
    for name in (watcher_name('second', role) for role in ROLES):
        assert sorted(result[name] for result in results) == ['added', 'exists', 'exists']
    wait_until(lambda: len(arbiter.pids(watcher_name('second'))) == 1, 20, what='the second broker')
    # The first broker and its plugins were left alone.
    assert arbiter.call('status')['statuses'][arbiter.broker_watcher] == 'active'


def test_health_action_restart_shuts_a_frozen_broker_down_cleanly(zmq_arbiter_factory) -> None:
    """``action=restart``: the frozen broker is woken and restarted through circus; its stored tasks survive."""
    arbiter: ArbiterProcess = zmq_arbiter_factory(
        health=HealthOptions(interval=0.5, timeout=1.0, max_failures=2, start_grace=10.0, action='restart')
    )
    client = arbiter.connect()
    try:
        client.task_send('stored', no_reply=True)
        frozen_pid = arbiter.broker_pid()
        assert frozen_pid is not None
        os.kill(frozen_pid, signal.SIGSTOP)
        arbiter.wait_for_broker(30, not_pid=frozen_pid)
        received = Received()
        client.add_task_subscriber(received)
        received.wait_for(1, timeout=20)
    finally:
        client.close()
    assert received.tasks == ['stored']
    assert 'asked the arbiter to restart it' in arbiter.log(watcher_name(arbiter.profile, 'health'))
    # Woken before SIGTERM, the old broker shut down by itself (its clean-exit line), not by circus's SIGKILL.
    assert f'[{frozen_pid}] | ' in arbiter.log()
    assert any(f'[{frozen_pid}]' in line and 'stopping:' in line for line in arbiter.log().splitlines()), arbiter.log()
