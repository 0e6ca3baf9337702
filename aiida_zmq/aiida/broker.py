"""The AiiDA broker plugin (entry point ``zmq`` in ``aiida.brokers``).

It mirrors :class:`aiida.brokers.rabbitmq.broker.RabbitmqBroker`: the same launch queue name, codec and prefetch, so
plumpy and AiiDA see no difference. What differs is how the broker is found and started:

* the broker's data directory is ``<AiiDA config dir>/broker/zmq/<profile uuid>`` unless the profile overrides it;
* a running broker announces itself in ``DIR/broker.json`` (``aiida-zmq serve``); that is the first place looked at;
* if there is none but the profile's daemon is running, the broker watcher ``zmq-broker-<profile>`` is attached to
  the daemon's circus arbiter (see ``docs/circus.md``), and the caller waits, bounded, for the broker to come up.
  Every daemon worker goes through here when it creates its runner, which is what makes ``verdi daemon start`` bring
  up the broker without any change to aiida-core.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import typing as t
import weakref
from pathlib import Path

from aiida.brokers.broker import Broker, BrokerConfigField, BrokerServiceStatus

from aiida_zmq import discovery
from aiida_zmq.broker.config import DEFAULTS as BROKER_DEFAULTS

if t.TYPE_CHECKING:
    from collections.abc import Iterator

    from aiida.engine.daemon.client import DaemonClient
    from aiida.manage.configuration.profile import Profile
    from kiwipy import Communicator

    from aiida_zmq.aiida.communicator import ProfileCommunicator
    from aiida_zmq.communicator import ZmqCommunicator

__all__ = ('ZmqBroker', 'aiida_codec', 'broker_data_dir', 'launch_queue_name')

LOGGER = logging.getLogger(__name__)

ENTRY_POINT_NAME = 'zmq'
DEFAULT_START_TIMEOUT = 30  # a client setting: the broker's own defaults are BROKER_DEFAULTS


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


CODECS = ('hybrid', 'yaml')


def aiida_codec(kind: str = 'hybrid') -> tuple[t.Callable[[t.Any], bytes], t.Callable[[bytes], t.Any]]:
    """Return the (encoder, decoder) for AiiDA's messages.

    ``hybrid`` (default): JSON for messages that are plain JSON (AiiDA's process tasks, RPCs and broadcasts are),
    AiiDA's own YAML (``aiida.orm.utils.serialize``, as ``RabbitmqBroker`` uses) for the rest; tagged, so a decoder
    reads both. ``yaml``: AiiDA's YAML for everything, exactly as with RabbitMQ. Both decoders read both encodings.
    """
    from aiida.orm.utils import serialize

    from aiida_zmq.codec import HybridCodec

    if kind not in CODECS:
        raise ValueError(f'unknown codec {kind!r}: choose one of {", ".join(CODECS)}')
    # With an encoding, PyYAML returns bytes (aiida-core annotates ``str``); the decoder takes either.
    encode_yaml = t.cast(t.Callable[[t.Any], bytes], functools.partial(serialize.serialize, encoding='utf-8'))
    decode_yaml = t.cast(t.Callable[[t.Any], t.Any], serialize.deserialize_unsafe)
    codec = HybridCodec(fallback_encoder=encode_yaml, fallback_decoder=decode_yaml)
    if kind == 'yaml':
        return encode_yaml, codec.decode
    return codec.encode, codec.decode


def _pubsub_endpoint(controller_endpoint: str, deadline: float) -> str:
    """Ask the arbiter for its pub/sub endpoint (the plugins need it), retrying until ``deadline``.

    While ``verdi daemon start`` boots the workers, the arbiter may be slow to answer: that is no reason to fail a
    worker's start, the deadline (``start_timeout``) bounds the wait.
    """
    from aiida_zmq.circus import CircusCallError, CircusController

    delay = 0.05
    while True:
        try:
            with CircusController(controller_endpoint, timeout=5.0) as controller:
                return str(controller.global_options().get('pubsub_endpoint') or '')
        except CircusCallError as exception:
            if time.monotonic() + delay > deadline:
                raise
            LOGGER.debug('arbiter at %s did not give its options yet (%s): retrying', controller_endpoint, exception)
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def unreachable_daemon_message(profile_name: str, pid: int | None, socket: str) -> str:
    """What to say, and do, about a daemon that runs but whose control socket is gone."""
    who = f'pid {pid}' if pid else 'its pid file says so'
    return (
        f'the daemon of `{profile_name}` runs ({who}) but its control socket {socket} is gone, so nothing can reach '
        f'it (aiida-core removes the socket directory when circus refuses a `verdi daemon stop` that comes while the '
        f'daemon is still starting). Stop it by its pid (`kill {pid or "PID"}`), then `verdi -p {profile_name} daemon '
        'start`'
    )


class _BrokerResources:
    """What a :class:`ZmqBroker` owns; kept apart so a finalizer can release it without a reference to the broker."""

    def __init__(self) -> None:
        self.communicator: ProfileCommunicator | None = None

    def release(self) -> None:
        if self.communicator is not None:
            communicator, self.communicator = self.communicator, None
            communicator.close()


def _finalize_broker(resources: _BrokerResources, broker_repr: str) -> None:
    if resources.communicator is not None:
        LOGGER.info('ZmqBroker %s was not closed explicitly.', broker_repr)
        resources.release()


TRUE_WORDS = ('1', 'true', 'yes', 'on')
FALSE_WORDS = ('0', 'false', 'no', 'off')


def _as_bool(value: t.Any) -> bool:
    """A boolean option as stored in the profile: a bool, or a string typed into ``config.json`` by hand."""
    if isinstance(value, str):
        return value.strip().lower() in TRUE_WORDS
    return bool(value)


#: The broker watcher's ``before_stop`` hook: it stops after the workers (see :mod:`aiida_zmq.aiida.circus_hooks`).
STOP_HOOK = 'aiida_zmq.aiida.circus_hooks.wait_for_stopping_workers'


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
            default=BROKER_DEFAULTS.heartbeat,
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
            name='codec',
            prompt='Message codec',
            help='`hybrid`: JSON for plain messages, AiiDA YAML for the rest (faster); `yaml`: AiiDA YAML only.',
            default='hybrid',
            param_type='string',
            choices=('hybrid', 'yaml'),
        ),
        BrokerConfigField(
            name='peer_timeout',
            prompt='Peer timeout',
            help='Seconds of silence after which the broker declares a client dead and gives its tasks to others.',
            default=BROKER_DEFAULTS.peer_timeout,
            param_type='string',
            expose_cli=False,
        ),
        BrokerConfigField(
            name='max_deliveries',
            prompt='Deliveries before dead-lettering',
            help='A task delivered this many times without an answer goes to the dead-letter queue.',
            default=BROKER_DEFAULTS.max_deliveries,
            param_type='int',
            expose_cli=False,
        ),
        BrokerConfigField(
            name='fsync',
            prompt='fsync every batch',
            help='Confirm a task only once it survives a power cut (false: faster, a power cut may lose tasks).',
            default=BROKER_DEFAULTS.fsync,
            param_type='bool',
            expose_cli=False,
        ),
        BrokerConfigField(
            name='circus_plugins',
            prompt='Run the circus plugins',
            help='Also attach the events plugin (requeue at once when a worker dies) and the health plugin.',
            default=True,
            param_type='bool',
            expose_cli=False,
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
        """Return the profile's daemon client if its arbiter runs, else ``None`` (:mod:`aiida_zmq.aiida.daemon`)."""
        from aiida_zmq.aiida.daemon import running_daemon_client

        try:
            client = self._daemon_client()
        except Exception as exception:
            LOGGER.debug('cannot determine the daemon status of %s: %s', self._profile.name, exception)
            return None
        return running_daemon_client(self._profile, client)

    # --- the broker process ----------------------------------------------------------------------------------------

    def watcher_specs(self, client: DaemonClient | None = None, pubsub: str = '') -> list[t.Any]:
        """Return the circus watchers of this profile's broker (:class:`aiida_zmq.circus.WatcherSpec`).

        The broker first, then (with a ``pubsub`` endpoint) its events and health plugins. The broker watcher gets
        the ``before_stop`` hook of :mod:`aiida_zmq.aiida.circus_hooks`, so that it outlives the workers on a daemon
        stop. That relies on circus stopping watchers of equal priority (circus ``add`` takes no priority) in the
        order they were added: AiiDA's workers first, the broker added later after them.
        """
        from aiida_zmq.circus import broker_watchers

        client = client or self._daemon_client()
        bind = discovery.default_ipc_bind(self._data_dir, str(self._profile.uuid).replace('-', ''))
        specs = broker_watchers(
            self._profile.name,
            str(self._data_dir),
            controller=client.get_controller_endpoint() if pubsub else '',
            pubsub=pubsub,
            log_dir=str(Path(client.daemon_log_file).parent),
            env=client.get_env(),
            binds=[bind] if bind else [],
            extra_args=self.serve_options(),
            plugins=bool(pubsub),
        )
        specs[0].hooks['before_stop'] = STOP_HOOK
        return specs

    def serve_options(self) -> list[str]:
        """Return the ``aiida-zmq serve`` options that the profile's broker options set."""
        options = [
            '--heartbeat',
            str(float(self._option('heartbeat'))),
            '--peer-timeout',
            str(float(self._option('peer_timeout'))),
            '--max-deliveries',
            str(int(self._option('max_deliveries'))),
        ]
        if not _as_bool(self._option('fsync')):
            options.append('--no-fsync')
        return options

    def watcher_spec(self, client: DaemonClient | None = None) -> t.Any:
        """Return the circus watcher that runs this profile's broker (:class:`aiida_zmq.circus.WatcherSpec`)."""
        return self.watcher_specs(client)[0]

    def ensure_broker(self, client: DaemonClient | None = None) -> dict[str, str]:
        """Attach the broker (and its circus plugins) to the profile's running daemon; return what was done.

        Idempotent and safe when several workers race (see :func:`aiida_zmq.circus.attach_watcher`).

        :raises ConnectionError: when the daemon is not running or its arbiter refuses.
        """
        from aiida_zmq.circus import CircusCallError, attach_watcher, missing_control_socket
        from aiida_zmq.security import make_private_dirs

        client = client or self._running_daemon_client()
        if client is None:
            raise ConnectionError(f'the daemon of profile `{self._profile.name}` is not running')
        make_private_dirs(self._data_dir)
        endpoint = client.get_controller_endpoint()
        missing = missing_control_socket(endpoint)
        if missing is not None:
            raise ConnectionError(unreachable_daemon_message(self._profile.name, client.get_daemon_pid(), missing))
        timeout = float(self._option('start_timeout'))
        deadline = time.monotonic() + timeout
        try:
            pubsub = _pubsub_endpoint(endpoint, deadline) if _as_bool(self._option('circus_plugins')) else ''
            done = {}
            for spec in self.watcher_specs(client, pubsub):
                remaining = max(deadline - time.monotonic(), 1.0)
                done[spec.name] = attach_watcher(endpoint, spec, timeout=remaining)
            return done
        except CircusCallError as exception:
            raise ConnectionError(
                f'could not attach the broker to the daemon of `{self._profile.name}`: {exception}. Restart the daemon '
                f'(`verdi -p {self._profile.name} daemon restart`); the circus log is beside {client.daemon_log_file}.'
            ) from exception

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

        client = self._running_daemon_client() if _as_bool(self._option('attach_to_daemon')) else None
        if client is None:
            raise discovery.BrokerNotFound(
                f'no broker is running for profile `{self._profile.name}` ({self._data_dir}); '
                'start the daemon (`verdi daemon start`), which starts the broker, or run `aiida-zmq serve`'
            )
        action = self.ensure_broker(client)
        LOGGER.info('broker watchers %s; waiting for the broker to come up', action)
        try:
            return discovery.wait_for_broker_info(
                self._data_dir,
                float(self._option('start_timeout')),
                still_starting=lambda: self._watcher_active(client),
            )
        except discovery.BrokerNotFound as exception:
            log = Path(client.daemon_log_file).parent / f'{self.watcher_name}.log'
            raise discovery.BrokerNotFound(
                f'{exception}. The broker of `{self._profile.name}` did not come up in the daemon: see {log}, then '
                f'`verdi -p {self._profile.name} daemon restart`.'
            ) from exception

    # --- Broker interface ------------------------------------------------------------------------------------------

    def get_communicator(self) -> Communicator:
        """Return the profile's communicator (:class:`aiida_zmq.aiida.communicator.ProfileCommunicator`).

        It is online while a broker or the daemon runs and offline otherwise, switching by itself (see its module).
        Created online (the daemon runs), it connects at once; with the daemon running but no broker yet, the broker
        is attached to the daemon and waited for (bounded by ``start_timeout``). Offline, ``submit()`` stores the task
        for when the daemon starts, and ``run()`` works without a broker.

        :raises ConnectionError: when the daemon runs but its broker did not come up in time (the message says why and
            what to do).
        """
        if self._resources.communicator is None:
            communicator = self._profile_communicator()
            try:
                communicator.mode()  # online now: connect now, so that a failure shows here
            except BaseException:
                communicator.close()
                raise
            self._resources.communicator = communicator
        return self._resources.communicator

    def codec(self) -> tuple[t.Callable[[t.Any], bytes], t.Callable[[bytes], t.Any]]:
        """Return the (encoder, decoder) of the profile's messages: :func:`aiida_codec` of its ``codec`` option."""
        return aiida_codec(str(self._option('codec')))

    def _profile_communicator(self) -> ProfileCommunicator:
        from aiida_zmq.aiida.communicator import ProfileCommunicator

        encoder, decoder = self.codec()
        return ProfileCommunicator(
            data_dir=str(self._data_dir),
            profile_name=self._profile.name,
            task_queue=self.queue_name,
            encoder=encoder,
            decoder=decoder,
            connect=self._connect,
            daemon_running=self._daemon_brings_broker,
        )

    def _daemon_brings_broker(self) -> bool:
        """Whether the profile's daemon runs and runs the broker (so a broker that is down is coming back)."""
        return _as_bool(self._option('attach_to_daemon')) and self._running_daemon_client() is not None

    def _connect(self) -> ZmqCommunicator:
        """A started connection to the profile's broker, bringing the broker up in a running daemon if needed."""
        from aiida.manage.configuration import get_config_option

        import aiida_zmq

        info = self.find_broker(wait=_as_bool(self._option('attach_to_daemon')))
        endpoint = discovery.choose_endpoint(info)
        encoder, decoder = self.codec()
        LOGGER.debug('connecting to the broker of %s at %s (pid %s)', self._profile.name, endpoint, info.get('pid'))
        return aiida_zmq.connect(
            endpoint,
            encoder=encoder,
            decoder=decoder,
            task_queue=self.queue_name,
            task_prefetch_count=get_config_option('daemon.worker_process_slots'),
            heartbeat=float(self._option('heartbeat')),
            name=f'aiida-{self._profile.name}-{os.getpid()}',
        )

    def is_offline(self) -> bool:
        """Whether this broker's communicator (if any) is offline now: no broker and no daemon."""
        from aiida_zmq.aiida.communicator import Mode

        communicator = self._resources.communicator
        return communicator is not None and communicator.mode() is Mode.OFFLINE

    def iterate_tasks(self) -> Iterator[t.Any]:
        """Iterate over the tasks of the launch queue (``verdi process repair``).

        With the broker running, through it; with the broker stopped (``verdi process repair`` wants the daemon
        stopped, and the broker stops with it), straight from the store, under the broker's lock. The communicator's
        mode decides at the start of the iteration (see :class:`aiida_zmq.aiida.communicator.ProfileTaskQueue`).
        """
        yield from self.get_communicator().task_queue(self.queue_name)

    def check_service_reachable(self) -> bool:
        """Whether a broker process answers; ``False`` while the broker is not running (even though submit works)."""
        if discovery.read_live_broker_info(self._data_dir) is None:
            return False
        try:
            self.admin_status(timeout=5.0)
        except Exception as exception:
            LOGGER.debug('broker of %s not reachable: %s', self._profile.name, exception)
            return False
        return True

    @classmethod
    def config_fields(cls) -> dict[str, BrokerConfigField]:
        """The profile options of this broker by name (aiida-core's ``_config_fields``), for the CLI and the docs."""
        return {field.name: field for field in cls._config_fields}

    def admin_status(self, timeout: float) -> dict[str, t.Any]:
        """Ask the running broker for its status, through this broker's connection or a short-lived one."""
        communicator = self._resources.communicator
        connection = communicator.connection if communicator is not None else None
        if connection is not None and connection.in_touch():
            return connection.admin('status', timeout=timeout)
        temporary = self._connect()
        try:
            return temporary.admin('status', timeout=timeout)
        finally:
            temporary.close()

    def _stored_counts(self) -> dict[str, int] | None:
        """Tasks waiting in the store of a stopped broker, by queue; ``None`` if a broker holds the store."""
        from aiida_zmq import store
        from aiida_zmq.exceptions import BrokerRunning

        path = self._data_dir / store.STORE_FILENAME
        if not path.exists():
            return {}
        try:
            with store.broker_lock(self._data_dir, blocking=False):
                task_store = store.TaskStore(path)
                try:
                    counts = task_store.ready_counts()
                    for task in task_store.load_delivered():
                        counts[task.queue] = counts.get(task.queue, 0) + 1
                    return counts
                finally:
                    task_store.close()
        except BrokerRunning:
            return None

    def probe_service_status(self) -> BrokerServiceStatus:
        """Return the status: endpoint, pid, uptime, queue depth, consumers, in-flight, dead letters, store size.

        Never raises: a failure is in ``error`` (with ``connected: False``), and says what to do.
        """
        status: BrokerServiceStatus = {
            'backend': ENTRY_POINT_NAME,
            'data_dir': str(self._data_dir),
            'watcher': self.watcher_name,
            'queue': self.queue_name,
        }
        try:
            info = discovery.read_broker_info(self._data_dir)
            if info is None or not discovery.broker_info_alive(info):
                status['connected'] = False
                status['running'] = False
                counts = self._stored_counts()
                if counts is not None:
                    status['queue_depth'] = counts.get(self.queue_name, 0)
                reason = 'not running' if info is None else f'not running (stale broker.json: pid {info.get("pid")})'
                status['error'] = (
                    f'the broker is {reason}; it starts with the daemon: `verdi -p {self._profile.name} daemon start`'
                )
                return status
            status['running'] = True
            status['pid'] = info.get('pid')
            status['endpoint'] = discovery.choose_endpoint(info)
            admin = self.admin_status(timeout=10.0)
        except Exception as exception:
            error = f'{type(exception).__name__}: {exception}'
            LOGGER.warning('Failed to probe the broker status of %s: %s', self._profile.name, error)
            status.update({'connected': False, 'error': error})
            return status

        queue = admin.get('queues', {}).get(self.queue_name, {})
        clients = admin.get('clients', [])
        consumers = [client for client in clients if self.queue_name in (client.get('prefetch') or {})]
        status.update(
            {
                'connected': True,
                'error': None,
                'version': admin.get('version'),
                'uptime': admin.get('uptime'),
                'queue_depth': queue.get('depth', 0),
                'consumers': queue.get('consumers', len(consumers)),
                'prefetch': sum(int((client.get('prefetch') or {}).get(self.queue_name, 0)) for client in consumers),
                'in_flight': sum(int(client.get('held', 0)) for client in clients),
                'clients': len(clients),
                'dead_letters': admin.get('dead_letters'),
                'store_bytes': admin.get('store_bytes'),
                # The names ``verdi status`` reads for aiida-core's own ZeroMQ broker.
                'pending_tasks': queue.get('depth', 0),
                'processing_tasks': sum(int(client.get('held', 0)) for client in clients),
            }
        )
        return status

    def close(self) -> None:
        self._resources.release()

    def __str__(self) -> str:
        info = discovery.read_live_broker_info(self._data_dir)
        if info is None:
            return (
                f'aiida-zmq broker not running; it starts with the daemon: `verdi -p {self._profile.name} daemon '
                f'start`. Submitted processes wait in {self._data_dir} until then.'
            )
        return f'aiida-zmq v{info.get("version", "?")} (PID {info.get("pid")}) @ {discovery.choose_endpoint(info)}'

    def __enter__(self) -> ZmqBroker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
