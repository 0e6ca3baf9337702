"""The AiiDA broker plugin (entry point ``zmq`` in ``aiida.brokers``).

It mirrors :class:`aiida.brokers.rabbitmq.broker.RabbitmqBroker`: the same launch queue name, codec and prefetch, so
plumpy and AiiDA see no difference. What differs is how the broker is found and started:

* the broker's data directory is ``<AiiDA config dir>/broker/zmq/<profile uuid>`` unless the profile overrides it;
* a running broker announces itself in ``DIR/broker.json`` (``aiida-zmq serve``); that is the first place looked at;
* if there is none but the profile's daemon is running, the broker watcher ``aiida-zmq-<profile>`` is attached to
  the daemon's circus arbiter (see ``docs/circus.md``), and the caller waits, bounded, for the broker to come up.
  Every daemon worker goes through here when it creates its runner, which is what makes ``verdi daemon start`` bring
  up the broker without any change to aiida-core.
"""

from __future__ import annotations

import functools
import logging
import os
import typing as t
import weakref
from pathlib import Path

from aiida.brokers.broker import Broker, BrokerConfigField, BrokerServiceStatus, JsonValue

from aiida_zmq import discovery

if t.TYPE_CHECKING:
    from collections.abc import Iterator

    from aiida.engine.daemon.client import DaemonClient
    from aiida.manage.configuration.profile import Profile
    from kiwipy import Communicator

__all__ = ('ZmqBroker', 'broker_data_dir', 'launch_queue_name')

LOGGER = logging.getLogger(__name__)

ENTRY_POINT_NAME = 'zmq'
DEFAULT_HEARTBEAT = 1.0
DEFAULT_START_TIMEOUT = 30


def launch_queue_name(profile: Profile) -> str:
    """Return the launch queue of a profile, exactly as ``RabbitmqBroker`` names it (``aiida-<uuid>.process.queue``).

    Keeping the name means ``verdi process repair`` and tools written for RabbitMQ address the same queue here.
    """
    from aiida.brokers.rabbitmq.utils import get_launch_queue_name

    return get_launch_queue_name(f'aiida-{profile.uuid}')


def broker_data_dir(profile: Profile) -> Path:
    """Return the broker's data directory of a profile: the profile's override, else inside the AiiDA config dir."""
    override = (profile.process_control_config or {}).get('data_dir')
    if override:
        return Path(os.path.expanduser(str(override))).absolute()
    from aiida.manage.configuration import get_config

    return Path(get_config().dirpath) / 'broker' / 'zmq' / str(profile.uuid)


class _BrokerResources:
    """What a :class:`ZmqBroker` owns; kept apart so a finalizer can release it without a reference to the broker."""

    def __init__(self) -> None:
        self.communicator: Communicator | None = None

    def release(self) -> None:
        if self.communicator is not None:
            communicator, self.communicator = self.communicator, None
            communicator.close()


def _finalize_broker(resources: _BrokerResources, broker_repr: str) -> None:
    if resources.communicator is not None:
        LOGGER.info('ZmqBroker %s was not closed explicitly.', broker_repr)
        resources.release()


class ZmqBroker(Broker):
    """AiiDA broker backed by ``aiida-zmq``: a broker process per profile, supervised by the daemon's arbiter."""

    _config_fields = (
        BrokerConfigField(
            name='data_dir',
            prompt='Broker data directory',
            help='Directory of the broker (task store, broker.json). Empty: inside the AiiDA configuration directory.',
            default='',
            param_type='string',
        ),
        BrokerConfigField(
            name='heartbeat',
            prompt='Heartbeat interval',
            help='Seconds between heartbeats of the client and the broker.',
            default=DEFAULT_HEARTBEAT,
            param_type='string',
            expose_cli=False,
        ),
        BrokerConfigField(
            name='start_timeout',
            prompt='Broker start timeout',
            help='Seconds a client waits for the broker to come up (e.g. a daemon worker booting before it).',
            default=DEFAULT_START_TIMEOUT,
            param_type='int',
        ),
        BrokerConfigField(
            name='attach_to_daemon',
            prompt='Run the broker in the daemon',
            help='Attach the broker as a watcher to the running daemon of the profile when it is not running.',
            default=True,
            param_type='bool',
            # Only tests and people who run ``aiida-zmq serve`` themselves turn this off.
            expose_cli=False,
        ),
    )

    def __init__(self, profile: Profile) -> None:
        super().__init__(profile)
        self._resources = _BrokerResources()
        self._finalizer = weakref.finalize(self, _finalize_broker, self._resources, repr(self))
        self._data_dir = broker_data_dir(profile)

    # --- configuration -------------------------------------------------------------------------------------------

    def _option(self, name: str) -> t.Any:
        config = self._profile.process_control_config or {}
        value = config.get(name)
        if value is None or value == '':
            return self.get_default_config()[name]
        return value

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def queue_name(self) -> str:
        return launch_queue_name(self._profile)

    @property
    def watcher_name(self) -> str:
        from aiida_zmq.circus import watcher_name

        return watcher_name(self._profile.name)

    def _daemon_client(self) -> DaemonClient:
        from aiida.engine.daemon.client import DaemonClient

        return DaemonClient(self._profile)

    def _running_daemon_client(self) -> DaemonClient | None:
        """Return the profile's daemon client if its arbiter runs, else ``None``.

        Checked through the PID file first: ``DaemonClient.get_controller_endpoint`` creates a fresh socket directory
        (and overwrites the sockets file) when it thinks the daemon is not running, which must never happen here.
        """
        try:
            client = self._daemon_client()
            if client.is_daemon_running and not client._is_pid_file_stale:
                return client
        except Exception as exception:
            LOGGER.debug('cannot determine the daemon status of %s: %s', self._profile.name, exception)
        return None

    # --- the broker process ----------------------------------------------------------------------------------------

    def watcher_spec(self, client: DaemonClient | None = None) -> t.Any:
        """Return the circus watcher that runs this profile's broker (:class:`aiida_zmq.circus.WatcherSpec`)."""
        from aiida_zmq.circus import broker_watcher_spec

        client = client or self._daemon_client()
        log_file = str(Path(client.daemon_log_file).parent / f'{self.watcher_name}.log')
        bind = discovery.default_ipc_bind(self._data_dir, str(self._profile.uuid).replace('-', ''))
        extra_args = ['--heartbeat', str(float(self._option('heartbeat')))]
        return broker_watcher_spec(
            self._profile.name,
            str(self._data_dir),
            log_file=log_file,
            env=client.get_env(),
            binds=[bind] if bind else [],
            extra_args=extra_args,
        )

    def ensure_broker(self, client: DaemonClient | None = None) -> str:
        """Attach the broker watcher to the profile's running daemon; return what ``attach_watcher`` did.

        :raises ConnectionError: when the daemon is not running or its arbiter refuses.
        """
        from aiida_zmq.circus import CircusCallError, attach_watcher

        client = client or self._running_daemon_client()
        if client is None:
            raise ConnectionError(f'the daemon of profile `{self._profile.name}` is not running')
        self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            return attach_watcher(
                client.get_controller_endpoint(),
                self.watcher_spec(client),
                timeout=float(self._option('start_timeout')),
            )
        except CircusCallError as exception:
            raise ConnectionError(f'could not attach the broker to the daemon: {exception}') from exception

    def _watcher_active(self, client: DaemonClient) -> bool:
        from aiida_zmq.circus import CircusCallError, CircusController

        try:
            with CircusController(client.get_controller_endpoint(), timeout=2.0) as controller:
                return controller.watcher_status(self.watcher_name) in ('active', 'starting')
        except CircusCallError:
            # The arbiter is busy or slow: that is no reason to give up waiting, the deadline still bounds it.
            return True

    def find_broker(self, *, wait: bool = True) -> dict[str, t.Any]:
        """Return the ``broker.json`` of the running broker, starting it in the daemon if needed.

        :param wait: whether to attach the broker to a running daemon and wait for it to come up.
        :raises ConnectionError: when no broker runs and none could be brought up in time.
        """
        info = discovery.read_live_broker_info(self._data_dir)
        if info is not None or not wait:
            if info is None:
                raise discovery.BrokerNotFound(f'no broker is running for {self._data_dir}')
            return info

        client = self._running_daemon_client() if self._option('attach_to_daemon') else None
        if client is None:
            raise discovery.BrokerNotFound(
                f'no broker is running for profile `{self._profile.name}` ({self._data_dir}); '
                'start the daemon (`verdi daemon start`), which starts the broker, or run `aiida-zmq serve`'
            )
        action = self.ensure_broker(client)
        LOGGER.info('broker watcher %s: %s; waiting for the broker to come up', self.watcher_name, action)
        return discovery.wait_for_broker_info(
            self._data_dir,
            float(self._option('start_timeout')),
            still_starting=lambda: self._watcher_active(client),
        )

    # --- Broker interface ------------------------------------------------------------------------------------------

    def get_communicator(self) -> Communicator:
        if self._resources.communicator is None:
            self._resources.communicator = self._create_communicator()
        return self._resources.communicator

    def _create_communicator(self) -> Communicator:
        from aiida.manage.configuration import get_config_option
        from aiida.orm.utils import serialize

        import aiida_zmq

        info = self.find_broker()
        endpoint = discovery.choose_endpoint(info)
        LOGGER.debug('connecting to the broker of %s at %s (pid %s)', self._profile.name, endpoint, info.get('pid'))
        return aiida_zmq.connect(
            endpoint,
            encoder=functools.partial(serialize.serialize, encoding='utf-8'),
            decoder=serialize.deserialize_unsafe,
            task_queue=self.queue_name,
            task_prefetch_count=get_config_option('daemon.worker_process_slots'),
            heartbeat=float(self._option('heartbeat')),
            name=f'aiida-{self._profile.name}-{os.getpid()}',
        )

    def iterate_tasks(self) -> Iterator[t.Any]:
        """Iterate over the tasks of the launch queue (``verdi process repair``)."""
        yield from self.get_communicator().task_queue(self.queue_name)

    def check_service_reachable(self) -> bool:
        had_communicator = self._resources.communicator is not None
        try:
            self.get_communicator()
        except Exception:
            return False
        finally:
            if not had_communicator:
                self.close()
        return True

    def probe_service_status(self) -> BrokerServiceStatus:
        status: BrokerServiceStatus = {'data_dir': str(self._data_dir), 'watcher': self.watcher_name}
        info = discovery.read_broker_info(self._data_dir)
        if info is None:
            status.update(
                {'connected': False, 'error': f'no broker.json in {self._data_dir}: the broker is not running'}
            )
            return status
        status.update({key: t.cast(JsonValue, value) for key, value in info.items()})
        if not discovery.broker_info_alive(info):
            status.update({'connected': False, 'error': f'stale broker.json: process {info.get("pid")} is gone'})
            return status
        had_communicator = self._resources.communicator is not None
        try:
            self.get_communicator()
        except Exception as exception:
            error = f'{type(exception).__name__}: {exception}'
            LOGGER.error('Failed to probe broker status: %s', error)
            status.update({'connected': False, 'error': error})
        else:
            status.update({'connected': True, 'error': None})
        finally:
            if not had_communicator:
                self.close()
        return status

    def close(self) -> None:
        self._resources.release()

    def __str__(self) -> str:
        info = discovery.read_live_broker_info(self._data_dir)
        if info is None:
            return f'aiida-zmq @ {self._data_dir} <not running>'
        return f'aiida-zmq v{info.get("version", "?")} (PID {info.get("pid")}) @ {discovery.choose_endpoint(info)}'

    def __enter__(self) -> ZmqBroker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
