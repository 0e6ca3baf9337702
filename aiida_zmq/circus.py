"""Circus watcher definitions for the broker, and attaching them to a running arbiter.

aiida-core's daemon builds its arbiter with a fixed list of watchers (the workers, plus its own ``core.zeromq``
broker). This module adds the ``aiida-zmq-<profile>`` watcher to such a running arbiter through the controller's
``add`` command, which leaves every other watcher alone (a ``restart`` would restart AiiDA's workers too).

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

__all__ = (
    'EVENTS_PLUGIN',
    'HEALTH_PLUGIN',
    'CircusCallError',
    'CircusController',
    'HealthOptions',
    'WatcherSpec',
    'attach_broker',
    'attach_watcher',
    'broker_command',
    'broker_watcher_spec',
    'broker_watchers',
    'is_busy',
    'plugin_watcher_spec',
    'render_ini',
    'watcher_name',
)

LOGGER = logging.getLogger(__name__)

WATCHER_PREFIX = 'aiida-zmq-'
EVENTS_SUFFIX = '-events'
HEALTH_SUFFIX = '-health'
# Fully qualified names of the plugin classes (``circus.plugins.main`` resolves them in the plugin process).
EVENTS_PLUGIN = 'aiida_zmq.circus_plugins.events.BrokerEventsPlugin'
HEALTH_PLUGIN = 'aiida_zmq.circus_plugins.health.BrokerHealthPlugin'
EXTENDED_STATS_HOOK = 'aiida_zmq.circus_plugins.hooks.extended_stats'
# Seconds the broker gets after SIGTERM to commit and close before circus kills it.
GRACEFUL_TIMEOUT = 10.0
# Reasons circus gives when another command holds the arbiter's lock (``circus.util.synchronized``); retry those.
_BUSY_MARKERS = ('is already running', 'arbiter is restarting')


class CircusCallError(RuntimeError):
    """The arbiter answered with an error, or did not answer in time."""


def watcher_name(profile_name: str) -> str:
    """Return the name of the broker watcher of a profile: one broker per profile, one name per broker."""
    return f'{WATCHER_PREFIX}{profile_name}'


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
    return [python, '-c', 'import sys; from aiida_zmq.cli import main; sys.exit(main())']


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

    @property
    def cmd(self) -> str:
        return shlex.join(self.argv)

    def _stream(self) -> dict[str, t.Any]:
        return {'class': 'FileStream', 'filename': self.log_file, 'time_format': '%Y-%m-%d %H:%M:%S'}

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
        if self.log_file:
            options['stdout_stream'] = self._stream()
            options['stderr_stream'] = self._stream()
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
    )


@dataclass
class HealthOptions:
    """How the health plugin checks the broker (see ``docs/circus.md``).

    A broker is declared hung after ``max_failures`` checks in a row that got no answer to ``status`` within
    ``timeout`` seconds, counted only once the process is older than ``start_grace`` (recovering a large store takes a
    while). The worst-case detection time is about ``max_failures * (interval + timeout)``.
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
) -> WatcherSpec:
    """Return a watcher that runs the circus plugin class ``plugin`` (a fully qualified name).

    This is the command circus 0.19 itself builds for a ``[plugin:NAME]`` section (``circus.plugins.get_plugin_cmd``),
    so a plugin can be added to a running arbiter with ``add`` like any watcher, and written to an ``.ini`` the same
    way. The plugin's configuration travels as ``key:value:::key:value`` (``circus.plugins._str2cfg``).
    """
    for key, value in config.items():
        if ':::' in key or ':' in key or ':::' in value:
            raise ValueError(f'plugin option {key}={value!r} cannot be passed to circus (no ":" in keys, no ":::")')
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
) -> list[WatcherSpec]:
    """Return the watchers of a profile's broker: the broker, its events plugin and its health plugin.

    The same list goes to a running arbiter (:func:`attach_broker`) and into a standalone ``.ini``
    (``aiida-zmq circus-config``). Logs: ``LOG_DIR/aiida-zmq-<profile>[-events|-health].log``.
    """
    broker = watcher_name(profile_name)

    def log(name: str) -> str | None:
        return os.path.join(log_dir, f'{name}.log') if log_dir else None

    specs = [
        broker_watcher_spec(
            profile_name,
            data_dir,
            log_file=log(broker),
            env=env,
            binds=binds,
            extra_args=extra_args,
            python=python,
        )
    ]
    if not plugins:
        return specs
    common = {'data_dir': data_dir, 'broker_watcher': broker}
    specs.append(
        plugin_watcher_spec(
            broker + EVENTS_SUFFIX,
            EVENTS_PLUGIN,
            controller=controller,
            pubsub=pubsub,
            config=common,
            log_file=log(broker + EVENTS_SUFFIX),
            env=env,
            python=python,
            working_dir=data_dir,
        )
    )
    specs.append(
        plugin_watcher_spec(
            broker + HEALTH_SUFFIX,
            HEALTH_PLUGIN,
            controller=controller,
            pubsub=pubsub,
            config={**common, **(health or HealthOptions()).config()},
            log_file=log(broker + HEALTH_SUFFIX),
            env=env,
            python=python,
            working_dir=data_dir,
        )
    )
    return specs


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


def is_busy(exception: CircusCallError) -> bool:
    """Whether circus refused a command only because another exclusive command runs: worth retrying."""
    return any(marker in str(exception) for marker in _BUSY_MARKERS)


def attach_watcher(endpoint: str, spec: WatcherSpec, *, timeout: float = 30.0, call_timeout: float = 5.0) -> str:
    """Make sure the arbiter at ``endpoint`` runs the watcher ``spec``; return what was done.

    Idempotent: ``'exists'`` when the watcher is there and not stopped, ``'started'`` when it was there but stopped
    (e.g. circus gave up after ``max_retry`` respawns), ``'added'`` when it was created. Several processes may race
    (every daemon worker calls this when it boots): the loser of an ``add`` sees "already exist" and reports
    ``'exists'``. While the arbiter is busy with another exclusive command (it starts the workers one after another
    during ``verdi daemon start``) the call is retried until ``timeout``.

    :raises CircusCallError: on any other error, or when the arbiter stayed busy or unreachable past ``timeout``.
    """
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            with CircusController(endpoint, timeout=call_timeout) as controller:
                return _attach_once(controller, spec)
        except CircusCallError as exception:
            if not is_busy(exception) or time.monotonic() + delay > deadline:
                raise
            LOGGER.debug('arbiter busy, retrying to attach %s in %.2fs: %s', spec.name, delay, exception)
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _attach_once(controller: CircusController, spec: WatcherSpec) -> str:
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
        pubsub = _call_retrying(controller_endpoint, lambda c: c.global_options(), deadline).get('pubsub_endpoint', '')
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


def _call_retrying(
    endpoint: str, call: t.Callable[[CircusController], dict[str, t.Any]], deadline: float
) -> dict[str, t.Any]:
    delay = 0.05
    while True:
        try:
            with CircusController(endpoint) as controller:
                return call(controller)
        except CircusCallError as exception:
            if not is_busy(exception) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


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
        sections.append(
            watcher_template.substitute(
                name=spec.name,
                cmd=spec.cmd,
                working_dir=spec.working_dir or os.getcwd(),
                graceful_timeout=spec.graceful_timeout,
                log_file=spec.log_file or '/dev/null',
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
