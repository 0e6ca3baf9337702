"""``aiida-zmq configure`` and ``aiida-zmq presto``: select this broker for AiiDA profiles, non-interactively.

aiida-core's own CLI only knows its own brokers (``verdi profile configure-broker`` has fixed subcommands, ``verdi
presto`` fixed choices), so this project brings the two commands a user needs. The main ``aiida-zmq`` group
(:mod:`aiida_zmq.cli`) adds them with :func:`register`; ``python -m aiida_zmq.aiida_cli`` runs them standalone.

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

__all__ = ('configure', 'presto', 'register')

LOGGER = logging.getLogger(__name__)

ENTRY_POINT = 'zmq'
PRESTO_PREFIX = 'zmq-presto'


def register(group: click.Group) -> None:
    """Add this module's commands to the main ``aiida-zmq`` group."""
    group.add_command(configure)
    group.add_command(presto)


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
def configure(
    profile_name: str | None,
    backend: str,
    data_dir: pathlib.Path | None,
    start_timeout: int | None,
    settings: tuple[str, ...],
    force: bool,
) -> None:
    """Switch the message broker of an existing PROFILE (default: the default profile), or change its options.

    A profile already on this broker keeps its options (data directory included) unless given again.
    """
    from aiida.common import exceptions

    from aiida_zmq.aiida.broker import broker_data_dir

    config = _get_config()
    try:
        profile = config.get_profile(profile_name)
    except exceptions.ProfileConfigurationError as exception:
        raise click.ClickException(str(exception))

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
    if previous == ENTRY_POINT and name != ENTRY_POINT:
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
    if previous != name:
        _warn_if_daemon_running(profile)


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
    click.echo(f'Start the daemon (and with it the broker): `verdi -p {profile.name} daemon start`.')


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


register(_standalone)

if __name__ == '__main__':
    _standalone()
