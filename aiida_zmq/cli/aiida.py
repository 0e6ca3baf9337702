"""``aiida-zmq configure`` and ``aiida-zmq presto``: select this broker for AiiDA profiles, non-interactively.

aiida-core's own CLI only knows its own brokers (``verdi profile configure-broker`` has fixed subcommands, ``verdi
presto`` fixed choices), so this project brings the two commands a user needs. The main ``aiida-zmq`` group
(:mod:`aiida_zmq.cli.main`) adds them; ``python -m aiida_zmq.cli.aiida`` runs them standalone.

Switching between this broker and ``core.zeromq`` (aiida-core 2.9's own ZeroMQ broker, what ``verdi presto`` sets up
without RabbitMQ) moves the profile's queued tasks too, with both brokers stopped: :mod:`aiida_zmq.cli.core_zeromq`
(``aiida-zmq migrate --from core.zeromq`` does the same by hand).

AiiDA is imported inside the commands only: ``aiida-zmq serve`` must not pay for it.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shlex
import typing as t

import click

from .options import repeated

if t.TYPE_CHECKING:
    from aiida.manage.configuration.config import Config
    from aiida.manage.configuration.profile import Profile


__all__ = ('configure', 'presto')

LOGGER = logging.getLogger(__name__)

ENTRY_POINT = 'zmq'
CORE_ZEROMQ = 'core.zeromq'
# Not ``zmq-...``: AiiDA names a profile's workers ``aiida-<profile>``, and ``aiida-zmq-...`` reads as this broker's.
PRESTO_PREFIX = 'presto-zmq'
SET_HELP = 'Set a broker option (only `--to zmq`), repeatable: peer_timeout, max_deliveries, fsync, heartbeat, codec...'


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

    fields = ZmqBroker.config_fields()
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
    from aiida_zmq.aiida.daemon import daemon_running

    if daemon_running(profile):
        click.secho(
            f'Warning: the daemon of `{profile.name}` is running {running_with}. Stop and start it '
            f'(`verdi -p {profile.name} daemon stop; verdi -p {profile.name} daemon start`) to switch.',
            fg='yellow',
            err=True,
        )


def _core_zeromq_direction(previous: str | None, name: str | None) -> str | None:
    """``in`` or ``out`` when switching from or to core.zeromq moves tasks, else ``None``."""
    from aiida_zmq.core_zeromq_move import INTO_STORE, OUT_OF_STORE

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
@repeated('--set', 'settings', 'OPTION=VALUE', SET_HELP)
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
    config = _get_config()
    profile = _load_profile(config, profile_name)
    overrides = _overrides(settings, data_dir, start_timeout)
    if overrides and backend != ENTRY_POINT:
        raise click.UsageError('--data-dir, --start-timeout and --set only apply to `--to zmq`')
    switch = _Switch.of(profile)
    switch.name, switch.config = _new_broker(backend, switch, overrides, force)
    direction = _core_zeromq_direction(switch.previous, switch.name)
    if direction is not None:
        # Tasks first, then the profile: interrupted, the profile still names the side that holds the rest, and the
        # same command finishes the move.
        _move_core_zeromq(switch, direction, dry_run)
    elif switch.previous == CORE_ZEROMQ and switch.previous != switch.name:
        _warn_unmoved_core_zeromq(switch)
    if dry_run:
        change = f'broker `{switch.previous}` -> `{switch.name}`'
        click.echo(f'Would switch profile `{profile.name}`: {change}. Nothing was changed.')
        return
    profile.set_process_controller(name=switch.name, config=switch.config)
    config.update_profile(profile)
    config.store()
    _echo_switched(switch)
    _echo_tasks_left(switch, direction)
    if switch.previous != switch.name:
        _warn_if_daemon_running(profile)


@dataclasses.dataclass
class _Switch:
    """A profile's broker before ``configure`` and the one it switches to."""

    profile: Profile
    previous: str | None
    previous_config: dict[str, t.Any]
    previous_data_dir: pathlib.Path | None  # the store of this broker, when the profile was on it
    previous_url: str | None  # the RabbitMQ server, when the profile was on one
    name: str | None = None  # the new broker's entry point, ``None`` for none
    config: dict[str, t.Any] | None = None

    @classmethod
    def of(cls, profile: Profile) -> _Switch:
        from aiida_zmq.aiida.broker import broker_data_dir

        previous = profile.process_control_backend
        return cls(
            profile,
            previous,
            dict(profile.process_control_config or {}),
            broker_data_dir(profile) if previous == ENTRY_POINT else None,
            _rabbitmq_url(profile) if previous == 'core.rabbitmq' else None,
        )


def _load_profile(config: Config, profile_name: str | None) -> Profile:
    from aiida.common import exceptions

    try:
        return config.get_profile(profile_name)
    except exceptions.ProfileConfigurationError as exception:  # bad usage (exit 2), as the docs say
        raise click.BadParameter(f'{exception}; `verdi profile list` shows the profiles', param_hint='PROFILE')


def _overrides(settings: t.Sequence[str], data_dir: pathlib.Path | None, start_timeout: int | None) -> dict[str, t.Any]:
    """The options of this broker given on the command line."""
    overrides: dict[str, t.Any] = _parse_settings(settings)
    if data_dir is not None:
        overrides['data_dir'] = str(data_dir.expanduser().absolute())
    if start_timeout is not None:
        overrides['start_timeout'] = start_timeout
    return overrides


def _new_broker(
    backend: str, switch: _Switch, overrides: dict[str, t.Any], force: bool
) -> tuple[str | None, dict[str, t.Any] | None]:
    """The entry point and configuration of the broker ``--to`` names."""
    from aiida.common import exceptions

    if backend == 'none':
        return None, None
    if backend in ('core.rabbitmq', 'rabbitmq'):
        return 'core.rabbitmq', _rabbitmq_config(force)
    if backend == ENTRY_POINT and switch.previous == ENTRY_POINT:
        # Changing options, not switching: keep what was set before (a custom data_dir above all), except options
        # an earlier release had and this one does not know.
        known = set(_broker_config(backend, {}))
        overrides = {**{k: v for k, v in switch.previous_config.items() if k in known}, **overrides}
    try:
        return backend, _broker_config(backend, overrides)
    except exceptions.EntryPointError as exception:
        raise click.ClickException(f'unknown broker `{backend}`: {exception}')


def _rabbitmq_config(force: bool) -> dict[str, t.Any]:
    from aiida.brokers.rabbitmq.defaults import detect_rabbitmq_config

    try:
        return detect_rabbitmq_config()
    except ConnectionError as exception:
        if not force:
            raise click.ClickException(f'no RabbitMQ server answered ({exception}); use --force to switch anyway')
        return _broker_config('core.rabbitmq', {})


def _move_core_zeromq(switch: _Switch, direction: str, dry_run: bool) -> None:
    """Move the profile's tasks between core.zeromq and this broker's store, as the switch goes."""
    from aiida_zmq.aiida.broker import broker_data_dir

    from .core_zeromq import echo_core_zeromq_move, move_core_zeromq_tasks

    profile = switch.profile
    if switch.name == ENTRY_POINT:
        assert switch.config is not None
        given = switch.config.get('data_dir')
        destination = pathlib.Path(given) if given else broker_data_dir(profile)
        codec = str(switch.config.get('codec') or 'hybrid')
    else:
        assert switch.previous_data_dir is not None
        destination, codec = switch.previous_data_dir, str(switch.previous_config.get('codec') or 'hybrid')
    argv = ['aiida-zmq', 'configure', profile.name] + ([] if switch.name == ENTRY_POINT else ['--to', str(switch.name)])
    report = move_core_zeromq_tasks(profile, direction, destination, codec, dry_run=dry_run, command=shlex.join(argv))
    echo_core_zeromq_move(report, profile, destination)


def _warn_unmoved_core_zeromq(switch: _Switch) -> None:
    from .core_zeromq import core_zeromq_dir

    waiting = len(core_zeromq_dir(switch.profile).task_files())
    if waiting:
        click.secho(
            f'Warning: {waiting} task(s) queued in core.zeromq are not moved to `{switch.name}`. To move them, switch '
            f'to aiida-zmq first (`aiida-zmq configure {switch.profile.name}`, which moves them), then move them on '
            'from there (`aiida-zmq migrate --to rabbitmq`, for RabbitMQ).',
            fg='yellow',
            err=True,
        )


def _echo_switched(switch: _Switch) -> None:
    """Say what the profile's broker is now, and for this broker where it keeps its tasks."""
    from aiida_zmq.aiida.broker import broker_data_dir

    profile, name = switch.profile, switch.name
    if switch.previous == name == ENTRY_POINT:
        assert switch.config is not None
        previous = switch.previous_config
        changed = {key: value for key, value in switch.config.items() if previous.get(key) != value}
        described = ', '.join(f'{key} {previous.get(key)!r} -> {value!r}' for key, value in changed.items())
        click.echo(f'Profile `{profile.name}`: broker `{name}`, ' + (described or 'options unchanged') + '.')
        if changed:
            _warn_if_daemon_running(profile, 'with the previous broker options')
    else:
        click.echo(f'Profile `{profile.name}`: broker `{switch.previous}` -> `{name}`.')
    if name == ENTRY_POINT:
        click.echo(f'Broker data directory: {broker_data_dir(profile)}')
        click.echo('The broker starts with the daemon: `verdi daemon start`.')


def _echo_tasks_left(switch: _Switch, direction: str | None) -> None:
    """Say where the tasks queued with the previous broker are, and how to move them (when the switch did not)."""
    profile, previous, name = switch.profile, switch.previous, switch.name
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
        _echo_left_in_store(switch)
    elif previous == 'core.rabbitmq' and name == ENTRY_POINT:
        # The profile no longer names the RabbitMQ server: say which one holds the tasks.
        url = f' --rabbitmq-url {shlex.quote(switch.previous_url)}' if switch.previous_url else ''
        click.echo(
            'Tasks still queued in RabbitMQ are not moved by the switch. Move them (with the daemon stopped): '
            f'`aiida-zmq migrate --from rabbitmq --profile {profile.name}{url}`'
        )


def _echo_left_in_store(switch: _Switch) -> None:
    profile = switch.profile
    click.echo(
        f'Tasks still queued in the aiida-zmq store ({switch.previous_data_dir}) are not moved to the new broker.'
    )
    store_dir = shlex.quote(str(switch.previous_data_dir))
    if switch.name == 'core.rabbitmq':
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
