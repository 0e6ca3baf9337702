"""Moving a profile's queued tasks between core.zeromq and this broker's store, as ``configure`` and ``migrate`` do.

``aiida-zmq configure`` moves them when it switches a profile from or to core.zeromq, ``aiida-zmq migrate --from/--to
core.zeromq`` without a switch: both through :func:`move_core_zeromq_tasks`, which maps the profile to core.zeromq's
directory, its launch queue and its codec for :mod:`aiida_zmq.core_zeromq_move`, and turns its refusals into advice.
"""

from __future__ import annotations

import pathlib
import typing as t

import click

from ..core_zeromq import CoreZeromqDir
from ..core_zeromq_move import INTO_STORE, CoreZeromqMove, export_to_core_zeromq, import_from_core_zeromq
from ..exceptions import BrokerRunning, CoreZeromqRunning, MoveStopped, StoreError

if t.TYPE_CHECKING:
    from aiida.manage.configuration.profile import Profile

__all__ = ('core_zeromq_dir', 'echo_core_zeromq_move', 'move_core_zeromq_tasks')


def core_zeromq_dir(profile: Profile) -> CoreZeromqDir:
    """core.zeromq's broker directory of a profile, where aiida-core puts it (whatever the profile's broker is now)."""
    from aiida.manage.configuration import get_config

    return CoreZeromqDir(get_config().filepaths(profile)['broker_service']['dir'], profile=profile.name)


def move_core_zeromq_tasks(
    profile: Profile, direction: str, data_dir: pathlib.Path, codec: str, *, dry_run: bool, command: str
) -> CoreZeromqMove:
    """Move a profile's queued tasks from core.zeromq into the aiida-zmq store in ``data_dir`` (``direction`` ``in``)
    or back (``out``), with the profile's launch queue and ``codec``; see :mod:`aiida_zmq.core_zeromq_move`.

    Refuses (a :class:`click.ClickException`, exit code 1, nothing changed) while the daemon, core.zeromq's broker or
    an aiida-zmq broker on ``data_dir`` runs, saying what to stop and to run ``command`` again. A dry run refuses
    nothing: it says what would refuse.
    """
    from ..aiida.broker import aiida_codec, launch_queue_name
    from ..aiida.daemon import daemon_running

    directory = core_zeromq_dir(profile)
    again = f'then run `{command}` again'
    daemon = f'the daemon of profile `{profile.name}` is running: stop it first (`verdi -p {profile.name} daemon stop`)'
    if daemon_running(profile):
        if not dry_run:
            raise click.ClickException(f'{daemon}, {again}. Nothing was moved or changed.')
        click.secho(f'Note: {daemon}; until then the move would be refused.', fg='yellow', err=True)
    elif dry_run and (pid := directory.broker_pid()) is not None:
        stop = f'Note: the core.zeromq broker runs (pid {pid}): stop it first (`kill {pid}`).'
        click.secho(stop, fg='yellow', err=True)
    queue = launch_queue_name(profile)
    encoder, decoder = aiida_codec(codec)
    try:
        if direction == INTO_STORE:
            return import_from_core_zeromq(directory, data_dir, queue, encoder, dry_run=dry_run)
        return export_to_core_zeromq(data_dir, directory, queue, decoder, dry_run=dry_run)
    except CoreZeromqRunning as exception:
        raise click.ClickException(f'{exception}; {again}.')
    except BrokerRunning:
        raise click.ClickException(f'{_lock_refusal(data_dir, again)}. Nothing was moved or changed.')
    except MoveStopped as exception:  # part of it was moved: says how much, and where the rest is
        raise click.ClickException(f'{exception}: `{command}`.')
    except StoreError as exception:
        raise click.ClickException(f'{exception}. Nothing was moved or changed.')


def _lock_refusal(data_dir: pathlib.Path, again: str) -> str:
    """What holds the store's lock, said as it is: a broker serving it, or another process (another ``configure``
    or ``migrate`` moving tasks, an offline submit), named by its pid and command line."""
    from ..discovery import lock_holder, read_live_broker_info

    info = read_live_broker_info(data_dir)
    if info is not None:
        return (
            f'an aiida-zmq broker is running on {data_dir} (pid {info.get("pid")}; `aiida-zmq status --data-dir '
            f'{data_dir}` shows it): stop it first, {again}'
        )
    pid = lock_holder(data_dir)
    if pid is None:
        who = 'another process (its pid cannot be read here)'
    else:
        import psutil

        try:
            command = ' '.join(psutil.Process(pid).cmdline()) or '?'
        except psutil.Error:
            command = '?'
        command = ''.join(c if c.isprintable() else repr(c)[1:-1] for c in command)  # no control characters out
        who = f'another process, pid {pid} (`{command}`)'
    return (
        f'the store in {data_dir} is in use by {who}: no broker runs on it, but another `aiida-zmq configure` or '
        f'`migrate` may be moving tasks, or a task being submitted offline. Wait for it to finish, {again}'
    )


def echo_core_zeromq_move(report: CoreZeromqMove, profile: Profile, data_dir: pathlib.Path) -> None:
    """Say what a move from or to core.zeromq did (or would do)."""
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
