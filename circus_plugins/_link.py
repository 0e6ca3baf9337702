"""A plugin's connection to the broker of its data directory, re-established after failures."""

from __future__ import annotations

import logging
import sys
import threading
import typing as t

from aiida_zmq.discovery import choose_endpoint, read_live_broker_info
from aiida_zmq.exceptions import BrokerUnavailable

LOGGER = logging.getLogger('aiida_zmq.circus_plugins')
LOG_FORMAT = '%(levelname)s %(name)s: %(message)s'


class _PluginHandler(logging.StreamHandler):
    """The handler :func:`setup_logging` adds, told apart from others by its class (added once per process)."""


def setup_logging(level: str) -> None:
    """Send this package's log records to stderr, which circus writes into the plugin watcher's FileStream log.

    ``circus.plugins.main`` only configures circus's own logger; the time stamp comes from the FileStream.
    """
    logger = logging.getLogger('aiida_zmq')
    # ``circus.plugins.main`` may have given the root logger a handler already (with its own time stamps): use it.
    if not logging.getLogger().handlers and not any(isinstance(handler, _PluginHandler) for handler in logger.handlers):
        handler = _PluginHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


class BrokerLink:
    """A communicator to the broker of ``data_dir``, connected on first use and dropped after any failure.

    Dropping it (rather than relying on the communicator's own reconnection) makes each call after a failure start
    from the current ``broker.json``: a respawned broker may listen elsewhere and has a new pid.
    """

    def __init__(self, data_dir: str, *, timeout: float, name: str) -> None:
        self.data_dir = data_dir
        self.name = name
        self.timeout = timeout
        self._communicator: t.Any = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    @property
    def broker_pid(self) -> int | None:
        return self._pid

    def admin(self, op: str, **arguments: t.Any) -> dict[str, t.Any]:
        """Send an ADMIN request and return the answer; :class:`BrokerUnavailable` if there is none in time."""
        from aiida_zmq.communicator import connect

        with self._lock:
            if self._communicator is None:
                info = read_live_broker_info(self.data_dir)
                if info is None:
                    raise BrokerUnavailable(
                        f'no live broker in {self.data_dir} (no broker.json or its process is gone)'
                    )
                try:
                    self._communicator = connect(
                        choose_endpoint(info),
                        connect_timeout=self.timeout,
                        request_timeout=self.timeout,
                        heartbeat=max(self.timeout / 2, 0.2),
                        broker_timeout=max(self.timeout * 2, 1.0),
                        # How the broker lists this session (``aiida-zmq status``).
                        name=self.name,
                    )
                except Exception as exception:
                    raise BrokerUnavailable(f'cannot connect to the broker (pid {info.get("pid")}): {exception}')
                self._pid = info.get('pid')
            try:
                return dict(self._communicator.admin(op, timeout=self.timeout, **arguments))
            except Exception as exception:
                self._drop()
                raise BrokerUnavailable(f'`{op}` got no answer within {self.timeout}s: {exception}')

    def _drop(self) -> None:
        communicator, self._communicator = self._communicator, None
        self._pid = None
        if communicator is not None:
            # Closing says goodbye, which a hung broker never reads: do it off the caller's thread.
            threading.Thread(target=communicator.close, name='aiida-zmq-link-close', daemon=True).start()

    def close(self) -> None:
        with self._lock:
            communicator, self._communicator = self._communicator, None
        if communicator is not None:
            communicator.close()
