"""``aiida-zmq tasks show ID...`` (a task and its history) and ``aiida-zmq explain PK...`` (why a process does not
move), with the broker running or stopped.

The broker's ADMIN ``task-info`` answers both (``docs/protocol.md``); with the broker stopped the same answer comes
from its store, under its lock, as for the other ``tasks`` commands. ``explain`` joins it with what AiiDA's storage
says (:mod:`aiida_zmq.aiida.processes`) and the daemon, and :func:`aiida_zmq.aiida.diagnosis.diagnose` says what
goes on.
"""

from __future__ import annotations

import dataclasses
import time
import typing as t

import click

from .admin import JSON_HELP, Target, ask_broker, broker_options, emit_json, plural, profile_target, run_operation

__all__ = ('echo_task', 'explain', 'tasks_show', 'when')


@click.command('show')
@broker_options
@click.argument('task_ids', metavar='ID...', nargs=-1, required=True, type=click.IntRange(min=1, max=2**63 - 1))
@click.option('--json', 'as_json', is_flag=True, help=JSON_HELP)
def tasks_show(target: Target, task_ids: tuple[int, ...], as_json: bool) -> None:
    """Show tasks with their history: stored, delivered to whom, given back and why, answered, dead-lettered."""
    answer = run_operation(target, 'task-info', ids=list(task_ids))
    if as_json:
        emit_json(answer['tasks'])
        return
    found = {task['id'] for task in answer['tasks']}
    for task in answer['tasks']:
        echo_task(task)
    for task_id in task_ids:
        if task_id not in found:
            click.echo(f'task {task_id}: not stored, and no history of it (answered long ago, or never stored here).')


def echo_task(task: dict[str, t.Any], indent: str = '') -> None:
    """A task, then its history, one event a line (``tasks show``, ``explain``)."""
    process = '' if task.get('process') is None else f' for process {task["process"]}'
    if task['state'] == 'gone':
        click.echo(f'{indent}task {task["id"]}{process}: no longer stored')
    else:
        line = f'{indent}task {task["id"]}{process}: {task["state"]}, {plural(task["attempts"], "delivery")}'
        click.echo(f'{line}, queue {task["queue"]}')
    holder = task.get('holder')
    if holder:
        since = '' if holder['since'] is None else f' since {when(holder["since"])}'
        click.echo(f'{indent}  held by {holder["name"]} (pid {holder["pid"]}){since}')
    if task.get('retry_at'):
        click.echo(f'{indent}  backing off: offered again at {when(task["retry_at"])}')
    if task.get('dead_reason'):
        click.echo(f'{indent}  dead-lettered: {task["dead_reason"]}')
    for event in task['events']:
        detail = f': {event["detail"]}' if event['detail'] else ''
        click.echo(f'{indent}  {when(event["at"])}  {event["event"]}{detail}')


def when(at: float) -> str:
    """A time of today as ``14:03:07``, an older one with its date."""
    stamp = time.localtime(at)
    same_day = time.localtime()[:3] == stamp[:3]
    return time.strftime('%H:%M:%S' if same_day else '%Y-%m-%d %H:%M:%S', stamp)


@click.command()
@click.argument('pks', metavar='PK...', nargs=-1, required=True, type=click.IntRange(min=1, max=2**63 - 1))
@click.option('-p', '--profile', 'profile_name', metavar='PROFILE', help='The AiiDA profile (default: the default).')
@click.option('--json', 'as_json', is_flag=True, help='Print the facts and the diagnosis of each process as JSON.')
def explain(pks: tuple[int, ...], profile_name: str | None, as_json: bool) -> None:
    """Say why processes do not move: what AiiDA knows of each (state, last change, caller and callees, sealed,
    paused) joined with what the broker knows (its task: waiting, held by which worker since when, delivered how
    often, backing off, dead-lettered, its history; its RPC subscriber; the daemon's workers and slots), then one
    sentence saying what goes on and what to type. Works with the daemon and the broker stopped."""
    from ..aiida.diagnosis import diagnose

    target = profile_target(profile_name)
    facts = _gather(target, list(dict.fromkeys(pks)))
    diagnoses = {pk: diagnose(fact) for pk, fact in facts.items()}
    if as_json:
        emit_json(
            {
                str(pk): {**dataclasses.asdict(fact), 'case': diagnoses[pk].case, 'sentence': diagnoses[pk].sentence}
                for pk, fact in facts.items()
            }
        )
        return
    for pk, fact in facts.items():
        _echo_facts(fact)
        click.secho(f'=> {diagnoses[pk].sentence}', bold=True)
        click.echo()


def _gather(target: Target, pks: list[int]) -> dict[int, t.Any]:
    """The :class:`~aiida_zmq.aiida.diagnosis.Facts` of each process."""
    import psutil

    from ..aiida.broker import launch_queue_name
    from ..aiida.daemon import daemon_running
    from ..aiida.diagnosis import Facts
    from ..aiida.processes import load_storage, process_views
    from ..discovery import read_live_broker_info

    try:
        load_storage(target.profile)
    except Exception as exception:  # a storage that needs a migration, a database that is down
        raise click.ClickException(f'cannot read the storage of {target.label}: {exception}') from None
    views = process_views(pks)
    child_views = process_views({child for view in views.values() for child in view.callees})
    broker_running = target.data_dir is not None and read_live_broker_info(target.data_dir) is not None
    info = run_operation(target, 'task-info', quiet=True, processes=pks)
    workers = _workers(target, launch_queue_name(target.profile)) if broker_running else None
    running = daemon_running(target.profile)
    holders = {task['holder']['pid'] for task in info['tasks'] if task.get('holder')}
    alive = {pid: psutil.pid_exists(pid) for pid in holders}
    facts = {}
    for pk in pks:
        view = views.get(pk)
        facts[pk] = Facts(
            pk=pk,
            process=None if view is None else {**dataclasses.asdict(view), 'state_text': view.describe_state()},
            tasks=[task for task in info['tasks'] if task.get('process') == pk],
            rpc_owner=info['rpc'].get(str(pk)),
            children=[dataclasses.asdict(child_views[c]) for c in (view.callees if view else []) if c in child_views],
            daemon_running=running,
            broker_running=broker_running,
            workers=workers,
            peer_timeout=info.get('peer_timeout'),
            holder_alive=alive,
        )
    return facts


def _workers(target: Target, queue: str) -> list[t.Any]:
    """The daemon's workers as the broker sees them: the sessions consuming the launch queue, with their slots."""
    from ..aiida.diagnosis import Worker

    clients = ask_broker(target, 'status')['clients']
    return [
        Worker(pid=client['pid'], slots=client['prefetch'][queue], held=client['held'])
        for client in clients
        if queue in (client.get('prefetch') or {})
    ]


def _echo_facts(facts: t.Any) -> None:
    process = facts.process
    if process is None:
        click.echo(f'Process {facts.pk}: not in this profile')
        return
    changed = when(process['last_change'])
    sealed = 'sealed' if process['sealed'] else 'not sealed'
    paused = ', checkpoint says paused' if process['checkpoint_paused'] and not process['paused'] else ''
    click.echo(
        f'Process {facts.pk} ({process["label"]}): {process["state_text"]}, {sealed}, last change {changed}{paused}'
    )
    if process['caller'] is not None:
        click.echo(f'  called by {process["caller"]}')
    for child in facts.children:
        state = (child['state'] or 'no state').capitalize()
        click.echo(f'  calls {child["pk"]} ({child["label"]}): {state}')
    if not facts.tasks:
        click.echo('  no task in the broker (none stored, no history of one)')
    for task in facts.tasks:
        echo_task(task, indent='  ')
    owner = facts.rpc_owner
    if facts.broker_running:
        rpc = f'served by {owner["name"]} (pid {owner["pid"]})' if owner else 'nobody serves it'
        click.echo(f'  RPC (pause, play, kill): {rpc}')
    daemon = 'running' if facts.daemon_running else 'not running'
    broker = 'running' if facts.broker_running else 'not running'
    click.echo(f'  daemon {daemon}, broker {broker}')
    for worker in facts.workers or []:
        click.echo(f'    worker pid {worker.pid}: holds {worker.held} of {worker.slots or "unlimited"} slots')
