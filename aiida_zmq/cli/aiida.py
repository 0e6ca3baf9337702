"""``aiida-zmq configure`` and ``aiida-zmq presto``: select this broker for AiiDA profiles, non-interactively.

aiida-core's own CLI only knows its own brokers (``verdi profile configure-broker`` has fixed subcommands, ``verdi
presto`` fixed choices), so this project brings the two commands a user needs. The main ``aiida-zmq`` group
(:mod:`aiida_zmq.cli.main`) adds them; ``python -m aiida_zmq.cli.aiida`` runs them standalone.

Switching between this broker and ``core.zeromq`` (aiida-core 2.9's own ZeroMQ broker, what ``verdi presto`` sets up
without RabbitMQ) moves the profile's queued tasks too, with both brokers stopped: :func:`move_core_zeromq_tasks`, on
:mod:`aiida_zmq.migrate` (``aiida-zmq migrate --from core.zeromq`` does the same by hand).

AiiDA is imported inside the commands only: ``aiida-zmq serve`` must not pay for it.
"""

from __future__ import annotations

import logging
import pathlib
import shlex
import typing as t

import click

if t.TYPE_CHECKING:
    from aiida.manage.configuration.config import Config
    from aiida.manage.configuration.profile import Profile

    from aiida_zmq.core_zeromq import CoreZeromqDir
    from aiida_zmq.migrate import CoreZeromqMove

__all__ = ('configure', 'core_zeromq_dir', 'echo_core_zeromq_move', 'move_core_zeromq_tasks', 'presto')

LOGGER = logging.getLogger(__name__)

ENTRY_POINT = 'zmq'
CORE_ZEROMQ = 'core.zeromq'
# Not ``zmq-...``: AiiDA names a profile's workers ``aiida-<profile>``, and ``aiida-zmq-...`` reads as this broker's.
PRESTO_PREFIX = 'presto-zmq'


def _get_config() -> Config:
    from aiida.manage.configuration import get_config

    return get_config(create=True)


def _broker_config(backend: str, overrides: dict[str, t.Any]) -> dict[str, t.Any]:
    from aiida.plugins import BrokerFactory

    config = BrokerFactory(backend).get_default_config()
    unknown = set(overrides) - set(config)
    if unknown:
        raise click.UsageError(f'broker `{backend}` has no option(s) {", ".join(sorted(unknown))}')
    config.update(overrides)
    return config


def _parse_settings(settings: t.Sequence[str]) -> dict[str, t.Any]:
    """``OPTION=VALUE`` pairs of ``configure --set``, typed as the broker's options are (see ``ZmqBroker``)."""
    from aiida_zmq.aiida.broker import ZmqBroker

    fields = {field.name: field for field in ZmqBroker._config_fields}
    parsed: dict[str, t.Any] = {}
    for setting in settings:
        key, separator, text = setting.partition('=')
        key = key.strip().replace('-', '_')
        if not separator or key not in fields:
            raise click.BadParameter(
                f'{setting!r}: give OPTION=VALUE with OPTION one of {", ".join(sorted(fields))}', param_hint='--set'
            )
        field = fields[key]
        try:
            value: t.Any = _typed(text.strip(), field.default)
        except ValueError as exception:
            raise click.BadParameter(f'{setting!r}: {exception}', param_hint='--set') from None
        if field.choices and value not in field.choices:
            raise click.BadParameter(f'{setting!r}: choose one of {", ".join(field.choices)}', param_hint='--set')
        parsed[key] = value
    return parsed


def _typed(text: str, default: t.Any) -> t.Any:
    """``text`` as a value of the type of the option's ``default``."""
    if isinstance(default, bool):
        from aiida_zmq.aiida.broker import FALSE_WORDS, TRUE_WORDS

        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise ValueError('expected true or false')
    if isinstance(default, int):
        number = int(text)
        if number < 1:
            raise ValueError('expected a whole number of at least 1')
        return number
    if isinstance(default, float):
        value = float(text)
        if value <= 0:
            raise ValueError('expected a number of seconds above 0')
        return value
    return text


def _warn_if_daemon_running(profile: Profile, running_with: str = 'with the previous broker') -> None:
    from aiida.engine.daemon.client import DaemonClient

    try:
        running = DaemonClient(profile).is_daemon_running
    except Exception:  # no daemon directory yet, unreadable PID file: nothing runs that could use the old broker
        return
    if running:
        click.secho(
            f'Warning: the daemon of `{profile.name}` is running {running_with}. Stop and start it '
            f'(`verdi -p {profile.name} daemon stop; verdi -p {profile.name} daemon start`) to switch.',
            fg='yellow',
            err=True,
        )


def _daemon_running(profile: Profile) -> bool:
    """Whether the profile's daemon runs (its circus pid file names a live arbiter)."""
    from aiida.engine.daemon.client import DaemonClient

    try:
        client = DaemonClient(profile)
        return bool(client.is_daemon_running and not client._is_pid_file_stale)
    except Exception:  # no daemon directory yet, unreadable PID file: no daemon
        return False


def core_zeromq_dir(profile: Profile) -> CoreZeromqDir:
    """core.zeromq's broker directory of a profile, where aiida-core puts it (whatever the profile's broker is now)."""
    from aiida.manage.configuration import get_config

    from aiida_zmq.core_zeromq import CoreZeromqDir

    return CoreZeromqDir(get_config().filepaths(profile)['broker_service']['dir'])


def move_core_zeromq_tasks(
    profile: Profile, direction: str, data_dir: pathlib.Path, codec: str, *, dry_run: bool, command: str
) -> CoreZeromqMove:
    """Move a profile's queued tasks from core.zeromq into the aiida-zmq store in ``data_dir`` (``direction`` ``in``)
    or back (``out``), with the profile's launch queue and ``codec``; see :mod:`aiida_zmq.migrate`.

    Refuses (a :class:`click.ClickException`, exit code 1, nothing changed) while the daemon, core.zeromq's broker or
    an aiida-zmq broker on ``data_dir`` runs, saying what to stop and to run ``command`` again. A dry run refuses
    nothing: it says what would refuse.
    """
    from aiida_zmq import migrate
    from aiida_zmq.aiida.broker import aiida_codec, launch_queue_name
    from aiida_zmq.core_zeromq import CoreZeromqRunning
    from aiida_zmq.exceptions import BrokerRunning, StoreError

    directory = core_zeromq_dir(profile)
    again = f'then run `{command}` again'
    daemon = f'the daemon of profile `{profile.name}` is running: stop it first (`verdi -p {profile.name} daemon stop`)'
    if _daemon_running(profile):
        if not dry_run:
            raise click.ClickException(f'{daemon}, {again}. Nothing was moved or changed.')
        click.secho(f'Note: {daemon}; until then the move would be refused.', fg='yellow', err=True)
    elif dry_run and (pid := directory.broker_pid()) is not None:
        stop = f'Note: the core.zeromq broker runs (pid {pid}): stop it first (`kill {pid}`).'
        click.secho(stop, fg='yellow', err=True)
    queue = launch_queue_name(profile)
    encoder, decoder = aiida_codec(codec)
    try:
        if direction == migrate.INTO_STORE:
            return migrate.import_from_core_zeromq(directory, data_dir, queue, encoder, dry_run=dry_run)
        return migrate.export_to_core_zeromq(data_dir, directory, queue, decoder, dry_run=dry_run)
    except CoreZeromqRunning as exception:
        message = str(exception).replace('PROFILE', profile.name)
        raise click.ClickException(f'{message}; {again}.')
    except BrokerRunning:
        raise click.ClickException(
            f'an aiida-zmq broker is running on {data_dir} (`aiida-zmq status --data-dir {data_dir}` shows it): stop '
            f'it first, {again}. Nothing was moved or changed.'
        )
    except StoreError as exception:
        raise click.ClickException(f'{exception}. Nothing was moved or changed.')


def echo_core_zeromq_move(report: CoreZeromqMove, profile: Profile, data_dir: pathlib.Path) -> None:
    """Say what a move from or to core.zeromq did (or would do)."""
    from aiida_zmq.migrate import INTO_STORE

    core_zeromq = f"core.zeromq's {core_zeromq_dir(profile).tasks_dir}"
    ours = f'the aiida-zmq store in {data_dir}'
    source, destination = (core_zeromq, ours) if report.direction == INTO_STORE else (ours, core_zeromq)
    verb = 'Would move' if report.dry_run else 'Moved'
    held = f', {report.processing} held by a worker when it stopped: they run again' if report.processing else ''
    if report.moved:
        click.echo(f'{verb} {report.moved} task(s) from {source} to {destination} ({report.pending} waiting{held}).')
    elif not report.finished:
        click.echo(f'{verb} 0 tasks from {source} to {destination}: there are none.')
    if report.finished:
        verb = 'Would finish' if report.dry_run else 'Finished'
        click.echo(f'{verb} the move of {report.finished} task(s) that an interrupted run had started.')
    if report.withdrawn:
        click.echo(
            f'Withdrew {report.withdrawn} copy(ies) of task(s) run by the other broker after an interrupted move '
            '(each task runs once).'
        )
    for line in report.left:
        click.secho(f'Left: {line}', fg='yellow', err=True)


def _core_zeromq_direction(previous: str | None, name: str | None) -> str | None:
    """``in`` or ``out`` when switching from or to core.zeromq moves tasks, else ``None``."""
    from aiida_zmq.migrate import INTO_STORE, OUT_OF_STORE

    if previous == CORE_ZEROMQ and name == ENTRY_POINT:
        return INTO_STORE
    if previous == ENTRY_POINT and name == CORE_ZEROMQ:
        return OUT_OF_STORE
    return None


@click.command('configure')
@click.argument('profile_name', metavar='[PROFILE]', required=False)
@click.option(
    '--to',
    'backend',
    default=ENTRY_POINT,
    show_default=True,
    help='Broker entry point to switch to: `zmq` (this broker), `core.rabbitmq`, `core.zeromq` or `none`.',
)
@click.option(
    '--data-dir',
    type=click.Path(file_okay=False, path_type=pathlib.Path),
    help='Broker data directory (only with `--to zmq`); default: inside the AiiDA configuration directory.',
)
@click.option(
    '--start-timeout', type=click.IntRange(min=1), help='Seconds a client waits for the broker (only `--to zmq`).'
)
@click.option(
    '--set',
    'settings',
    multiple=True,
    metavar='OPTION=VALUE',
    help='Set a broker option (only `--to zmq`), repeatable: peer_timeout, max_deliveries, fsync, heartbeat, codec...',
)
@click.option('--force', is_flag=True, help='Store a RabbitMQ configuration even if no RabbitMQ server answers.')
@click.option('--dry-run', is_flag=True, help='Show what would change and which tasks would move; change nothing.')
def configure(
    profile_name: str | None,
    backend: str,
    data_dir: pathlib.Path | None,
    start_timeout: int | None,
    settings: tuple[str, ...],
    force: bool,
    dry_run: bool,
) -> None:
    """Switch the message broker of an existing PROFILE (default: the default profile), or change its options.

    A profile already on this broker keeps its options (data directory included) unless given again. From
    `core.zeromq` (and back, `--to core.zeromq`) the queued tasks move with it: stop the daemon first. Safe to
    interrupt: run it again to finish, no task is lost or doubled.
    """
    from aiida.common import exceptions

    from aiida_zmq.aiida.broker import broker_data_dir

    config = _get_config()
    try:
        profile = config.get_profile(profile_name)
    except exceptions.ProfileConfigurationError as exception:  # bad usage (exit 2), as the docs say
        raise click.BadParameter(f'{exception}; `verdi profile list` shows the profiles', param_hint='PROFILE')

    overrides: dict[str, t.Any] = _parse_settings(settings)
    if data_dir is not None:
        overrides['data_dir'] = str(data_dir.expanduser().absolute())
    if start_timeout is not None:
        overrides['start_timeout'] = start_timeout
    if overrides and backend != ENTRY_POINT:
        raise click.UsageError('--data-dir, --start-timeout and --set only apply to `--to zmq`')

    previous = profile.process_control_backend
    previous_config = dict(profile.process_control_config or {})
    previous_data_dir = broker_data_dir(profile) if previous == ENTRY_POINT else None
    previous_url = _rabbitmq_url(profile) if previous == 'core.rabbitmq' else None
    broker_config: dict[str, t.Any] | None
    if backend == 'none':
        name: str | None = None
        broker_config = None
    elif backend in ('core.rabbitmq', 'rabbitmq'):
        from aiida.brokers.rabbitmq.defaults import detect_rabbitmq_config

        name = 'core.rabbitmq'
        try:
            broker_config = detect_rabbitmq_config()
        except ConnectionError as exception:
            if not force:
                raise click.ClickException(f'no RabbitMQ server answered ({exception}); use --force to switch anyway')
            broker_config = _broker_config(name, {})
    else:
        name = backend
        if name == ENTRY_POINT and previous == ENTRY_POINT:
            # Changing options, not switching: keep what was set before (a custom data_dir above all), except options
            # an earlier release had and this one does not know.
            known = set(_broker_config(name, {}))
            overrides = {**{k: v for k, v in previous_config.items() if k in known}, **overrides}
        try:
            broker_config = _broker_config(name, overrides)
        except exceptions.EntryPointError as exception:
            raise click.ClickException(f'unknown broker `{backend}`: {exception}')

    direction = _core_zeromq_direction(previous, name)
    if direction is not None:
        # Tasks first, then the profile: interrupted, the profile still names the side that holds the rest, and the
        # same command finishes the move.
        if name == ENTRY_POINT:
            assert broker_config is not None
            destination = (
                pathlib.Path(broker_config['data_dir']) if broker_config.get('data_dir') else broker_data_dir(profile)
            )
            codec = str(broker_config.get('codec') or 'hybrid')
        else:
            assert previous_data_dir is not None
            destination, codec = previous_data_dir, str(previous_config.get('codec') or 'hybrid')
        argv = ['aiida-zmq', 'configure', profile.name] + ([] if name == ENTRY_POINT else ['--to', str(name)])
        report = move_core_zeromq_tasks(
            profile, direction, destination, codec, dry_run=dry_run, command=shlex.join(argv)
        )
        echo_core_zeromq_move(report, profile, destination)
    elif previous == CORE_ZEROMQ and previous != name:
        waiting = len(core_zeromq_dir(profile).task_files())
        if waiting:
            click.secho(
                f'Warning: {waiting} task(s) queued in core.zeromq are not moved to `{name}`. To move them, switch to '
                f'aiida-zmq first (`aiida-zmq configure {profile.name}`, which moves them), then move them on from '
                'there (`aiida-zmq migrate --to rabbitmq`, for RabbitMQ).',
                fg='yellow',
                err=True,
            )
    if dry_run:
        click.echo(f'Would switch profile `{profile.name}`: broker `{previous}` -> `{name}`. Nothing was changed.')
        return

    profile.set_process_controller(name=name, config=broker_config)
    config.update_profile(profile)
    config.store()
    if previous == name == ENTRY_POINT:
        assert broker_config is not None
        changed = {key: value for key, value in broker_config.items() if previous_config.get(key) != value}
        described = ', '.join(f'{key} {previous_config.get(key)!r} -> {value!r}' for key, value in changed.items())
        click.echo(f'Profile `{profile.name}`: broker `{name}`, ' + (described or 'options unchanged') + '.')
        if changed:
            _warn_if_daemon_running(profile, 'with the previous broker options')
    else:
        click.echo(f'Profile `{profile.name}`: broker `{previous}` -> `{name}`.')
    if name == ENTRY_POINT:
        click.echo(f'Broker data directory: {broker_data_dir(profile)}')
        click.echo('The broker starts with the daemon: `verdi daemon start`.')
    if direction is not None:
        if name == ENTRY_POINT:
            # core.zeromq drops tasks under load (a full send queue, a close): their processes wait forever.
            click.echo(
                f'Processes whose task core.zeromq lost are not in its directory: `verdi -p {profile.name} process '
                'repair` finds them and queues them again (with the daemon stopped).'
            )
        else:
            click.echo('The core.zeromq broker starts with the daemon: `verdi daemon start`.')
    elif previous == ENTRY_POINT and name != ENTRY_POINT:
        click.echo(f'Tasks still queued in the aiida-zmq store ({previous_data_dir}) are not moved to the new broker.')
        store_dir = shlex.quote(str(previous_data_dir))
        if name == 'core.rabbitmq':
            # The profile no longer names the store (a custom data_dir went with the old config): say where it is.
            click.echo(
                'Move them (with the daemon stopped): '
                f'`aiida-zmq migrate --to rabbitmq --profile {profile.name} --data-dir {store_dir}`'
            )
        else:
            click.echo(
                f'To run them, switch back (`aiida-zmq configure {profile.name} --data-dir {store_dir}`) and start the '
                'daemon.'
            )
    elif previous == 'core.rabbitmq' and name == ENTRY_POINT:
        # The profile no longer names the RabbitMQ server: say which one holds the tasks.
        url = f' --rabbitmq-url {shlex.quote(previous_url)}' if previous_url else ''
        click.echo(
            'Tasks still queued in RabbitMQ are not moved by the switch. Move them (with the daemon stopped): '
            f'`aiida-zmq migrate --from rabbitmq --profile {profile.name}{url}`'
        )
    if previous != name:
        _warn_if_daemon_running(profile)


def _rabbitmq_url(profile: Profile) -> str | None:
    """The AMQP URL of a profile on RabbitMQ, for a command to print: a password other than the default ``guest``
    is replaced by ``PASSWORD`` (the terminal is no place for it)."""
    import urllib.parse

    from aiida.brokers.rabbitmq.broker import RabbitmqBroker

    try:
        url = RabbitmqBroker(profile).get_url()
    except Exception:  # an incomplete configuration: the default URL of `migrate` applies
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.password and parts.password != 'guest':
        netloc = f'{parts.username}:PASSWORD@{parts.hostname}' + (f':{parts.port}' if parts.port else '')
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


def _default_profile_name(config: Config) -> str:
    names = set(config.profile_names)
    if PRESTO_PREFIX not in names:
        return PRESTO_PREFIX
    index = 1
    while f'{PRESTO_PREFIX}-{index}' in names:
        index += 1
    return f'{PRESTO_PREFIX}-{index}'


@click.command('presto')
@click.option('-p', '--profile-name', help=f'Name of the new profile; default: `{PRESTO_PREFIX}[-N]`, unused.')
@click.option('--email', default='aiida@localhost', show_default=True, help='Email of the default user.')
@click.option('--data-dir', type=click.Path(file_okay=False, path_type=pathlib.Path), help='Broker data directory.')
@click.option('--set-default/--no-set-default', default=True, show_default=True, help='Make it the default profile.')
@click.option('--computer/--no-computer', default=True, show_default=True, help='Set up `localhost` as a computer.')
def presto(
    profile_name: str | None, email: str, data_dir: pathlib.Path | None, set_default: bool, computer: bool
) -> None:
    """Create a ready profile: SQLite storage (`core.sqlite_dos`) and this broker, like `verdi presto`."""
    profile = create_presto_profile(profile_name, email, data_dir, set_default, computer)
    click.echo(f'Start the daemon (and with it the broker): `verdi -p {profile.name} daemon start`.')


def create_presto_profile(
    profile_name: str | None, email: str, data_dir: pathlib.Path | None, set_default: bool, computer: bool
) -> Profile:
    """What `aiida-zmq presto` does, but for the advice that follows (the demo starts the daemon itself)."""
    from aiida.common import exceptions
    from aiida.manage.configuration import create_profile, load_profile

    config = _get_config()
    profile_name = profile_name or _default_profile_name(config)
    if profile_name in config.profile_names:
        raise click.BadParameter(f'the profile `{profile_name}` already exists', param_hint='--profile-name')

    overrides = {'data_dir': str(data_dir.expanduser().absolute())} if data_dir is not None else {}
    try:
        profile = create_profile(
            config,
            name=profile_name,
            email=email,
            storage_backend='core.sqlite_dos',
            storage_config={},
            broker_backend=ENTRY_POINT,
            broker_config=_broker_config(ENTRY_POINT, overrides),
        )
    except (ValueError, TypeError, exceptions.EntryPointError, exceptions.StorageMigrationError) as exception:
        raise click.ClickException(str(exception))

    # The same defaults as ``verdi presto``: a quick poll interval makes small workflows finish in seconds.
    config.set_option('runner.poll.interval', 1, scope=profile.name)
    if set_default:
        config.set_default_profile(profile.name, overwrite=True)
    config.store()
    click.echo(f'Created profile `{profile.name}` (storage core.sqlite_dos, broker {ENTRY_POINT}).')

    if computer:
        _setup_localhost(config, profile.name, load_profile)
    return profile


def _setup_localhost(config: Config, profile_name: str, load_profile: t.Callable[..., t.Any]) -> None:
    from aiida.orm import Computer

    load_profile(profile_name, allow_switch=True)
    scratch = pathlib.Path(config.dirpath) / 'scratch' / profile_name
    localhost = Computer(
        label='localhost',
        hostname='localhost',
        description='Localhost created by `aiida-zmq presto`',
        transport_type='core.local',
        scheduler_type='core.direct',
        workdir=str(scratch),
    ).store()
    localhost.configure(safe_interval=0)
    localhost.set_minimum_job_poll_interval(1)
    localhost.set_default_mpiprocs_per_machine(1)
    click.echo('Configured `localhost` as a computer.')


@click.group('aiida-zmq-aiida')
def _standalone() -> None:
    """The AiiDA profile commands of aiida-zmq (standalone, for when the main CLI is not available)."""


_standalone.add_command(configure)
_standalone.add_command(presto)

if __name__ == '__main__':
    _standalone()
