"""Circus watcher definitions for the broker, and attaching them to a running arbiter.

aiida-core's daemon builds its arbiter with a fixed list of watchers (the workers, plus its own ``core.zeromq``
broker). This module adds the ``zmq-broker-<profile>`` watcher (and its plugins) to such a running arbiter through the
controller's ``add`` command, which leaves every other watcher alone (a ``restart`` would restart AiiDA's workers too).

No AiiDA import here: callers pass the controller endpoint, the data directory and the log file.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
import time
import typing as t
from dataclasses import dataclass, field
from importlib import resources
from string import Template

from .endpoints import ipc_path
from .exceptions import CircusCallError

T = t.TypeVar('T')

__all__ = (
    'EVENTS_PLUGIN',
    'HEALTH_PLUGIN',
    'CircusCallError',
    'CircusController',
    'HealthOptions',
    'LogRotation',
    'WatcherSpec',
    'arbiter_endpoint_of',
    'attach_broker',
    'attach_watcher',
    'broker_command',
    'broker_watcher_spec',
    'broker_watchers',
    'call_while_busy',
    'is_busy',
    'legacy_watcher_name',
    'log_file_name',
    'missing_control_socket',
    'parse_watcher_name',
    'plugin_watcher_spec',
    'render_ini',
    'sibling_watchers',
    'watcher_name',
    'watcher_of_pid',
)

LOGGER = logging.getLogger(__name__)

# Watcher and log names. AiiDA names its own things ``aiida-<profile>`` (the workers' watcher, the daemon log),
# ``aiida-<profile>-zmq-broker-service`` (core.zeromq) and ``circus-<profile>.log``, in a daemon log directory that
# every profile shares. Nothing of ours starts with ``aiida-`` or ``circus-``, and each role has a prefix of its own,
# none a prefix of another: a name says which role of which profile it is, so no two (role, profile) pairs and no
# name of AiiDA's share a name, whatever the profiles are called (tests/circus/test_names.py). The profile name comes
# last and unchanged, so that `circusctl` and `ls` show it as the user typed it.
ROLE_PREFIXES = {'broker': 'zmq-broker-', 'events': 'zmq-events-', 'health': 'zmq-health-'}
ROLES = tuple(ROLE_PREFIXES)
LOG_SUFFIX = '.log'
# aiida-zmq 0.1 named them ``aiida-zmq-<profile>[-events|-health]``: the broker of profile ``presto`` had the name of
# AiiDA's workers of profile ``zmq-presto``, and wrote into their log. Watchers of a daemon started by that release
# are replaced when this release attaches its own (:attr:`WatcherSpec.replaces`).
LEGACY_PREFIX = 'aiida-zmq-'
LEGACY_SUFFIXES = {'broker': '', 'events': '-events', 'health': '-health'}
# Fully qualified names of the plugin classes (``circus.plugins.main`` resolves them in the plugin process).
EVENTS_PLUGIN = 'aiida_zmq.circus_plugins.events.BrokerEventsPlugin'
HEALTH_PLUGIN = 'aiida_zmq.circus_plugins.health.BrokerHealthPlugin'
EXTENDED_STATS_HOOK = 'aiida_zmq.circus_plugins.hooks.extended_stats'
# Seconds the broker gets after SIGTERM to commit and close before circus kills it.
GRACEFUL_TIMEOUT = 10.0
# Set in the broker watcher's environment: the controller endpoint of the arbiter that runs it, so that
# `aiida-zmq status` can say which arbiter to ask (``circusctl --endpoint ...``) from the broker's pid alone.
CIRCUS_ENDPOINT_ENV = 'AIIDA_ZMQ_CIRCUS_ENDPOINT'
# Reasons circus gives when another command holds the arbiter's lock (``circus.util.synchronized``); retry those.
_BUSY_MARKERS = ('is already running', 'arbiter is restarting')


def watcher_name(profile_name: str, role: str = 'broker') -> str:
    """Return the name of a profile's broker watcher (``role='broker'``) or of its ``events``/``health`` plugin.

    One broker per profile, one name per broker; see ``ROLE_PREFIXES`` for why no two names can be equal.
    """
    return ROLE_PREFIXES[role] + profile_name


def log_file_name(profile_name: str, role: str = 'broker') -> str:
    """Return the file name (no directory) of the log of a profile's broker watcher or plugin: its watcher's name."""
    return watcher_name(profile_name, role) + LOG_SUFFIX


def parse_watcher_name(name: str) -> tuple[str, str] | None:
    """Return ``(role, profile name)`` of one of our watcher names, ``None`` for any other name.

    circus compares watcher names without case (it lowercases what it is asked for), so the role prefix does too.
    """
    for role, prefix in ROLE_PREFIXES.items():
        if name[: len(prefix)].lower() == prefix:
            return role, name[len(prefix) :]
    return None


def legacy_watcher_name(profile_name: str, role: str = 'broker') -> str:
    """The name aiida-zmq 0.1 gave a profile's watcher (``aiida-zmq-<profile>[-events|-health]``)."""
    return LEGACY_PREFIX + profile_name + LEGACY_SUFFIXES[role]


def sibling_watchers(broker_watcher: str) -> set[str]:
    """The lowercased names of a broker watcher and of its plugins (what circus calls them), from the broker's name.

    A broker watcher of aiida-zmq 0.1 (``aiida-zmq-<profile>``) has its plugins ``<name>-events``/``<name>-health``.
    """
    parsed = parse_watcher_name(broker_watcher)
    if parsed is not None and parsed[0] == 'broker':
        return {watcher_name(parsed[1], role).lower() for role in ROLES}
    return {(broker_watcher + suffix).lower() for suffix in LEGACY_SUFFIXES.values()}


def broker_command(python: str | None = None) -> list[str]:
    """Return the argv prefix that runs the ``aiida-zmq`` command of this installation.

    The console script next to the interpreter first (what ``pip install`` created, in the same virtualenv as the
    daemon), then one on ``PATH``, else the interpreter itself running the CLI module.
    """
    python = python or sys.executable
    candidate = os.path.join(os.path.dirname(python), 'aiida-zmq')
    if os.access(candidate, os.X_OK):
        return [candidate]
    found = shutil.which('aiida-zmq')
    if found:
        return [found]
    return [python, '-c', 'import sys; from aiida_zmq.cli.main import main; sys.exit(main())']


@dataclass(frozen=True)
class LogRotation:
    """How circus rotates a watcher's log file: past ``max_bytes`` it becomes ``NAME.log.1`` (the older ones ``.2`` ...
    up to ``backup_count``, the oldest deleted) and a new ``NAME.log`` starts. ``max_bytes=0`` never rotates.

    The default keeps at most 6 x 10 MiB per watcher: a flood the broker's rate limits let through still cannot fill
    the disk of the daemon's log directory.
    """

    max_bytes: int = 10 * 1024 * 1024
    backup_count: int = 5


@dataclass
class WatcherSpec:
    """A circus watcher, in the form both the ``add`` command and an ``.ini`` file take."""

    name: str
    argv: list[str]
    log_file: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    graceful_timeout: float = GRACEFUL_TIMEOUT
    numprocesses: int = 1
    # Circus hooks, ``{hook name: fully qualified function}``; loaded in the arbiter, failures there ignored.
    hooks: dict[str, str] = field(default_factory=dict)
    rotation: LogRotation = field(default_factory=LogRotation)
    # The stream the process logs to (the broker: stderr; circus plugins: stdout). Both streams go to ``log_file``;
    # only this one rotates the file, the other reopens it when it was rotated (circus ``WatchedFileStream``): two
    # rotating streams on one file would each rename the file the other writes to.
    log_stream: str = 'stderr'
    # Names this watcher had in an earlier release: :func:`attach_watcher` removes such a watcher (if it runs on this
    # one's working directory: ours) before adding this one, so that a daemon started by that release does not keep
    # a second broker, or plugins watching a watcher that is gone.
    replaces: list[str] = field(default_factory=list)

    @property
    def cmd(self) -> str:
        return shlex.join(self.argv)

    def _stream(self, stream: str) -> dict[str, t.Any]:
        options: dict[str, t.Any] = {'filename': self.log_file, 'time_format': '%Y-%m-%d %H:%M:%S'}
        if stream != self.log_stream:
            return {'class': 'WatchedFileStream', **options}
        rotation = {'max_bytes': self.rotation.max_bytes, 'backup_count': self.rotation.backup_count}
        return {'class': 'FileStream', **options, **rotation}

    def streams(self) -> dict[str, dict[str, t.Any]]:
        """``{'stdout_stream': {...}, 'stderr_stream': {...}}``, or nothing without a log file."""
        if not self.log_file:
            return {}
        return {f'{stream}_stream': self._stream(stream) for stream in ('stdout', 'stderr')}

    def options(self) -> dict[str, t.Any]:
        """Return the watcher options accepted by ``circus.commands.util.validate_option``."""
        options: dict[str, t.Any] = {
            'numprocesses': self.numprocesses,
            # A broker instance per profile: never let circus run two (``incr`` would be refused).
            'singleton': True,
            'copy_env': True,
            'env': dict(self.env),
            'graceful_timeout': self.graceful_timeout,
            # The broker has no children of its own to reap; its exit code tells circus whether to respawn.
            'respawn': True,
        }
        if self.working_dir:
            options['working_dir'] = self.working_dir
        if self.hooks:
            # ``[name, ignore_failure]``: a hook that fails to import must not keep the broker from running.
            options['hooks'] = {hook: [function, True] for hook, function in self.hooks.items()}
        options.update(self.streams())
        return options

    def add_message(self, start: bool = True) -> dict[str, t.Any]:
        """Return the controller message that adds (and starts) this watcher."""
        return {
            'command': 'add',
            'properties': {'name': self.name, 'cmd': self.cmd, 'options': self.options(), 'start': start},
        }


def broker_watcher_spec(
    profile_name: str,
    data_dir: str,
    *,
    log_file: str | None,
    env: dict[str, str] | None = None,
    binds: t.Sequence[str] = (),
    extra_args: t.Sequence[str] = (),
    python: str | None = None,
    rotation: LogRotation | None = None,
) -> WatcherSpec:
    """Return the watcher that runs ``aiida-zmq serve`` for a profile's broker."""
    argv = [*broker_command(python), 'serve', '--data-dir', data_dir]
    for bind in binds:
        argv.extend(['--bind', bind])
    argv.extend(extra_args)
    if log_file:
        argv.append('--no-log-time')  # the FileStream stamps each line (``WatcherSpec._stream``)
    return WatcherSpec(
        name=watcher_name(profile_name),
        argv=argv,
        log_file=log_file,
        env=dict(env or {}),
        working_dir=data_dir,
        hooks={'extended_stats': EXTENDED_STATS_HOOK},
        rotation=rotation or LogRotation(),
        log_stream='stderr',  # `aiida-zmq serve` logs to stderr
        replaces=[legacy_watcher_name(profile_name)],
    )


@dataclass
class HealthOptions:
    """How the health plugin checks the broker (see ``docs/circus.md``).

    A broker is declared hung after ``max_failures`` checks in a row that got no answer to ``status`` within
    ``timeout`` seconds, counted once the process is older than ``start_grace`` (recovering a large store takes a
    while) or has answered a check. The worst-case detection time is about ``max_failures * (interval + timeout)``.
    """

    interval: float = 5.0
    timeout: float = 2.0
    max_failures: int = 3
    start_grace: float = 30.0
    # ``kill``: SIGKILL through the arbiter, which respawns the broker at once (the store survives kill -9).
    # ``restart``: SIGCONT, then circus ``restart`` of the watcher (SIGTERM, ``graceful_timeout``, then SIGKILL): a
    # clean shutdown when the broker can still make one, slower when it is truly hung.
    action: str = 'kill'

    def config(self) -> dict[str, str]:
        return {
            'interval': str(self.interval),
            'timeout': str(self.timeout),
            'max_failures': str(self.max_failures),
            'start_grace': str(self.start_grace),
            'action': self.action,
        }


def plugin_watcher_spec(
    name: str,
    plugin: str,
    *,
    controller: str,
    pubsub: str,
    config: dict[str, str],
    log_file: str | None,
    env: dict[str, str] | None = None,
    python: str | None = None,
    log_level: str = 'INFO',
    working_dir: str | None = None,
    rotation: LogRotation | None = None,
    replaces: t.Sequence[str] = (),
) -> WatcherSpec:
    """Return a watcher that runs the circus plugin class ``plugin`` (a fully qualified name).

    This is the command circus 0.19 itself builds for a ``[plugin:NAME]`` section (``circus.plugins.get_plugin_cmd``),
    so a plugin can be added to a running arbiter with ``add`` like any watcher, and written to an ``.ini`` the same
    way. The plugin's configuration travels as ``key:value:::key:value`` (``circus.plugins._str2cfg``).
    """
    for key, value in config.items():
        # circus splits ``key:value:::key:value`` on ``:::``, then on the first ``:``, and strips both sides.
        if ':' in key or ':::' in value or value.endswith(':') or value != value.strip():
            raise ValueError(
                f'plugin option {key}={value!r} cannot be passed to circus (no ":" in keys; no ":::", no ":" at the '
                'end and no spaces around values): rename the profile or the data directory'
            )
    serialized = ':::'.join(f'{key}:{value}' for key, value in sorted(config.items()))
    argv = [python or sys.executable, '-c', 'from circus import plugins; plugins.main()']
    argv += ['--endpoint', controller, '--pubsub', pubsub, '--log-level', log_level]
    if serialized:
        argv += ['--config', serialized]
    argv.append(plugin)
    # Plugins hold no state worth a long shutdown: a second is plenty.
    return WatcherSpec(
        name=name,
        argv=argv,
        log_file=log_file,
        env=dict(env or {}),
        graceful_timeout=2.0,
        working_dir=working_dir,
        rotation=rotation or LogRotation(),
        log_stream='stdout',  # circus.plugins.main logs to stdout
        replaces=list(replaces),
    )


def broker_watchers(
    profile_name: str,
    data_dir: str,
    *,
    controller: str,
    pubsub: str,
    log_dir: str | None,
    env: dict[str, str] | None = None,
    binds: t.Sequence[str] = (),
    extra_args: t.Sequence[str] = (),
    health: HealthOptions | None = None,
    python: str | None = None,
    plugins: bool = True,
    rotation: LogRotation | None = None,
) -> list[WatcherSpec]:
    """Return the watchers of a profile's broker: the broker, its events plugin and its health plugin.

    The same list goes to a running arbiter (:func:`attach_broker`) and into a standalone ``.ini``
    (``aiida-zmq circus-config``). Names: :func:`watcher_name`; logs ``LOG_DIR/<watcher name>.log``, rotated as
    ``rotation`` says.
    """
    broker_env = dict(env or {})
    if controller:
        broker_env[CIRCUS_ENDPOINT_ENV] = controller
    broker = broker_watcher_spec(
        profile_name,
        data_dir,
        log_file=_log_file(log_dir, profile_name, 'broker'),
        env=broker_env,
        binds=binds,
        extra_args=extra_args,
        python=python,
        rotation=rotation,
    )
    if not plugins:
        return [broker]
    common = {'data_dir': data_dir, 'broker_watcher': broker.name}
    plugin_config = {'events': common, 'health': {**common, **(health or HealthOptions()).config()}}
    return [broker] + [
        plugin_watcher_spec(
            watcher_name(profile_name, role),
            EVENTS_PLUGIN if role == 'events' else HEALTH_PLUGIN,
            controller=controller,
            pubsub=pubsub,
            config=config,
            log_file=_log_file(log_dir, profile_name, role),
            env=env,
            python=python,
            working_dir=data_dir,
            rotation=rotation,
            replaces=[legacy_watcher_name(profile_name, role)],
        )
        for role, config in plugin_config.items()
    ]


def _log_file(log_dir: str | None, profile_name: str, role: str) -> str | None:
    return os.path.join(log_dir, log_file_name(profile_name, role)) if log_dir else None


class CircusController:
    """A short-lived connection to an arbiter's controller endpoint.

    Uses its own zmq context rather than ``zmq.Context.instance()`` (circus's default), so that a call from inside an
    AiiDA process never shares a context with that process's communicator and can be torn down completely.
    """

    def __init__(self, endpoint: str, timeout: float = 5.0) -> None:
        import zmq
        from circus.client import CircusClient

        self.endpoint = endpoint
        self._context = zmq.Context()
        self._client = CircusClient(context=self._context, endpoint=endpoint, timeout=timeout)

    def call(self, command: str, **properties: t.Any) -> dict[str, t.Any]:
        """Send one command and return the response; raise :class:`CircusCallError` if circus reports an error."""
        return self.call_message({'command': command, 'properties': properties})

    def call_message(self, message: dict[str, t.Any]) -> dict[str, t.Any]:
        from circus.exc import CallError

        try:
            response = self._client.call(dict(message))
        except CallError as exception:
            raise CircusCallError(f'{message["command"]} on {self.endpoint}: {exception}') from exception
        if response.get('status') != 'ok':
            raise CircusCallError(str(response.get('reason', response)))
        return response

    def watcher_names(self) -> list[str]:
        return list(self.call('list').get('watchers', []))

    def watcher_status(self, name: str) -> str | None:
        """Return ``active``/``stopped``/``starting``/``stopping`` for a watcher, ``None`` if there is none."""
        statuses = self.call('status').get('statuses', {})
        status = statuses.get(name.lower())
        return str(status) if status is not None else None

    def watcher_pids(self, name: str) -> list[int]:
        return [int(pid) for pid in self.call('list', name=name).get('pids', [])]

    def watcher_options(self, name: str) -> dict[str, t.Any]:
        return dict(self.call('options', name=name).get('options', {}))

    def global_options(self) -> dict[str, t.Any]:
        """Return the arbiter's ``endpoint``, ``pubsub_endpoint``, ``stats_endpoint``, ``check_delay``..."""
        return dict(self.call('globaloptions').get('options', {}))

    def close(self) -> None:
        self._client.stop()
        self._context.term()

    def __enter__(self) -> CircusController:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def arbiter_endpoint_of(pid: int) -> str | None:
    """The controller endpoint of the arbiter that started process ``pid`` as one of our watchers, if it did.

    Read from the process's environment (``CIRCUS_ENDPOINT_ENV``, set by :func:`broker_watchers`); ``None`` for a
    process started otherwise, one of another user, or one that is gone.
    """
    import psutil

    try:
        return psutil.Process(pid).environ().get(CIRCUS_ENDPOINT_ENV) or None
    except (psutil.Error, OSError):
        return None


def watcher_of_pid(controller: CircusController, pid: int) -> str | None:
    """The name of the watcher of the arbiter at ``controller`` that runs process ``pid``, if one does."""
    for name in controller.watcher_names():
        if pid in controller.watcher_pids(name):
            return name
    return None


def is_busy(refusal: BaseException | str) -> bool:
    """Whether circus refused a command only because another exclusive command runs: worth retrying.

    ``refusal`` is the :class:`CircusCallError` raised, or the ``reason`` of an error answer taken as it is.
    """
    return any(marker in str(refusal) for marker in _BUSY_MARKERS)


def missing_control_socket(endpoint: str) -> str | None:
    """The socket file of an ``ipc://`` controller endpoint when its directory is gone, else ``None``.

    Nothing can answer there, and ZeroMQ would wait for the file instead of failing: a caller that knows this says
    so at once instead of after its timeout. aiida-core removes a daemon's socket directory when circus refuses its
    ``quit`` (circus still starts its watchers), and the arbiter then runs on where nobody can reach it. The file
    alone missing proves nothing: an arbiter that is starting writes its pid file before it binds its socket.
    """
    path = ipc_path(endpoint)
    if path is None:
        return None
    return None if os.path.isdir(os.path.dirname(path) or '.') else path


def attach_watcher(endpoint: str, spec: WatcherSpec, *, timeout: float = 30.0, call_timeout: float = 5.0) -> str:
    """Make sure the arbiter at ``endpoint`` runs the watcher ``spec``; return what was done.

    Idempotent: ``'exists'`` when the watcher is there and not stopped, ``'started'`` when it was there but stopped
    (e.g. circus gave up after ``max_retry`` respawns), ``'added'`` when it was created. Several processes may race
    (every daemon worker calls this when it boots): the loser of an ``add`` sees "already exist" and reports
    ``'exists'``. While the arbiter is busy with another exclusive command (it starts the workers one after another
    during ``verdi daemon start``) the call is retried until ``timeout``.

    :raises CircusCallError: on any other error, or when the arbiter stayed busy or unreachable past ``timeout``.
    """
    return call_while_busy(
        endpoint, lambda controller: _attach_once(controller, spec), time.monotonic() + timeout, call_timeout
    )


def call_while_busy(
    endpoint: str, call: t.Callable[[CircusController], T], deadline: float, call_timeout: float = 5.0
) -> T:
    """``call(controller)`` on a new controller of ``endpoint``, again (backing off) while the arbiter is busy with
    another exclusive command (:func:`is_busy`) and ``deadline`` (``time.monotonic()``) is ahead.

    :raises CircusCallError: on any other error, or the last busy refusal at the deadline.
    """
    delay = 0.05
    while True:
        try:
            with CircusController(endpoint, timeout=call_timeout) as controller:
                return call(controller)
        except CircusCallError as exception:
            if not is_busy(exception) or time.monotonic() + delay > deadline:
                raise
            LOGGER.debug('arbiter at %s busy, retrying in %.2fs: %s', endpoint, delay, exception)
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _attach_once(controller: CircusController, spec: WatcherSpec) -> str:
    _remove_replaced(controller, spec)
    status = controller.watcher_status(spec.name)
    if status is None:
        try:
            controller.call_message(spec.add_message(start=True))
        except CircusCallError as exception:
            if 'already exist' not in str(exception):
                raise
            return 'exists'
        LOGGER.info('added watcher %s to the arbiter at %s', spec.name, controller.endpoint)
        return 'added'
    if status == 'stopped':
        controller.call('start', name=spec.name, waiting=False)
        LOGGER.info('started stopped watcher %s at %s', spec.name, controller.endpoint)
        return 'started'
    return 'exists'


def _remove_replaced(controller: CircusController, spec: WatcherSpec) -> None:
    """Remove the watchers ``spec`` replaces (its names of an earlier release), if they are there and ours.

    Ours means: the same working directory (the broker's data directory) and an aiida-zmq command. A watcher of that
    name that is not ours is left alone (and logged): the arbiter is the user's.
    """
    if not spec.replaces:
        return
    present = {name.lower() for name in controller.watcher_names()}
    for name in spec.replaces:
        if name.lower() not in present or name.lower() == spec.name.lower():
            continue
        options = controller.watcher_options(name)
        command = str(options.get('cmd', ''))
        if options.get('working_dir') != spec.working_dir or not ('aiida-zmq' in command or 'aiida_zmq' in command):
            LOGGER.warning('watcher %s is not an earlier %s (another command or directory): kept', name, spec.name)
            continue
        try:
            # Not waiting: the arbiter stops it in the background; an ``add`` meanwhile is retried while it is busy.
            controller.call('rm', name=name, waiting=False)
        except CircusCallError as exception:
            if 'program not found' not in str(exception):
                raise
        LOGGER.info('removed watcher %s, the name an earlier aiida-zmq gave %s', name, spec.name)


def attach_broker(
    controller_endpoint: str,
    profile_name: str,
    data_dir: str,
    log_dir: str | None,
    env: dict[str, str] | None = None,
    *,
    binds: t.Sequence[str] = (),
    extra_args: t.Sequence[str] = (),
    health: HealthOptions | None = None,
    plugins: bool = True,
    timeout: float = 30.0,
    python: str | None = None,
) -> dict[str, str]:
    """Attach a profile's broker and its plugins to the running arbiter at ``controller_endpoint``.

    Each watcher goes through :func:`attach_watcher` (idempotent, retried while busy, safe when several processes
    race), the broker first so that the plugins find it. The plugins need the arbiter's pub/sub endpoint, asked from
    the arbiter itself (``globaloptions``). Returns ``{watcher name: 'added'|'exists'|'started'}``.

    :raises CircusCallError: when the arbiter cannot be reached or refuses, after retrying until ``timeout``.
    """
    deadline = time.monotonic() + timeout
    # circus refuses to spawn in a missing working directory; the broker refuses a directory others can open.
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    pubsub = ''
    if plugins:
        pubsub = call_while_busy(controller_endpoint, lambda c: c.global_options(), deadline).get('pubsub_endpoint', '')
        if not pubsub:
            raise CircusCallError(f'the arbiter at {controller_endpoint} has no pub/sub endpoint: cannot run plugins')
    specs = broker_watchers(
        profile_name,
        data_dir,
        controller=controller_endpoint,
        pubsub=pubsub,
        log_dir=log_dir,
        env=env,
        binds=binds,
        extra_args=extra_args,
        health=health,
        python=python,
        plugins=plugins,
    )
    done: dict[str, str] = {}
    for spec in specs:
        done[spec.name] = attach_watcher(
            controller_endpoint, spec, timeout=max(deadline - time.monotonic(), 1.0), call_timeout=5.0
        )
    return done


def render_ini(
    specs: t.Sequence[WatcherSpec],
    *,
    controller: str,
    pubsub: str,
    stats: str | None = None,
    circusd_log: str | None = None,
    check_delay: float = 1.0,
    generated_for: str = 'aiida-zmq circus-config',
) -> str:
    """Render a standalone ``circusd`` configuration with the given watchers (``aiida-zmq circus-config``).

    The templates are package data of ``aiida_zmq.config`` read with :mod:`importlib.resources`, so this works from an
    installed wheel as well as from a checkout.
    """
    package = resources.files('aiida_zmq.config')
    template = Template(package.joinpath('circus.ini.tmpl').read_text(encoding='utf-8'))
    watcher_template = Template(package.joinpath('watcher.ini.tmpl').read_text(encoding='utf-8'))
    sections = []
    for spec in specs:
        env_lines = '\n'.join(f'{key} = {value}' for key, value in sorted(spec.env.items()))
        hook_lines = '\n'.join(f'hooks.{hook} = {function}, true' for hook, function in sorted(spec.hooks.items()))
        # The same stream options as the ``add`` command gets (rotation included), one ``stream.key = value`` each.
        streams = spec.streams() or WatcherSpec(spec.name, spec.argv, log_file='/dev/null').streams()
        stream_lines = '\n'.join(
            f'{stream}.{key} = {value}' for stream, options in streams.items() for key, value in options.items()
        )
        sections.append(
            watcher_template.substitute(
                name=spec.name,
                cmd=spec.cmd,
                working_dir=spec.working_dir or os.getcwd(),
                graceful_timeout=spec.graceful_timeout,
                stream_lines=stream_lines,
                hook_lines=hook_lines,
                env_section=f'[env:{spec.name}]\n{env_lines}\n' if env_lines else '',
            )
        )
    return template.substitute(
        generated_for=generated_for,
        check_delay=check_delay,
        controller=controller,
        pubsub=pubsub,
        statsd='true' if stats else 'false',
        stats_line=f'stats_endpoint = {stats}' if stats else '',
        log_line=f'logoutput = {circusd_log}' if circusd_log else '',
        watchers='\n'.join(sections),
    )
