"""The broker's health plugin: a real round trip every few seconds, and a kill through the arbiter when it fails.

A PID says nothing about a broker that is SIGSTOPped, deadlocked or stuck in I/O. This plugin asks the broker for its
``status`` (an ADMIN request through a communicator, answered by the broker's poll loop) and, after ``max_failures``
unanswered checks in a row, has the arbiter kill the broker process; circus respawns it and the new broker delivers
every stored task again. Each verdict goes to the plugin's log and into ``DATA_DIR/health.json``, which the broker
watcher's ``extended_stats`` hook shows in ``circusctl stats --extended``.

The checks run on circus's own plugin loop (``self.loop``, a ``PeriodicCallback``, as circus's ``watchdog`` and
``statsd`` plugins do) and ask the arbiter through the plugin's own controller connection (``self.client``), with a
bound on each answer: circus's ``CircusPlugin.call`` would wait forever for an arbiter that does not answer.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
import typing as t
import uuid
from pathlib import Path

from circus.client import make_message
from circus.plugins import CircusPlugin
from tornado.ioloop import PeriodicCallback

from aiida_zmq.exceptions import BrokerUnavailable, CircusCallError

from ._link import BrokerLink, setup_logging

LOGGER = logging.getLogger('aiida_zmq.circus_plugins.health')

HEALTH_FILENAME = 'health.json'
# Seconds the arbiter has to answer one command of a check.
CALL_TIMEOUT = 5.0


def read_health(data_dir: str | os.PathLike[str]) -> dict[str, t.Any] | None:
    """Return the last verdict the health plugin wrote for ``data_dir``, or ``None``."""
    try:
        value = json.loads((Path(data_dir) / HEALTH_FILENAME).read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class BrokerHealthPlugin(CircusPlugin):
    """Check the broker by a round trip; kill (circus respawns) or restart a broker that does not answer.

    Plugin options (strings): ``data_dir`` and ``broker_watcher`` (required), ``interval`` (s between checks, 5),
    ``timeout`` (s to answer, 2), ``max_failures`` (in a row before acting, 3), ``start_grace`` (s after the broker
    process started during which failures are not counted, until it first answers, 30), ``action`` (``kill`` or
    ``restart``), ``log_level``.
    """

    name = 'aiida-zmq-health'

    def __init__(
        self, endpoint: str, pubsub_endpoint: str, check_delay: float, ssh_server: t.Any = None, **config: t.Any
    ):
        super().__init__(endpoint, pubsub_endpoint, check_delay, ssh_server=ssh_server, **config)
        missing = [key for key in ('data_dir', 'broker_watcher') if not config.get(key)]
        if missing:
            raise ValueError(f'the aiida-zmq health plugin needs {", ".join(missing)} in its config')
        self.data_dir = str(config['data_dir'])
        self.broker_watcher = str(config['broker_watcher'])
        self.interval = float(config.get('interval', 5.0))
        self.timeout = float(config.get('timeout', 2.0))
        self.max_failures = int(config.get('max_failures', 3))
        self.start_grace = float(config.get('start_grace', 30.0))
        self.action = str(config.get('action', 'kill'))
        if self.action not in ('kill', 'restart'):
            raise ValueError(f'unknown health action {self.action!r}: use `kill` or `restart`')
        setup_logging(str(config.get('log_level', 'INFO')))
        self.link = BrokerLink(self.data_dir, timeout=self.timeout, name=f'{self.name}-plugin:{os.getpid()}')
        self.state: dict[str, t.Any] = {
            'checks': 0,
            'failures_in_a_row': 0,
            'failed_checks': 0,
            'actions': 0,
            'last_action': None,
            'last_action_at': None,
        }
        self.period: PeriodicCallback | None = None
        # The broker process that answered a check: it has started, and gets no start grace any more.
        self.answered_pid: int | None = None

    # circus.plugins.CircusPlugin ----------------------------------------------------------------------------------

    def handle_init(self) -> None:
        LOGGER.info(
            'checking the broker of %s every %ss (timeout %ss, action `%s` after %d failures in a row)',
            self.data_dir,
            self.interval,
            self.timeout,
            self.action,
            self.max_failures,
        )
        # Called before the loop runs and before ``initialize`` connects ``self.client``: the first check waits for
        # the loop (``add_callback``), the next ones come every ``interval``.
        self.period = PeriodicCallback(self._check, self.interval * 1000)
        self.period.start()
        self.loop.add_callback(self._check)

    def handle_recv(self, data: list[bytes]) -> None:
        # Events are not needed: the checks are timed by the loop.
        pass

    def handle_stop(self) -> None:
        if self.period is not None:
            self.period.stop()
        self.link.close()

    # the checks ---------------------------------------------------------------------------------------------------

    def _check(self) -> None:
        try:
            self.check_once()
        except Exception:
            LOGGER.exception('health check crashed; trying again in %ss', self.interval)

    def _call(self, command: str, **properties: t.Any) -> dict[str, t.Any]:
        """``CircusPlugin.call`` with a bound of CALL_TIMEOUT on the answer; :class:`CircusCallError` on none, or on
        an error answer. An answer that comes after its bound is recognised by its ``id`` and dropped later."""
        message = {**make_message(command, **properties), 'id': uuid.uuid4().hex}
        self.client.send(json.dumps(message).encode())
        deadline = time.monotonic() + CALL_TIMEOUT
        while (left := deadline - time.monotonic()) > 0 and self.client.poll(left * 1000):
            answer = json.loads(self.client.recv())
            if answer.get('id') != message['id']:
                continue
            if answer.get('status') != 'ok':
                raise CircusCallError(f'{command}: {answer.get("reason", answer)}')
            return dict(answer)
        raise CircusCallError(f'{command}: the arbiter did not answer within {CALL_TIMEOUT}s')

    def _broker_process(self) -> tuple[str | None, int | None]:
        """Return the broker watcher's status and its pid (``None`` when it has no process)."""
        status = self._call('status').get('statuses', {}).get(self.broker_watcher.lower())
        pids = self._call('list', name=self.broker_watcher).get('pids', []) if status is not None else []
        return (str(status) if status is not None else None), (int(pids[0]) if pids else None)

    def check_once(self) -> dict[str, t.Any]:
        """Run one check (and the action it calls for); return the verdict also written to ``health.json``."""
        now = time.time()
        self.state['checks'] += 1
        try:
            status, pid = self._broker_process()
        except CircusCallError as exception:
            # The arbiter is busy (e.g. starting workers) or going away: no verdict on the broker this time.
            LOGGER.debug('arbiter did not answer: %s', exception)
            return self._record(now, 'unknown', f'arbiter: {exception}', None, None)
        if status != 'active' or pid is None:
            # Stopped by `verdi daemon stop`/`circusctl stop`, or between a death and its respawn: circus's business.
            self.state['failures_in_a_row'] = 0
            return self._record(now, 'not-running', f'watcher {status}', pid, None)

        started = time.monotonic()
        try:
            answer = self.link.admin('status')
        except BrokerUnavailable as exception:
            return self._failed(now, pid, str(exception))
        latency = time.monotonic() - started
        if self.state['failures_in_a_row']:
            LOGGER.warning('broker pid %s answers again after %d failed check(s)', pid, self.state['failures_in_a_row'])
        self.state['failures_in_a_row'] = 0
        self.answered_pid = pid
        LOGGER.debug('broker pid %s answered status in %.1f ms', answer.get('pid'), latency * 1000)
        return self._record(now, 'ok', None, pid, latency)

    def _age(self, pid: int) -> float:
        try:
            import psutil

            return time.time() - psutil.Process(pid).create_time()
        except Exception:
            return 0.0

    def _failed(self, now: float, pid: int, reason: str) -> dict[str, t.Any]:
        age = self._age(pid)
        if age < self.start_grace and pid != self.answered_pid:
            LOGGER.info('broker pid %d (started %.1fs ago) does not answer yet: %s', pid, age, reason)
            return self._record(now, 'starting', reason, pid, None)
        self.state['failures_in_a_row'] += 1
        self.state['failed_checks'] += 1
        count = self.state['failures_in_a_row']
        LOGGER.warning('broker pid %d failed its check (%d/%d in a row): %s', pid, count, self.max_failures, reason)
        if count < self.max_failures:
            return self._record(now, 'failing', reason, pid, None)
        self._act(pid)
        self.state['failures_in_a_row'] = 0
        return self._record(now, 'recovering', reason, pid, None)

    def _act(self, pid: int) -> None:
        try:
            if self.action == 'kill':
                # SIGKILL ends even a SIGSTOPped or deadlocked process; the store survives kill -9 by design, and
                # circus respawns the watcher's process.
                self._call('signal', name=self.broker_watcher, pid=pid, signum=int(signal.SIGKILL))
            else:
                # A stopped process cannot act on SIGTERM: wake it first, so that a broker that is merely frozen
                # shuts down cleanly (commit, close, remove broker.json); a deadlocked one still gets SIGKILL from
                # circus after the watcher's graceful timeout.
                self._call('signal', name=self.broker_watcher, pid=pid, signum=int(signal.SIGCONT))
                self._call('restart', name=self.broker_watcher, waiting=False)
        except CircusCallError as exception:
            LOGGER.error('could not %s the hung broker pid %d through the arbiter: %s', self.action, pid, exception)
            return
        self.state['actions'] += 1
        self.state['last_action'] = f'{self.action} pid {pid}'
        self.state['last_action_at'] = time.time()
        LOGGER.error(
            'broker pid %d did not answer %d checks in a row: asked the arbiter to %s it (action %d)',
            pid,
            self.max_failures,
            self.action,
            self.state['actions'],
        )

    def _record(
        self, now: float, verdict: str, reason: str | None, pid: int | None, latency: float | None
    ) -> dict[str, t.Any]:
        record = {
            **self.state,
            'verdict': verdict,
            'reason': reason,
            'broker_pid': pid,
            'latency_ms': round(latency * 1000, 3) if latency is not None else None,
            'checked_at': now,
            'plugin_pid': os.getpid(),
        }
        path = Path(self.data_dir) / HEALTH_FILENAME
        try:
            # Atomic replace: the extended_stats hook reads it from the arbiter at any moment.
            handle, temporary = tempfile.mkstemp(prefix='.health-', dir=self.data_dir)
            with os.fdopen(handle, 'w', encoding='utf-8') as stream:
                json.dump(record, stream)
            os.replace(temporary, path)
        except OSError as exception:
            LOGGER.debug('cannot write %s: %s', path, exception)
        return record
