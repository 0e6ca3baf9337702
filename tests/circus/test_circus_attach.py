"""Attaching the broker watcher to a running arbiter with circus's ``add`` command (real ``circusd``)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from circusd_helpers import Arbiter, start_circusd, stop_circusd, wait_until_up

from aiida_zmq.circus import (
    CircusCallError,
    CircusController,
    WatcherSpec,
    attach_watcher,
    broker_watcher_spec,
    render_ini,
    watcher_name,
)

SLEEPER = [sys.executable, '-c', 'import os, time; print("up", os.environ["AZ_MARK"], flush=True); time.sleep(600)']


def sleeper_spec(arbiter: Arbiter, name: str = 'zmq-broker-test') -> WatcherSpec:
    return WatcherSpec(
        name=name, argv=SLEEPER, log_file=str(arbiter.workdir / f'{name}.log'), env={'AZ_MARK': 'marked'}
    )


def test_add_leaves_other_watchers_alone(arbiter: Arbiter) -> None:
    workers_before = arbiter.pids('workers')
    spec = sleeper_spec(arbiter)

    assert attach_watcher(arbiter.controller, spec) == 'added'

    arbiter.wait_for(lambda: len(arbiter.pids(spec.name)) == 1, what='the added watcher')
    assert arbiter.pids('workers') == workers_before
    log = Path(spec.log_file or '')
    arbiter.wait_for(lambda: log.exists() and 'marked' in log.read_text(), what='the watcher log (env passed)')


def test_attach_is_idempotent(arbiter: Arbiter) -> None:
    spec = sleeper_spec(arbiter)
    assert attach_watcher(arbiter.controller, spec) == 'added'
    arbiter.wait_for(lambda: len(arbiter.pids(spec.name)) == 1, what='the added watcher')
    pid = arbiter.pids(spec.name)

    assert attach_watcher(arbiter.controller, spec) == 'exists'
    assert arbiter.pids(spec.name) == pid


def test_concurrent_attach_adds_once(arbiter: Arbiter) -> None:
    """Every daemon worker attaches the broker when it boots: they race, exactly one adds it."""
    spec = sleeper_spec(arbiter)
    results: list[str] = []
    errors: list[BaseException] = []

    def attach() -> None:
        try:
            results.append(attach_watcher(arbiter.controller, spec, timeout=20))
        except BaseException as exception:
            errors.append(exception)

    threads = [threading.Thread(target=attach) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert not errors
    assert sorted(results) == ['added', 'exists', 'exists', 'exists']
    arbiter.wait_for(lambda: len(arbiter.pids(spec.name)) == 1, what='one broker process')


def test_stopped_watcher_is_started_again(arbiter: Arbiter) -> None:
    spec = sleeper_spec(arbiter)
    attach_watcher(arbiter.controller, spec)
    arbiter.call('stop', name=spec.name, waiting=True)
    assert arbiter.pids(spec.name) == []

    assert attach_watcher(arbiter.controller, spec) == 'started'
    arbiter.wait_for(lambda: len(arbiter.pids(spec.name)) == 1, what='the restarted watcher')


def test_attach_retries_while_arbiter_busy(arbiter: Arbiter) -> None:
    """Stopping ``stubborn`` holds the arbiter's lock for its graceful timeout (1.5 s); ``add`` must wait, not fail."""
    with CircusController(arbiter.controller) as controller:
        controller.call('stop', name='stubborn', waiting=False)
        with pytest.raises(CircusCallError, match='already running'):
            controller.call_message(sleeper_spec(arbiter, 'probe').add_message())

    started = time.monotonic()
    assert attach_watcher(arbiter.controller, sleeper_spec(arbiter), timeout=15) == 'added'
    assert time.monotonic() - started > 0.5


def test_attach_gives_up_at_deadline(arbiter: Arbiter) -> None:
    with CircusController(arbiter.controller) as controller:
        controller.call('stop', name='stubborn', waiting=False)
    started = time.monotonic()
    with pytest.raises(CircusCallError, match='already running'):
        attach_watcher(arbiter.controller, sleeper_spec(arbiter), timeout=0.5)
    assert time.monotonic() - started < 1.9


def test_unreachable_arbiter_fails_fast(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(CircusCallError, match='Timed out'):
        attach_watcher(f'ipc://{tmp_path}/nothing.sock', WatcherSpec('x', ['true']), timeout=5, call_timeout=0.5)
    assert time.monotonic() - started < 3


def test_broker_watcher_spec() -> None:
    spec = broker_watcher_spec(
        'my profile', '/data/dir', log_file='/logs/b.log', binds=['ipc:///tmp/x.sock'], extra_args=['--heartbeat', '2']
    )
    assert spec.name == watcher_name('my profile') == 'zmq-broker-my profile'
    assert spec.argv[-8:-1] == ['serve', '--data-dir', '/data/dir', '--bind', 'ipc:///tmp/x.sock', '--heartbeat', '2']
    assert spec.argv[-1] == '--no-log-time'  # the watcher's FileStream stamps the lines
    options = spec.add_message()['properties']['options']
    assert options['stdout_stream']['filename'] == options['stderr_stream']['filename'] == '/logs/b.log'
    assert options['singleton'] is True


def test_rendered_ini_runs_in_circusd(tmp_path: Path) -> None:
    """``render_ini`` output (templates shipped as package data) is a configuration ``circusd`` accepts and runs."""
    sockets = Path('/tmp') / f'azr-{time.monotonic_ns() % 10**9}'
    sockets.mkdir(mode=0o700)
    spec = WatcherSpec(
        name='zmq-broker-ini', argv=SLEEPER, log_file=str(tmp_path / 'ini.log'), env={'AZ_MARK': 'from-ini'}
    )
    controller = f'ipc://{sockets}/c.sock'
    process = start_circusd(tmp_path, render_ini([spec], controller=controller, pubsub=f'ipc://{sockets}/p.sock'))
    try:
        wait_until_up(controller, process)
        arbiter = Arbiter(process=process, controller=controller, workdir=tmp_path)
        arbiter.wait_for(lambda: len(arbiter.pids(spec.name)) == 1, what='the rendered watcher')
        log = tmp_path / 'ini.log'
        arbiter.wait_for(lambda: log.exists() and 'from-ini' in log.read_text(), what='the rendered log')
    finally:
        stop_circusd(process, controller)
        for path in sockets.iterdir():
            path.unlink()
        sockets.rmdir()
    assert process.returncode is not None
