"""The ``aiida-zmq`` command."""

from __future__ import annotations

import logging
import sys
import typing as t

import click

from ..broker.config import DEFAULTS
from .admin import dead_letter, migrate, status, tasks
from .aiida import configure, presto
from .circus import circus_config
from .curve import curve_client
from .demo import demo
from .explain import explain, tasks_show
from .options import repeated, shown
from .repair import repair
from .store import accept_store_command
from .stores import stores
from .top import top

LOG_FORMAT = '%(asctime)s %(levelname)s %(name)s: %(message)s'
# Under circus the watcher's FileStream stamps every line already (``aiida_zmq.circus``): one time stamp is enough.
LOG_FORMAT_NO_TIME = '%(levelname)s %(name)s: %(message)s'


# The broker's tunables that ``serve`` takes as they are: the option (the field of ``BrokerConfig``, its default there)
# -> its type and help.
_POSITIVE = click.IntRange(min=1)
BIND_HELP = (
    'Endpoint to bind, repeatable: ipc://PATH or tcp://HOST:PORT (needs --curve). Default: ipc://DATA_DIR/broker.sock.'
)
TUNABLES: dict[str, tuple[t.Any, str]] = {
    '--heartbeat': (float, 'Heartbeat interval in seconds.'),
    '--peer-timeout': (float, 'Seconds of silence after which a client is dead and its tasks go to others.'),
    '--max-deliveries': (int, 'Deliveries before dead-lettering.'),
    '--max-message-bytes': (
        _POSITIVE,
        'Largest message a client may send, in bytes (all its frames together); larger ones are refused.',
    ),
    '--max-queues': (
        _POSITIVE,
        'Queues the broker holds at once; an empty queue nobody consumes gives its place to a new one.',
    ),
    '--outbound-bytes': (
        _POSITIVE,
        'Bytes waiting for a client that does not read before its broadcasts are dropped, then its session ends.',
    ),
}


def tunable(flag: str) -> t.Callable[[t.Callable[..., t.Any]], t.Callable[..., t.Any]]:
    """The option ``flag`` of :data:`TUNABLES`, its default shown."""
    kind, text = TUNABLES[flag]
    default = getattr(DEFAULTS, flag[2:].replace('-', '_'))
    return shown(flag, kind, default, text)


@click.group(context_settings={'help_option_names': ['-h', '--help']})
@click.version_option(package_name='aiida-zmq', prog_name='aiida-zmq')  # read from the metadata when asked
def main() -> None:
    """aiida-zmq: the message broker for AiiDA that needs no RabbitMQ."""


@main.command()
@click.option(
    '--data-dir',
    required=True,
    type=click.Path(file_okay=False),
    help='Directory for the task store, lock and socket (created with mode 0700).',
)
@repeated('--bind', 'binds', 'ENDPOINT', BIND_HELP)
@click.option('--curve', is_flag=True, help='CURVE-encrypt and authenticate tcp:// endpoints (keys in DATA_DIR/curve).')
@click.option('--insecure-tcp', is_flag=True, help='Allow plain tcp:// on 127.0.0.1 without CURVE (tests only).')
@tunable('--heartbeat')
@tunable('--peer-timeout')
@tunable('--max-deliveries')
@tunable('--max-message-bytes')
@tunable('--max-queues')
@tunable('--outbound-bytes')
@click.option(
    '--lock-timeout',
    type=float,
    default=DEFAULTS.lock_timeout,
    help='Seconds to wait for the data directory lock, even for a broker that serves it. Default: refuse at once, '
    'naming its pid, when a broker serves the directory; wait up to 30 s for one that is starting or shutting down.',
)
@click.option(
    '--fsync/--no-fsync',
    default=True,
    help='Default --fsync: a task is confirmed only once the disk has it (one sync per batch of the loop), so it '
    'survives a power cut. --no-fsync confirms faster, but a power cut (a crash of the machine, not of the broker) '
    'may lose confirmed tasks, maybe without the broker noticing at its next start.',
)
@click.option(
    '--task-history/--no-task-history',
    default=DEFAULTS.task_history,
    show_default=True,
    help="Keep each task's events in the store (`aiida-zmq tasks show ID`, `explain`).",
)
@click.option(
    '--log-level',
    default='INFO',
    show_default=True,
    type=click.Choice(['DEBUG', 'INFO', 'WARNING']),
    help='Least severe log lines written (to stderr).',
)
@click.option(
    '--log-time/--no-log-time',
    default=True,
    show_default=True,
    help='Start log lines with a time stamp (off when the circus watcher stamps them).',
)
def serve(
    data_dir: str,
    binds: tuple[str, ...],
    heartbeat: float,
    peer_timeout: float,
    max_deliveries: int,
    max_message_bytes: int,
    lock_timeout: float | None,
    fsync: bool,
    log_level: str,
    log_time: bool = True,
    curve: bool = False,
    insecure_tcp: bool = False,
    max_queues: int = DEFAULTS.max_queues,
    outbound_bytes: int = DEFAULTS.outbound_bytes,
    task_history: bool = DEFAULTS.task_history,
) -> None:
    """Run the broker in the foreground until SIGTERM or SIGINT."""
    from ..broker.server import Broker, BrokerConfig
    from ..exceptions import StoreError

    logging.basicConfig(level=log_level, format=LOG_FORMAT if log_time else LOG_FORMAT_NO_TIME, stream=sys.stderr)
    config = BrokerConfig(
        heartbeat=heartbeat,
        peer_timeout=peer_timeout,
        max_deliveries=max_deliveries,
        max_message_bytes=max_message_bytes,
        max_queues=max_queues,
        outbound_bytes=outbound_bytes,
        fsync=fsync,
        task_history=task_history,
        lock_timeout=lock_timeout,
        curve=curve,
        insecure_tcp=insecure_tcp,
    )
    try:
        broker = Broker(data_dir, binds, config)
        broker.serve_forever(install_signal_handlers=True)
    except (StoreError, OSError, ValueError) as exception:
        click.echo(f'aiida-zmq serve: {exception}{_os_error_hint(exception)}', err=True)
        sys.exit(2)


def _os_error_hint(exception: BaseException) -> str:
    """What to do about a file-system error at start (the broker refuses to start rather than lose tasks)."""
    import errno

    hints = {
        errno.EROFS: 'the data directory is on a read-only file system: remount it read-write or choose another '
        '--data-dir (the stored tasks are kept as they are)',
        errno.EACCES: 'this user cannot write there: fix the ownership or mode of the data directory (chmod 700)',
        errno.ENOSPC: 'the disk is full: free space on it (`df -h DATA_DIR`) and start again (stored tasks are kept)',
    }
    hint = hints.get(getattr(exception, 'errno', None) or -1)
    return f'. {hint[0].upper()}{hint[1:]}' if hint else ''


@main.command(context_settings={'ignore_unknown_options': True, 'allow_extra_args': True})
@click.pass_context
def bench(context: click.Context) -> None:
    """Run the side-by-side benchmarks (aiida-zmq, core.zeromq, RabbitMQ); options as `python -m bench.run --help`.

    The harness lives in the source checkout (`bench/`), next to this package when it is installed from one.
    """
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]  # aiida_zmq/cli/main.py -> the checkout
    if not (root / 'bench' / 'run.py').exists():
        click.echo(
            'aiida-zmq bench: the benchmark harness is in the source checkout, not in the wheel: '
            "clone the repository, `pip install '.[bench]'` there, and run `aiida-zmq bench` from that install.",
            err=True,
        )
        sys.exit(2)
    sys.exit(subprocess.call([sys.executable, '-m', 'bench.run', *context.args], cwd=root))


# Commands that need AiiDA or circus import them inside the command, so that ``aiida-zmq serve`` (the broker process)
# starts fast: importing these modules costs only click.
for _command in (
    configure,
    presto,
    status,
    tasks,
    dead_letter,
    migrate,
    curve_client,
    accept_store_command,
    stores,
    circus_config,
    demo,
    explain,
    top,
    repair,
):
    main.add_command(_command)
tasks.add_command(tasks_show)

if __name__ == '__main__':
    main()
