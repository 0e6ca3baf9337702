"""``aiida-zmq status``, ``tasks ...`` and ``dead-letter ...``: look at a broker and its stored tasks, and act on them.

Every command finds its broker the same way (:func:`broker_options`): ``--endpoint``, else ``--data-dir``, else the
AiiDA profile given with ``--profile`` (default: the default profile). With a broker running they talk to it through
ADMIN requests (``docs/protocol.md``), so they see what the broker sees and change nothing behind its back. With the
broker stopped (the daemon stopped) they work on its store, under its lock (:func:`aiida_zmq.store.stopped_store`),
as ``migrate``, ``submit()`` and ``verdi process repair`` do: a broker that starts meanwhile waits for them.

Exit codes: 0 done, 1 refused or failed (for ``status``: a broker runs but does not answer), 2 bad usage (click),
3 no broker is running (and no store to work on).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import shutil
import sqlite3
import sys
import time
import typing as t
from collections.abc import Iterator
from pathlib import Path

import click

from ..names import printable

if t.TYPE_CHECKING:
    from ..store import TaskStore

__all__ = ('dead_letter', 'migrate', 'status', 'tasks')

EXIT_REFUSED = 1
EXIT_NOT_RUNNING = 3
# The name of this command's own session: left out of the client list it shows.
CLIENT_NAME = 'aiida-zmq-cli'
JSON_HELP = 'Print the answer as JSON (the same fields as the ADMIN answer, docs/protocol.md).'


class Target(t.NamedTuple):
    """Where a broker is, and how to name it in messages."""

    endpoint: str | None
    data_dir: Path | None
    label: str
    start_hint: str
    profile: t.Any = None  # the AiiDA profile, when the target was given as one


def broker_options(command: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
    """Add ``--endpoint``, ``--data-dir`` and ``--profile``, resolved into a ``target`` argument."""
    return target_options(
        command,
        _resolve,
        endpoint='The broker endpoint, e.g. ipc:///path/broker.sock.',
        data_dir='The broker data directory (`serve --data-dir`).',
        profile='An AiiDA profile using this broker.',
    )


def target_options(
    command: t.Callable[..., t.Any],
    resolve: t.Callable[[str | None, str | None, str | None], Target],
    *,
    endpoint: str,
    data_dir: str,
    profile: str,
) -> t.Callable[..., t.Any]:
    """Add ``--endpoint``, ``--data-dir`` and ``--profile`` (with these helps), passed to ``command`` as the
    ``target`` that ``resolve(endpoint, data_dir, profile_name)`` makes of them."""

    @click.option('--endpoint', metavar='ENDPOINT', help=endpoint)
    @click.option('--data-dir', type=click.Path(file_okay=False), help=data_dir)
    @click.option('-p', '--profile', 'profile_name', metavar='PROFILE', help=profile)
    @functools.wraps(command)
    def wrapper(endpoint: str | None, data_dir: str | None, profile_name: str | None, **kwargs: t.Any) -> t.Any:
        return command(target=resolve(endpoint, data_dir, profile_name), **kwargs)

    return wrapper


def _resolve(endpoint: str | None, data_dir: str | None, profile_name: str | None) -> Target:
    return _explicit_target(endpoint, data_dir) or profile_target(profile_name)


def _explicit_target(endpoint: str | None, data_dir: str | None, profile: t.Any = None) -> Target | None:
    """The target given by ``--endpoint`` or ``--data-dir``, if either was given."""
    if endpoint:
        return Target(endpoint, None, endpoint, f'start the broker that should listen at {endpoint}', profile)
    if data_dir:
        path = Path(os.path.expanduser(data_dir)).absolute()
        return Target(None, path, str(path), f'start it with `aiida-zmq serve --data-dir {path}`', profile)
    return None


def _load_profile(profile_name: str | None, what_else: str) -> t.Any:
    """The AiiDA profile named (default: the default one); a usage error saying ``what_else`` to give otherwise."""
    try:
        from aiida.manage.configuration import get_config

        config = get_config(create=False)
        return config.get_profile(profile_name) if profile_name else config.get_profile(config.default_profile_name)
    except Exception as exception:
        if profile_name:  # the profile given does not exist: say which there are, not to give one
            hint = f'`verdi profile list` shows the profiles; or give {what_else.replace("--profile, ", "")}'
            raise click.UsageError(f'there is no AiiDA profile `{profile_name}` ({exception}); {hint}.') from None
        raise click.UsageError(f'there is no default AiiDA profile ({exception}). Give {what_else}.') from None


def profile_target(profile_name: str | None) -> Target:
    profile = _load_profile(profile_name, '--profile, --data-dir or --endpoint')
    if profile.process_control_backend != 'zmq':
        raise click.UsageError(
            f'profile `{profile.name}` uses the broker `{profile.process_control_backend}`, not aiida-zmq: '
            f'switch it with `aiida-zmq configure {profile.name}`.'
        )
    from ..aiida.broker import broker_data_dir

    return Target(
        None,
        broker_data_dir(profile),
        f'profile {profile.name}',
        'start it with `verdi daemon start` (it starts the broker)',
        profile,
    )


def _open(target: Target, **options: t.Any) -> t.Any:
    """Connect to the broker; raises ``BrokerUnavailable`` (or ``ValueError`` for a bad endpoint)."""
    import aiida_zmq
    from aiida_zmq.exceptions import UnsafePath

    options = {'connect_timeout': 3.0, 'name': CLIENT_NAME, **options}
    try:
        if target.endpoint:
            return aiida_zmq.connect(target.endpoint, **options)
        return aiida_zmq.connect(data_dir=target.data_dir, **options)
    except UnsafePath as exception:  # a socket another user controls: not to be talked to, whatever answers there
        click.echo(f'aiida-zmq: refusing to connect to the broker for {target.label}: {exception}.', err=True)
        sys.exit(EXIT_REFUSED)


def connect_broker(target: Target, **options: t.Any) -> t.Any:
    """Connect to the broker, or exit with code 3 and a line saying what to run."""
    from aiida_zmq.exceptions import BrokerUnavailable

    try:
        return _open(target, **options)
    except (BrokerUnavailable, ValueError) as exception:
        click.echo(f'aiida-zmq: no broker is running for {target.label}: {target.start_hint}.', err=True)
        click.echo(f'  ({exception})', err=True)
        sys.exit(EXIT_NOT_RUNNING)


def ask_broker(target: Target, op: str, **arguments: t.Any) -> dict[str, t.Any]:
    from aiida_zmq.exceptions import AdminError

    communicator = connect_broker(target)
    try:
        return communicator.admin(op, timeout=30.0, **arguments)
    except (AdminError, TimeoutError) as exception:
        click.echo(f'aiida-zmq: the broker refused `{op}`: {exception}', err=True)
        sys.exit(EXIT_REFUSED)
    finally:
        communicator.close()


# The broker stopped: its store ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _stopped_store(target: Target, *, quiet: bool = False) -> Iterator[TaskStore | None]:
    """The store of the target's broker when that broker is not running (under its lock), ``None`` when there is no
    store yet; raises :class:`~aiida_zmq.exceptions.BrokerRunning` when a broker holds it (then ask the broker)."""
    from ..exceptions import StoreError
    from ..store import stopped_store

    if target.data_dir is None:  # only an endpoint: no store to work on, so ask the broker
        from ..exceptions import BrokerRunning

        raise BrokerRunning(f'{target.label} is an endpoint')
    try:
        with stopped_store(target.data_dir) as store:
            if not quiet:
                what = f'working on its store in {target.data_dir}' if store else 'it has no task store yet'
                click.echo(f'aiida-zmq: no broker is running for {target.label}: {what}.', err=True)
            yield store
    except (StoreError, OSError, sqlite3.Error) as exception:
        click.echo(f'aiida-zmq: cannot work on the store of {target.label}: {exception}', err=True)
        sys.exit(EXIT_REFUSED)


def run_operation(target: Target, op: str, *, quiet: bool = False, **arguments: t.Any) -> dict[str, t.Any]:
    """Do an ADMIN operation: on the store of a stopped broker, else through the running broker.

    The store comes first because only its lock says for sure that no broker runs; holding it, no broker can start
    and change the store behind this command's back.
    """
    from ..broker import admin as admin_operations
    from ..exceptions import BrokerRunning

    try:
        with _stopped_store(target, quiet=quiet) as store:
            # The broker's own operation, on the stopped store (the same answers, so the commands print the same).
            return admin_operations.run_stopped(op, store, **arguments)
    except BrokerRunning:
        return ask_broker(target, op, **arguments)


def _emitted(rows: list[t.Any], as_json: bool, nothing: str) -> bool:
    """Print ``rows`` as JSON, or ``nothing`` when there are none; whether that was all there is to print."""
    if as_json:
        emit_json(rows)
        return True
    if not rows:
        click.echo(nothing)
        return True
    return False


def emit_json(value: t.Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def human_size(count: float) -> str:
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if count < 1024 or unit == 'GiB':
            return f'{count:.0f} {unit}' if unit == 'B' else f'{count:.1f} {unit}'
        count /= 1024
    return f'{count:.1f} GiB'


def plural(count: int, what: str = 'task') -> str:
    """``1 task``, ``3 tasks``: the counts every message of these commands prints."""
    return f'{count} {what}' if count == 1 else f'{count} {what}s'


def _stored_depths(target: Target) -> tuple[dict[str, int] | None, str | None]:
    """(tasks waiting in the store of a stopped broker by queue, why they could not be read), read under its lock."""
    from ..exceptions import BrokerRunning, StoreError
    from ..store import stopped_store

    if target.data_dir is None:
        return None, None
    try:
        with stopped_store(target.data_dir) as store:
            if store is None:
                return None, None
            counts = store.ready_counts()
            for task in store.load_delivered():  # handed out when the broker stopped: delivered again at its start
                counts[task.queue] = counts.get(task.queue, 0) + 1
            return counts, None
    except BrokerRunning:
        return None, 'another process holds the store (a broker starting, stopped with SIGSTOP, or hung?)'
    except (StoreError, OSError) as exception:
        return None, str(exception)


# The arbiter ------------------------------------------------------------------------------------------------------


def _daemon_controller(profile: t.Any) -> str | None:
    """The controller endpoint of a profile's running daemon, else ``None``.

    ``DaemonClient.get_controller_endpoint`` makes a new socket directory when it thinks the daemon is not running,
    so it is asked only once the pid file says the daemon runs (as ``ZmqBroker`` does).
    """
    from ..aiida.daemon import running_daemon_client

    client = running_daemon_client(profile)
    try:
        return str(client.get_controller_endpoint()) if client is not None else None
    except Exception:  # no daemon to speak of: nothing to show
        return None


def _circusctl() -> str:
    """``circusctl``, as the user can run it: by name when it is on PATH, else beside this interpreter."""
    beside = Path(sys.executable).parent / 'circusctl'
    if shutil.which('circusctl') or not beside.exists():
        return 'circusctl'
    return str(beside)


def _circus_info(target: Target, broker_pid: int | None) -> dict[str, t.Any] | None:
    """The circus arbiter that runs the broker: its controller endpoint, the broker's watcher and its status, and the
    ``circusctl`` line to paste; ``None`` when no arbiter runs it (``aiida-zmq serve`` in a terminal).

    Asked first: the arbiter whose endpoint is in the broker process's environment (the watcher sets it, daemon and
    ``circus-config`` alike); then, for a profile, its daemon's arbiter (also when the broker is not running).
    """
    from ..circus import (
        CircusCallError,
        CircusController,
        arbiter_endpoint_of,
        missing_control_socket,
        watcher_name,
        watcher_of_pid,
    )

    candidates = []
    if broker_pid:
        candidates.append(arbiter_endpoint_of(broker_pid))
    if target.profile is not None:
        candidates.append(_daemon_controller(target.profile))
    for endpoint in dict.fromkeys(endpoint for endpoint in candidates if endpoint):
        missing = missing_control_socket(endpoint)
        if missing is not None:
            if target.profile is not None:
                from aiida.engine.daemon.client import DaemonClient

                from ..aiida.broker import unreachable_daemon_message

                pid = DaemonClient(target.profile).get_daemon_pid()
                return {
                    'endpoint': endpoint,
                    'watcher': None,
                    'status': None,
                    'circusctl': None,
                    'unreachable': unreachable_daemon_message(target.profile.name, pid, missing),
                }
            continue
        try:
            with CircusController(endpoint, timeout=2.0) as controller:
                watcher = watcher_of_pid(controller, broker_pid) if broker_pid else None
                if watcher is None and target.profile is not None:
                    watcher = watcher_name(target.profile.name)
                if watcher is None:
                    continue
                watcher_status = controller.watcher_status(watcher)
        except CircusCallError:
            continue
        return {
            'endpoint': endpoint,
            'watcher': watcher,
            'status': watcher_status,
            'circusctl': f'{_circusctl()} --endpoint {shlex.quote(endpoint)} status',
        }
    return None


def _print_circus(circus: dict[str, t.Any] | None) -> None:
    if circus is None:
        return
    if circus.get('unreachable'):
        click.echo(f'  circus     {circus["unreachable"]}')
        return
    state = circus['status'] or 'not in this arbiter (it is added when a daemon worker starts)'
    click.echo(f'  circus     watcher {circus["watcher"]}: {state}; arbiter {circus["endpoint"]}')
    click.echo(f'             {circus["circusctl"]}')


# status -----------------------------------------------------------------------------------------------------------


@click.command()
@broker_options
@click.option('--json', 'as_json', is_flag=True, help=JSON_HELP)
def status(target: Target, as_json: bool) -> None:
    """Show whether the broker runs, its queues, consumers, dead letters and store, and the circus arbiter it runs in.

    Exit code 3 when no broker is running (the queues stored on disk are shown all the same).
    """
    from aiida_zmq.exceptions import BrokerUnavailable

    try:
        communicator = _open(target)
    except (BrokerUnavailable, ValueError) as exception:
        _exit_if_silent(target, as_json)
        depths, unread = _stored_depths(target)
        circus = _circus_info(target, None)
        if as_json:
            report = {'running': False, 'target': target.label, 'error': str(exception), 'stored': depths}
            emit_json({**report, 'store_unread': unread, 'circus': circus})
        else:
            click.secho(f'aiida-zmq broker for {target.label}: not running', fg='red', bold=True)
            click.echo(f'  {target.start_hint}')
            if depths:
                waiting = ', '.join(f'{printable(q)} {n}' for q, n in sorted(depths.items()))
                click.echo('  tasks waiting in its store: ' + waiting)
            if unread:
                click.echo(f'  its store was not read: {unread}')
            _print_circus(circus)
        sys.exit(EXIT_NOT_RUNNING)
    try:
        started = time.perf_counter()
        answer = communicator.admin('status', timeout=10.0)
        answer['round_trip_ms'] = round((time.perf_counter() - started) * 1000, 3)
    finally:
        communicator.close()
    answer['running'] = True
    # This command's own session is part of the broker's answer; it is not a user of the broker.
    answer['clients'] = [client for client in answer['clients'] if client['name'] != CLIENT_NAME]
    answer['circus'] = _circus_info(target, answer.get('pid'))
    if as_json:
        emit_json(answer)
        return
    _print_status(answer)


def _exit_if_silent(target: Target, as_json: bool) -> None:
    """A broker that runs but did not answer is not "not running": say which process, in what state (exit 1)."""
    from ..discovery import silent_broker

    info = silent_broker(target.data_dir, target.endpoint)
    if info is None:
        return
    pid, state = info['pid'], info['process_state']
    if as_json:
        emit_json({'running': True, 'answering': False, 'pid': pid, 'process_state': state, 'target': target.label})
        sys.exit(EXIT_REFUSED)
    hint = {
        'stopped': f'it is stopped (SIGSTOP, or a suspended terminal job?): `kill -CONT {pid}`',
        'tracing-stop': 'a debugger holds it',
        'disk-sleep': 'it waits for its disk (a hung or very slow file system?)',
    }.get(state, f'it is {state}: busy or hung? See its log; `kill {pid}` stops it, a daemon restarts it')
    click.secho(f'aiida-zmq broker for {target.label}: running but not answering (pid {pid})', fg='yellow', bold=True)
    click.echo(f'  {hint}')
    sys.exit(EXIT_REFUSED)


def _print_status(answer: dict[str, t.Any]) -> None:
    uptime = int(answer['uptime'])
    click.secho(f'aiida-zmq broker {answer["version"]}: running', fg='green', bold=True)
    up = f'{uptime // 3600}h{uptime // 60 % 60:02d}m{uptime % 60:02d}s'
    click.echo(f'  pid {answer["pid"]}, up {up}, epoch {answer["epoch"]}')
    click.echo(f'  endpoints  {", ".join(answer["endpoints"])}')
    click.echo(f'  data dir   {answer["data_dir"]} (store {human_size(answer["store_bytes"])})')
    fault = answer.get('store_fault')
    if fault:  # the broker runs, but cannot write its store: it refuses new tasks and keeps what it holds
        since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(fault['since']))
        click.secho(f'  store      {fault["kind"].upper()} since {since}: {fault["error"]}', fg='red', bold=True)
        click.echo(
            f'             new tasks are refused, the others kept; it tries again in {fault["retry_in"]:g} s. '
            f'Free space (df -h {answer["data_dir"]}): it goes on by itself'
        )
    click.echo(f'  round trip {answer["round_trip_ms"]:.2f} ms')
    _print_circus(answer.get('circus'))
    settings = answer.get('settings')
    if settings:  # a broker of an earlier release does not report them
        click.echo(
            f'  settings   heartbeat {settings["heartbeat"]:g} s, peer timeout {settings["peer_timeout"]:g} s, '
            f'{settings["max_deliveries"]} deliveries before dead-lettering, '
            f'fsync {"on" if settings["fsync"] else "off (--no-fsync: survives crashes, not power cuts)"}'
        )
    # Names are printed escaped (aiida_zmq.names): a store written before names were checked may hold any.
    queues, more_queues = answer['queues'], answer.get('queues_not_listed', 0)
    click.echo(f'  queues     {len(queues) + more_queues}' + ('' if queues else ' (none yet)'))
    for name, queue in sorted(queues.items()):
        click.echo(f'    {printable(name)}: {queue["depth"]} waiting, {plural(queue["consumers"], "consumer")}')
    if more_queues:
        click.echo(f'    ... and {more_queues} more (the deepest are listed)')
    clients, more_clients = answer['clients'], answer.get('clients_not_listed', 0)
    click.echo(f'  clients    {len(clients) + more_clients}')
    for client in clients:
        prefetch = (
            ', '.join(f'{printable(q)} prefetch {p or "unlimited"}' for q, p in client['prefetch'].items())
            or 'no queue'
        )
        name = printable(client['name'])
        click.echo(f'    {name} (pid {client["pid"]}): {plural(client["held"])} in flight; {prefetch}')
    if more_clients:
        click.echo(f'    ... and {more_clients} more (those holding the most are listed)')
    stats = answer.get('stats', {})
    if stats:
        click.echo('  counters   ' + ', '.join(f'{key} {value}' for key, value in sorted(stats.items())))
    dead = answer['dead_letters']
    line = f'  dead letters {dead}'
    click.secho(line + ('  (see `aiida-zmq dead-letter list`)' if dead else ''), fg='yellow' if dead else None)


# tasks ------------------------------------------------------------------------------------------------------------


@click.group()
def tasks() -> None:
    """List the stored tasks, purge a queue, or take tasks back from a hung process.

    `list` and `purge` also work with the broker stopped, on its store.
    """


@tasks.command('list')
@broker_options
@click.option('--queue', help='Only this queue.')
@click.option('--limit', type=click.IntRange(min=0), default=100, show_default=True, help='Show at most this many.')
@click.option('--json', 'as_json', is_flag=True, help=JSON_HELP)
def tasks_list(target: Target, queue: str | None, limit: int, as_json: bool) -> None:
    """List stored tasks, oldest first (id, queue, state, deliveries, size, the process each is for and, for a
    profile, that process's state in AiiDA; never the payload)."""
    rows = run_operation(target, 'tasks', queue=queue, limit=limit)['tasks']
    states = _process_states(target, [row['process'] for row in rows if row.get('process') is not None])
    if states is not None:
        for row in rows:
            row['process_state'] = states.get(row.get('process'))  # None: no such process in the profile
    if _emitted(rows, as_json, 'No stored tasks.' if queue is None else f'No stored tasks in queue {queue}.'):
        return
    click.echo(
        f'{"id":>8}  {"state":<9} {"deliveries":>10} {"bytes":>8}  {"age":>8}  {"process":>8}  '
        + ('process state'.ljust(20) + '  ' if states is not None else '')
        + 'queue'
    )
    now = time.time()
    for row in rows:
        age = f'{now - row["created"]:.0f}s'
        pk = '-' if row.get('process') is None else str(row['process'])
        state = ''
        if states is not None:
            state = (row['process_state'] or ('not in profile' if row.get('process') else '-')).ljust(20) + '  '
        click.echo(
            f'{row["id"]:>8}  {row["state"]:<9} {row["attempts"]:>10} {row["bytes"]:>8}  {age:>8}  {pk:>8}  '
            f'{state}{printable(row["queue"])}'
        )


def _process_states(target: Target, pks: list[int]) -> dict[int, str] | None:
    """The AiiDA state of each process (as `verdi process list` shows it) when the target is a profile whose storage
    can be read; ``None`` otherwise (said on stderr when the storage could not be read)."""
    if target.profile is None or not pks:
        return None if target.profile is None else {}
    try:
        from ..aiida.processes import load_storage, process_states

        load_storage(target.profile)
        return process_states(pks)
    except Exception as exception:  # any storage failure (migration needed, database down): the broker's view only
        click.echo(f'aiida-zmq: cannot read the storage of {target.label}, no process states: {exception}', err=True)
        return None


@tasks.command('purge')
@broker_options
@click.argument('queue')
@click.option('--yes', is_flag=True, help='Do not ask for confirmation.')
@click.option('--json', 'as_json', is_flag=True, help=JSON_HELP)
def tasks_purge(target: Target, queue: str, yes: bool, as_json: bool) -> None:
    """Delete the waiting tasks of QUEUE (tasks a consumer holds stay). This cannot be undone."""
    if not yes:
        click.confirm(f'Delete every waiting task of queue {queue}?', abort=True)
    answer = run_operation(target, 'tasks-purge', queue=queue)
    emit_json(answer) if as_json else click.echo(f'Purged {plural(answer["purged"], "waiting task")} of {queue}.')


def _process_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@tasks.command('requeue')
@broker_options
@click.option('--pid', type=int, required=True, help='The process whose held tasks go back to their queues.')
@click.option('--force', is_flag=True, help='Also when that process still runs (it may run the tasks a second time).')
@click.option('--json', 'as_json', is_flag=True, help=JSON_HELP)
def tasks_requeue(target: Target, pid: int, force: bool, as_json: bool) -> None:
    """Give the tasks held by process PID to other consumers now.

    For a worker that is gone (the broker would notice within its peer timeout anyway; circus's events plugin at
    once). A process that still runs goes on with its tasks while another worker starts them again: AiiDA runs each
    process twice, and one of them fails. So a live PID is refused: stop or kill it first, then requeue (or let the
    broker notice). --force requeues all the same, for a process you know does nothing with its tasks any more; its
    sessions end, and if its communicator comes back, its late answers are refused.
    """
    if _process_alive(pid) and not force:
        click.echo(
            f'aiida-zmq: process {pid} is still running: its tasks would run twice (it goes on with them while '
            f'another worker starts them again). Stop it first (`kill {pid}`; its tasks go back to their queues when '
            'it exits), or give --force if it is hung and will not touch them again.',
            err=True,
        )
        sys.exit(EXIT_REFUSED)
    answer = ask_broker(target, 'peer-gone', pid=pid)
    if as_json:
        emit_json(answer)
    else:
        click.echo(
            f'Requeued {plural(answer["requeued"])} held by {plural(answer["clients"], "session")} of process {pid}.'
        )


# dead letters -----------------------------------------------------------------------------------------------------


@click.group('dead-letter')
def dead_letter() -> None:
    """Tasks delivered too often without an answer: list them, send them again, or drop them.

    Each also works with the broker stopped, on its store.
    """


@dead_letter.command('list')
@broker_options
@click.option('--queue', help='Only this queue.')
@click.option('--json', 'as_json', is_flag=True, help=JSON_HELP)
def dead_letter_list(target: Target, queue: str | None, as_json: bool) -> None:
    """List dead-lettered tasks with the reason."""
    letters = run_operation(target, 'dead-letters', queue=queue)['dead_letters']
    if _emitted(letters, as_json, 'No dead letters.' if queue is None else f'No dead letters in queue {queue}.'):
        return
    for letter in letters:
        click.echo(f'{letter["id"]:>8}  {printable(letter["queue"])}  {printable(letter["reason"] or "")}')


def _ids(ids: tuple[int, ...], all_: bool) -> list[int] | None:
    if bool(ids) == all_:
        raise click.UsageError('give task ids, or --all')
    return None if all_ else list(ids)


@dead_letter.command('requeue')
@broker_options
@click.argument('ids', nargs=-1, type=int)
@click.option('--all', 'all_', is_flag=True, help='Every dead letter.')
@click.option('--json', 'as_json', is_flag=True, help=JSON_HELP)
def dead_letter_requeue(target: Target, ids: tuple[int, ...], all_: bool, as_json: bool) -> None:
    """Put dead-lettered tasks back in their queues with a fresh delivery count."""
    answer = run_operation(target, 'dead-letters-requeue', ids=_ids(ids, all_))
    emit_json(answer) if as_json else click.echo(f'Requeued {plural(answer["requeued"])}.')


@dead_letter.command('drop')
@broker_options
@click.argument('ids', nargs=-1, type=int)
@click.option('--all', 'all_', is_flag=True, help='Every dead letter.')
@click.option('--yes', is_flag=True, help='Do not ask for confirmation.')
@click.option('--json', 'as_json', is_flag=True, help=JSON_HELP)
def dead_letter_drop(target: Target, ids: tuple[int, ...], all_: bool, yes: bool, as_json: bool) -> None:
    """Delete dead-lettered tasks for good."""
    selection = _ids(ids, all_)
    if not yes:
        # Counted first, asked without holding anything (a broker that starts meanwhile must not wait for an answer).
        letters = run_operation(target, 'dead-letters', quiet=True)['dead_letters']
        chosen = [letter for letter in letters if selection is None or letter['id'] in selection]
        if not chosen:
            which = '' if selection is None else f' with id {", ".join(map(str, selection))}'
            emit_json({'dropped': 0}) if as_json else click.echo(f'No dead letters{which} to drop.')
            return
        count = plural(len(chosen), 'dead-lettered task')
        click.confirm(f'Delete {"all " if selection is None else ""}{count} for good?', abort=True)
    answer = run_operation(target, 'dead-letters-drop', ids=selection)
    emit_json(answer) if as_json else click.echo(f'Dropped {plural(answer["dropped"])}.')


# migrate ----------------------------------------------------------------------------------------------------------

DEFAULT_RABBITMQ_URL = 'amqp://guest:guest@127.0.0.1:5672/'
# The profile brokers ``migrate --profile`` works with: this one, RabbitMQ once the profile was switched to it
# (``aiida-zmq configure P --to core.rabbitmq`` before the move: its tasks are still in the aiida-zmq store), and
# core.zeromq (``migrate --from core.zeromq`` before switching by hand).
MIGRATE_BACKENDS = ('zmq', 'core.rabbitmq', 'core.zeromq')
MIGRATE_SERVERS = ('rabbitmq', 'core.zeromq')


def migrate_options(command: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
    """``--endpoint``/``--data-dir``/``--profile`` for ``migrate``: unlike :func:`broker_options`, a profile can be
    given together with ``--data-dir`` (its queue, prefix and codec; the store where ``--data-dir`` says)."""
    return target_options(
        command,
        _migration_target,
        endpoint='The endpoint of a running broker, e.g. ipc:///path/broker.sock.',
        data_dir="The broker data directory (default for a profile: its broker's; `aiida-zmq configure` prints it).",
        profile='The AiiDA profile whose tasks move.',
    )


def _migration_target(endpoint: str | None, data_dir: str | None, profile_name: str | None) -> Target:
    profile = _migration_profile(profile_name) if profile_name or not (endpoint or data_dir) else None
    explicit = _explicit_target(endpoint, data_dir, profile)
    if explicit is not None:
        return explicit
    from ..aiida.broker import broker_data_dir

    assert profile is not None  # neither --endpoint nor --data-dir: the profile was loaded above
    # A profile switched to RabbitMQ has no ``data_dir`` any more: this is the default one (else give --data-dir).
    path = broker_data_dir(profile)
    return Target(None, path, f'profile {profile.name}', f'start it with `aiida-zmq serve --data-dir {path}`', profile)


def _migration_profile(profile_name: str | None) -> t.Any:
    profile = _load_profile(profile_name, 'Give --profile, or --data-dir and --prefix.')
    if profile.process_control_backend not in MIGRATE_BACKENDS:
        raise click.UsageError(
            f'profile `{profile.name}` uses the broker `{profile.process_control_backend}`: `migrate` moves tasks '
            f'between aiida-zmq and RabbitMQ or core.zeromq; switch it with `aiida-zmq configure {profile.name}` first.'
        )
    return profile


@click.command()
@migrate_options
@click.option('--to', 'direction', flag_value='to', help='Move tasks from this broker to SERVER.')
@click.option('--from', 'direction', flag_value='from', help='Move tasks from SERVER to this broker.')
# SERVER, not click's `[[rabbitmq|core.zeromq]]`, in the usage line; the choices show in the help (default rabbitmq).
@click.argument('server', type=click.Choice(MIGRATE_SERVERS), required=False, default='rabbitmq', metavar='[SERVER]')
@click.option(
    '--rabbitmq-url',
    default=None,
    help=f"AMQP URL of the RabbitMQ server (default: the profile's if it uses RabbitMQ, else {DEFAULT_RABBITMQ_URL}).",
)
@click.option('--prefix', help="RabbitMQ exchange prefix (default for a profile: AiiDA's `aiida-<profile uuid>`).")
@click.option(
    '--queue', 'queues', multiple=True, help='Queue to move, repeatable (default for a profile: its launch queue).'
)
@click.option('--dry-run', is_flag=True, help='Show what would move, move nothing.')
@click.option('--json', 'as_json', is_flag=True, help='Print what moved (or would move) as JSON.')
def migrate(
    target: Target,
    direction: str | None,
    server: str,
    rabbitmq_url: str | None,
    prefix: str | None,
    queues: tuple[str, ...],
    dry_run: bool,
    as_json: bool,
) -> None:
    """Move queued tasks to RabbitMQ (`--to rabbitmq`) or back (`--from rabbitmq`), with the queues AiiDA uses; or
    a profile's tasks from core.zeromq (`--from core.zeromq`) or to it (`--to core.zeromq`), without switching it.
    SERVER is `rabbitmq` (the default) or `core.zeromq`.

    Stop the daemon first (`verdi daemon stop`), so that no worker takes tasks during the move. With the broker
    stopped, the tasks are moved straight from (or into) its store, under its lock; with a broker running, through it
    (core.zeromq: only with both brokers stopped). Safe to interrupt: a task is always on at least one side, and a
    rerun finishes the move (docs/coming-from-rabbitmq.md, docs/coming-from-core-zeromq.md).
    """
    if direction is None:
        raise click.UsageError(f'say which way: `--to {server}` or `--from {server}`')
    if server == 'core.zeromq':
        if target.endpoint or rabbitmq_url or prefix or queues:
            raise click.UsageError(
                'a move from or to core.zeromq works on the files of both stopped brokers, with the launch queue of '
                'the profile: give --profile (and --data-dir for another store), not --endpoint, --rabbitmq-url, '
                '--prefix or --queue'
            )
        _migrate_core_zeromq(target, direction, dry_run, as_json)
        return
    if target.profile is not None and target.profile.process_control_backend == 'core.zeromq':
        raise click.UsageError(
            f'profile `{target.profile.name}` uses core.zeromq: switch it to aiida-zmq first (`aiida-zmq configure '
            f'{target.profile.name}` moves its tasks), then move them to RabbitMQ.'
        )
    profile_queue, profile_prefix = _profile_migration_defaults(target)
    prefix = prefix or profile_prefix
    if prefix is None:
        raise click.UsageError('give --prefix (the RabbitMQ exchange prefix) or use --profile')
    url = rabbitmq_url or _profile_rabbitmq_url(target) or DEFAULT_RABBITMQ_URL
    queues = queues or ((profile_queue,) if profile_queue else ())
    moved = _migrate_rabbitmq(target, direction, url, prefix, queues, dry_run)
    if as_json:
        emit_json(moved)
    elif dry_run:
        for queue, count in moved['would_move'].items():
            click.echo(f'would move {count} task(s) of {queue} {direction} RabbitMQ')
    else:
        for queue, count in moved['moved'].items():
            click.echo(f'moved {count} task(s) of {queue} {direction} RabbitMQ')


def _migrate_rabbitmq(
    target: Target, direction: str, url: str, prefix: str, queues: tuple[str, ...], dry_run: bool
) -> dict[str, t.Any]:
    """Move (or count, for a dry run) the tasks of ``queues`` between this broker and RabbitMQ; what ``--json``
    prints."""
    from ..exceptions import BrokerRunning

    codec = _profile_codec(target)
    zmq_side = _migration_broker(target, codec, direction)
    try:
        if not queues:
            queues = tuple(sorted(_zmq_depths(zmq_side, target))) if direction == 'to' else ()
        if not queues:
            raise click.UsageError('give the queues to move with --queue')
        rabbit = _rabbitmq(url, prefix, codec)
        try:
            if dry_run:
                counts = {queue: _depth(zmq_side, target, url, queue, direction) for queue in queues}
                return {'dry_run': True, 'would_move': counts, 'total': sum(counts.values())}
            moved = _move_queues(zmq_side, rabbit, target, queues, direction, url)
        except BrokerRunning:
            # Only raised before a task of this queue was taken: the store is the broker's now, nothing is half-moved.
            click.echo(
                f'aiida-zmq: a broker started on {target.data_dir} during the move; the tasks moved so far are moved. '
                'Run the same `aiida-zmq migrate` again to move the rest through it (and stop the daemon first).',
                err=True,
            )
            sys.exit(EXIT_REFUSED)
        finally:
            rabbit.close()
    finally:
        zmq_side.close()
    return {'dry_run': False, 'moved': moved, 'total': sum(moved.values())}


def _rabbitmq(url: str, prefix: str, codec: dict[str, t.Any]) -> t.Any:
    """A communicator to RabbitMQ on the exchanges of ``prefix``; exit code 3 when it does not answer."""
    from .. import migrate as migration

    message_exchange, task_exchange = _rabbitmq_exchanges(prefix)
    try:
        return migration.rabbitmq_communicator(
            url, message_exchange=message_exchange, task_exchange=task_exchange, **codec
        )
    except Exception as exception:
        click.echo(f'aiida-zmq: cannot connect to RabbitMQ at {url}: {exception}. Is it running?', err=True)
        sys.exit(EXIT_NOT_RUNNING)


def _move_queues(
    zmq_side: t.Any, rabbit: t.Any, target: Target, queues: tuple[str, ...], direction: str, url: str
) -> dict:
    """Move each queue, with a progress bar on stderr; the count moved per queue."""
    from .. import migrate as migration

    source, destination = (zmq_side, rabbit) if direction == 'to' else (rabbit, zmq_side)
    moved: dict[str, int] = {}
    for queue in queues:
        total = _depth(zmq_side, target, url, queue, direction)
        with click.progressbar(length=total, label=f'{queue}', file=sys.stderr) as bar:
            moved[queue] = migration.move_queue(source, destination, queue, on_moved=lambda _n: bar.update(1))
    return moved


def _migrate_core_zeromq(target: Target, direction: str, dry_run: bool, as_json: bool) -> None:
    """``migrate --from/--to core.zeromq``: the move ``aiida-zmq configure`` makes when switching, without a switch."""
    from ..core_zeromq_move import INTO_STORE, OUT_OF_STORE
    from .core_zeromq import echo_core_zeromq_move, move_core_zeromq_tasks

    profile = target.profile
    if profile is None:
        raise click.UsageError('give the profile whose tasks move: --profile PROFILE')
    assert target.data_dir is not None  # a profile target, or --data-dir
    codec = 'hybrid'
    if profile.process_control_backend == 'zmq':
        codec = str((profile.process_control_config or {}).get('codec') or codec)
    argv = ['aiida-zmq', 'migrate', f'--{direction}', 'core.zeromq', '--profile', profile.name]
    argv += ['--data-dir', str(target.data_dir)]
    report = move_core_zeromq_tasks(
        profile,
        INTO_STORE if direction == 'from' else OUT_OF_STORE,
        target.data_dir,
        codec,
        dry_run=dry_run,
        command=shlex.join(argv),
    )
    if as_json:
        emit_json(report.as_dict())
    else:
        echo_core_zeromq_move(report, profile, target.data_dir)


def _migration_broker(target: Target, codec: dict[str, t.Any], direction: str) -> t.Any:
    """The aiida-zmq side: the running broker, else the store of the stopped one (``ProfileCommunicator``, offline).

    Whether a broker runs is decided per operation, under the broker's lock, not once here: a broker that starts after
    this look is seen by the offline side (it refuses to take from a store a broker holds, and sends through it).
    """
    from aiida_zmq.exceptions import BrokerUnavailable

    try:
        return _open(target, **codec)
    except (BrokerUnavailable, ValueError) as exception:
        if target.data_dir is None:  # only an endpoint: no store to work on
            click.echo(f'aiida-zmq: no broker is running for {target.label}: {target.start_hint}.', err=True)
            click.echo(f'  ({exception})', err=True)
            sys.exit(EXIT_NOT_RUNNING)
    from ..aiida.communicator import ProfileCommunicator
    from ..codec import default_codec
    from ..store import STORE_FILENAME

    click.echo(
        f'aiida-zmq: no broker is running for {target.label}: working on its store in {target.data_dir}.', err=True
    )
    if direction == 'to' and not (target.data_dir / STORE_FILENAME).exists():
        # Most likely the wrong directory (a profile switched away from this broker forgot its own): say so.
        click.echo(
            f'aiida-zmq: there is no task store in {target.data_dir}, so nothing to move. If the broker used another '
            'directory, give it with --data-dir.',
            err=True,
        )
    profile_name = target.profile.name if target.profile is not None else str(target.data_dir)
    return ProfileCommunicator(
        data_dir=str(target.data_dir),
        profile_name=profile_name,
        task_queue='',  # only ``task_queue(name)`` is used here
        encoder=codec.get('encoder', default_codec().encode),
        decoder=codec.get('decoder', default_codec().decode),
        connect=lambda: _open(target, **codec),
        daemon_running=lambda: False,  # a broker that starts meanwhile is seen by its lock and broker.json
    )


def _zmq_depths(zmq_side: t.Any, target: Target) -> dict[str, int]:
    """Tasks waiting on the aiida-zmq side, by queue: the broker's count, or the store's (ready and held)."""
    from ..aiida.communicator import Mode, ProfileCommunicator

    online = zmq_side
    if isinstance(zmq_side, ProfileCommunicator):
        online = zmq_side.connection if zmq_side.mode() is Mode.ONLINE else None
    if online is None:
        return _stored_depths(target)[0] or {}
    return {name: int(queue.get('depth', 0)) for name, queue in online.admin('status')['queues'].items()}


def _profile_codec(target: Target) -> dict[str, t.Any]:
    """AiiDA's codec for a profile's tasks (as both of its brokers use it), else nothing: each side's default."""
    if target.profile is None:
        return {}
    from ..aiida.broker import aiida_codec

    # AiiDA's YAML out (what AiiDA on RabbitMQ reads); in, a decoder that also reads the JSON-tagged messages the
    # ``zmq`` broker's default ``hybrid`` codec stores.
    encoder, decoder = aiida_codec('yaml')
    return {'encoder': encoder, 'decoder': decoder}


def _depth(zmq_side: t.Any, target: Target, url: str, queue: str, direction: str) -> int:
    """Tasks waiting in ``queue`` on the source side."""
    if direction == 'to':
        return _zmq_depths(zmq_side, target).get(queue, 0)
    return _rabbitmq_depth(url, queue)


def _rabbitmq_depth(url: str, queue: str) -> int:
    """Messages ready in a RabbitMQ queue: a passive declare on a connection of its own (aio-pika, which kiwipy's
    RabbitMQ communicator runs on; the communicator offers no count)."""
    import asyncio

    import aio_pika

    async def depth() -> int:
        async with await aio_pika.connect(url) as connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)

    try:
        return asyncio.run(depth())
    except Exception:  # no such queue yet: nothing to move
        return 0


def _profile_migration_defaults(target: Target) -> tuple[str | None, str | None]:
    """(launch queue, exchange prefix) of the profile the target names, as AiiDA names them for RabbitMQ."""
    if target.profile is None:
        return None, None
    from aiida.brokers.rabbitmq.utils import get_launch_queue_name

    prefix = f'aiida-{target.profile.uuid}'
    return get_launch_queue_name(prefix), prefix


def _profile_rabbitmq_url(target: Target) -> str | None:
    """The RabbitMQ URL of a profile that was switched to RabbitMQ already, as AiiDA builds it; else ``None``."""
    if target.profile is None or target.profile.process_control_backend != 'core.rabbitmq':
        return None
    from aiida.brokers.rabbitmq.broker import RabbitmqBroker

    return RabbitmqBroker(target.profile).get_url()


def _rabbitmq_exchanges(prefix: str) -> tuple[str, str]:
    """(message exchange, task exchange) AiiDA uses for ``prefix``: the names its RabbitMQ broker declares."""
    from aiida.brokers.rabbitmq.utils import get_message_exchange_name, get_task_exchange_name

    return get_message_exchange_name(prefix), get_task_exchange_name(prefix)
