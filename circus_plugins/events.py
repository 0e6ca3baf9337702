"""The broker's circus plugin: the arbiter's process events turned into immediate task requeues.

A daemon worker killed by the OOM killer, ``kill -9`` or ``verdi daemon decr`` holds tasks. Without help the broker
hands them to other workers only after the worker's heartbeats stop for the peer timeout. circus knows sooner: it
publishes ``watcher.<name>.reap`` with the pid of every process it reaps. This plugin forwards that pid to the broker
(ADMIN ``peer-gone``), which drops that process's sessions and requeues their tasks at once.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import typing as t

from circus.plugins import CircusPlugin

from aiida_zmq.circus import parse_watcher_name, sibling_watchers
from aiida_zmq.exceptions import BrokerUnavailable

from ._link import BrokerLink, setup_logging

LOGGER = logging.getLogger('aiida_zmq.circus_plugins.events')

# Watchers whose processes never are broker clients holding tasks: circus's own and aiida-zmq's.
_ALWAYS_IGNORED = re.compile(r'^(plugin:|circusd-stats$|circushttpd$)')


def parse_topic(topic: bytes | str) -> tuple[str, str] | None:
    """Return ``(watcher, event)`` of a circus topic ``watcher.<name>.<event>``; names may contain dots."""
    text = topic.decode() if isinstance(topic, bytes) else topic
    if not text.startswith('watcher.'):
        return None
    name, _, event = text[len('watcher.') :].rpartition('.')
    if not name:
        return None
    return name, event


class BrokerEventsPlugin(CircusPlugin):
    """Tell the broker ``peer-gone`` for every process reaped in another watcher of the arbiter.

    Plugin options (strings, circus ``--config``): ``data_dir`` (the broker's, required), ``broker_watcher`` (its
    watcher name: its own reaps and those of its plugins are ignored, as are those of any aiida-zmq watcher, which
    holds no tasks), ``watchers`` (a regular expression the watcher name must match, default all), ``timeout``
    (seconds per request, default 5), ``log_level``.
    """

    name = 'aiida-zmq-events'

    def __init__(
        self, endpoint: str, pubsub_endpoint: str, check_delay: float, ssh_server: t.Any = None, **config: t.Any
    ):
        super().__init__(endpoint, pubsub_endpoint, check_delay, ssh_server=ssh_server, **config)
        if not config.get('data_dir'):
            raise ValueError('the aiida-zmq events plugin needs `data_dir` (the broker data directory) in its config')
        self.broker_watcher = str(config.get('broker_watcher', '')).lower()
        self._own = sibling_watchers(self.broker_watcher) if self.broker_watcher else set()
        self.watchers = re.compile(str(config.get('watchers', '.*')))
        self.link = BrokerLink(
            str(config['data_dir']), timeout=float(config.get('timeout', 5.0)), name=f'{self.name}-plugin:{os.getpid()}'
        )
        setup_logging(str(config.get('log_level', 'INFO')))
        # One thread, so that peer-gone requests go out in the order of the events and never block the event loop.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='aiida-zmq-events')
        self.forwarded = 0

    def handle_init(self) -> None:
        LOGGER.info(
            'listening to %s for reaped processes (broker watcher %s)', self.pubsub_endpoint, self.broker_watcher
        )
        # Connect now, not at the first reap: that one should cost a round trip, not the import of the communicator
        # and a handshake (seconds on a busy machine, against the peer timeout's 10 s).
        self._executor.submit(self._warm_up)

    def _warm_up(self) -> None:
        try:
            self.link.admin('status')
        except BrokerUnavailable as exception:  # the broker starts with its plugins: the first reap connects then
            LOGGER.debug('not connected to the broker yet: %s', exception)

    def concerns(self, watcher: str) -> bool:
        """Whether a reap in ``watcher`` may concern the broker's clients."""
        lowered = watcher.lower()
        if _ALWAYS_IGNORED.match(lowered) or not self.watchers.search(watcher):
            return False
        return lowered not in self._own and parse_watcher_name(watcher) is None

    def handle_recv(self, data: list[bytes]) -> None:
        topic, raw = data[0], data[1]
        parsed = parse_topic(topic)
        if parsed is None or parsed[1] != 'reap' or not self.concerns(parsed[0]):
            return
        try:
            pid = int(json.loads(raw)['process_pid'])
        except (ValueError, KeyError, TypeError) as exception:
            LOGGER.warning('ignoring a malformed reap event %r: %s', raw, exception)
            return
        self._executor.submit(self._forward, parsed[0], pid)

    def _forward(self, watcher: str, pid: int) -> None:
        try:
            answer = self.link.admin('peer-gone', pid=pid)
        except BrokerUnavailable as exception:
            # Nothing is lost: the broker's heartbeat timeout still catches this process's sessions.
            LOGGER.warning('process %d of %s was reaped but the broker was not told: %s', pid, watcher, exception)
            return
        self.forwarded += 1
        LOGGER.info(
            'process %d of %s reaped: the broker dropped %s session(s) and requeued %s task(s)',
            pid,
            watcher,
            answer.get('clients'),
            answer.get('requeued'),
        )

    def handle_stop(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
        self.link.close()
