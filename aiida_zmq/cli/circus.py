"""``aiida-zmq circus-config``: the broker and its plugins as a standalone ``circusd`` configuration.

For people who run the broker outside the AiiDA daemon (a broker that outlives ``verdi daemon stop``, a broker for a
profile whose daemon runs elsewhere, or no AiiDA at all). The watchers are the ones the daemon gets
(:func:`aiida_zmq.circus.broker_watchers`), rendered from the templates shipped in ``aiida_zmq.config``.
"""

from __future__ import annotations

import os
import sys
import typing as t
from pathlib import Path

import click

from .. import discovery
from ..circus import HealthOptions, LogRotation, broker_watchers, render_ini, watcher_name
from .options import repeated, shown

if t.TYPE_CHECKING:
    from aiida.manage.configuration.profile import Profile

__all__ = ('circus_config', 'render_config')

# Endpoints of the standalone arbiter: ``circus-<role>.sock`` beside the broker's socket.
_SOCKET_ROLES = {'controller': 'c', 'pubsub': 'p', 'stats': 's'}


def _socket_endpoint(data_dir: Path, role: str, key: str) -> str:
    """Return ``ipc://DATA_DIR/circus-<role>.sock``, or a short private path when that is too long for a socket."""
    path = data_dir / f'circus-{_SOCKET_ROLES[role]}.sock'
    if len(os.fsencode(str(path))) < discovery.MAX_IPC_PATH:
        return f'ipc://{path}'
    # ``default_ipc_bind`` makes the same private short directory the broker's socket would use.
    short = discovery.default_ipc_bind(Path('/' + 'x' * discovery.MAX_IPC_PATH), key)
    assert short is not None
    return short.replace('.sock', f'-circus-{_SOCKET_ROLES[role]}.sock')


def render_config(
    name: str,
    data_dir: Path,
    *,
    key: str,
    log_dir: Path | None = None,
    controller: str | None = None,
    pubsub: str | None = None,
    stats: str | None = None,
    binds: t.Sequence[str] = (),
    serve_args: t.Sequence[str] = (),
    health: HealthOptions | None = None,
    plugins: bool = True,
    env: dict[str, str] | None = None,
    rotation: LogRotation | None = None,
) -> tuple[str, dict[str, str]]:
    """Return the ``.ini`` text for the broker ``zmq-broker-<name>`` on ``data_dir`` and the endpoints it uses."""
    data_dir = data_dir.expanduser().absolute()
    log_dir = (log_dir or data_dir / 'log').expanduser().absolute()
    endpoints = {
        'controller': controller or _socket_endpoint(data_dir, 'controller', key),
        'pubsub': pubsub or _socket_endpoint(data_dir, 'pubsub', key),
    }
    if stats is not None:
        endpoints['stats'] = stats or _socket_endpoint(data_dir, 'stats', key)
    if not binds:
        bind = discovery.default_ipc_bind(data_dir, key)
        binds = [bind] if bind else []
    specs = broker_watchers(
        name,
        str(data_dir),
        controller=endpoints['controller'],
        pubsub=endpoints['pubsub'],
        log_dir=str(log_dir),
        env=env,
        binds=binds,
        extra_args=serve_args,
        health=health,
        plugins=plugins,
        rotation=rotation,
    )
    text = render_ini(
        specs,
        controller=endpoints['controller'],
        pubsub=endpoints['pubsub'],
        stats=endpoints.get('stats'),
        circusd_log=str(log_dir / 'circusd.log'),
        generated_for=f'broker {watcher_name(name)}, data {data_dir}',
    )
    return text, endpoints


def _profile(name: str) -> Profile:
    from aiida.common.exceptions import ProfileConfigurationError
    from aiida.manage.configuration import get_config

    try:
        profile = get_config().get_profile(name)
    except ProfileConfigurationError as exception:
        raise click.BadParameter(f'{exception}; `verdi profile list` shows the profiles', param_hint='--profile')
    if profile.process_control_backend != 'zmq':
        raise click.BadParameter(
            f'profile `{name}` uses the broker `{profile.process_control_backend}`, not this one: switch it with '
            f'`aiida-zmq configure {name}` first',
            param_hint='--profile',
        )
    return profile


def _with_option(args: list[str], option: str, value: str) -> list[str]:
    """``args`` with ``option`` set to ``value``: given on the command line, it wins over the profile's."""
    if option in args:
        index = args.index(option)
        return [*args[:index], option, value, *args[index + 2 :]]
    return [*args, option, value]


@click.command('circus-config')
@click.option('-p', '--profile', 'profile_name', help='AiiDA profile whose broker to run (its data directory, name).')
@click.option(
    '--data-dir',
    type=click.Path(file_okay=False, path_type=Path),
    help="Broker data directory: standalone without AiiDA, or to override the profile's.",
)
@click.option('--name', help='Broker name without --profile (watcher zmq-broker-NAME).  [default: standalone]')
@click.option('-o', '--output', type=click.Path(dir_okay=False, path_type=Path), help='Write here, not to stdout.')
@click.option('--log-dir', type=click.Path(file_okay=False, path_type=Path), help='Logs.  [default: DATA_DIR/log]')
@click.option('--controller', help='circus controller endpoint.  [default: ipc://DATA_DIR/circus-c.sock]')
@click.option('--pubsub', help='circus pub/sub endpoint.  [default: ipc://DATA_DIR/circus-p.sock]')
@click.option('--stats', is_flag=True, help='Also run circusd-stats (stats endpoint ipc://DATA_DIR/circus-s.sock).')
@repeated('--bind', 'binds', 'ENDPOINT', 'Broker endpoint (repeatable), see `serve`.')
@click.option('--heartbeat', type=float, help='Broker heartbeat interval in seconds (see `serve`).')
@click.option('--peer-timeout', type=float, help='Seconds of client silence before its tasks go to others.')
@click.option('--no-plugins', is_flag=True, help='Only the broker: no events plugin, no health plugin.')
@shown('--health-interval', float, HealthOptions.interval, 'Seconds between health checks.')
@shown('--health-timeout', float, HealthOptions.timeout, 'Seconds a check waits.')
@shown('--health-failures', int, HealthOptions.max_failures, 'Failed checks in a row before a kill.')
@shown(
    '--log-max-bytes', click.IntRange(min=0), LogRotation.max_bytes, 'Rotate a watcher log past this size (0: never).'
)
@shown(
    '--log-backups', click.IntRange(min=0), LogRotation.backup_count, 'Rotated logs kept per watcher (NAME.log.1 ...).'
)
def circus_config(
    profile_name: str | None,
    data_dir: Path | None,
    name: str | None,
    output: Path | None,
    log_dir: Path | None,
    controller: str | None,
    pubsub: str | None,
    stats: bool,
    binds: tuple[str, ...],
    heartbeat: float | None,
    peer_timeout: float | None,
    no_plugins: bool,
    health_interval: float,
    health_timeout: float,
    health_failures: int,
    log_max_bytes: int,
    log_backups: int,
) -> None:
    """Write a circusd configuration running the broker (and its events and health plugins).

    With --profile, the broker of that AiiDA profile (which must use this broker: `aiida-zmq configure`); its clients
    find it through broker.json in its data directory. Without, a standalone broker on --data-dir. Run the result
    with `circusd FILE` (`--daemon` to detach) and look at it with `circusctl --endpoint CONTROLLER status`.
    """
    name, key, data_dir, serve_args = _which_broker(profile_name, data_dir, name)
    from ..security import make_private_dirs

    # The broker refuses a directory others can open; create it as it would (0700 whatever the umask).
    make_private_dirs(data_dir)
    if heartbeat is not None:
        serve_args = _with_option(serve_args, '--heartbeat', str(heartbeat))
    if peer_timeout is not None:
        serve_args = _with_option(serve_args, '--peer-timeout', str(peer_timeout))
    text, endpoints = render_config(
        name,
        data_dir,
        key=key,
        log_dir=log_dir,
        controller=controller,
        pubsub=pubsub,
        stats='' if stats else None,
        binds=binds,
        serve_args=serve_args,
        health=HealthOptions(interval=health_interval, timeout=health_timeout, max_failures=health_failures),
        plugins=not no_plugins,
        rotation=LogRotation(max_bytes=log_max_bytes, backup_count=log_backups),
    )
    make_private_dirs(log_dir or data_dir / 'log')
    if output is None:
        click.echo(text, nl=False)
        return
    output.write_text(text, encoding='utf-8')
    click.echo(
        f'Wrote {output}. Run it with `circusd {output}`; '
        f'`circusctl --endpoint {endpoints["controller"]} status` lists the broker {watcher_name(name)}.',
        err=True,
    )


def _which_broker(
    profile_name: str | None, data_dir: Path | None, name: str | None
) -> tuple[str, str, Path, list[str]]:
    """The broker's name, its key (for a short socket path), its data directory and its ``serve`` options: a
    profile's, as the daemon would start it, or a standalone one's."""
    if profile_name is None and data_dir is None:
        raise click.UsageError('give --profile PROFILE (an AiiDA profile) or --data-dir DIR (a standalone broker)')
    if profile_name is None:
        assert data_dir is not None
        return name or 'standalone', name or 'standalone', data_dir.expanduser().absolute(), []
    if name is not None:
        raise click.UsageError('--name is the profile name with --profile: give one of them')
    from ..aiida.broker import ZmqBroker, broker_data_dir

    profile = _profile(profile_name)
    # The profile's broker options (heartbeat, peer timeout, fsync, ...), as the daemon would start the broker.
    serve_args = ZmqBroker(profile).serve_options()
    directory = (data_dir or broker_data_dir(profile)).expanduser().absolute()
    return profile.name, str(profile.uuid).replace('-', ''), directory, serve_args


if __name__ == '__main__':
    sys.exit(circus_config())
