"""``aiida-zmq tasks show ID...``: a task and its history, with the broker running or stopped (on its store).

The broker's ADMIN ``task-info`` answers it (``docs/protocol.md``); with the broker stopped the same answer comes
from its store, under its lock, as for the other ``tasks`` commands.
"""

from __future__ import annotations

import time
import typing as t

import click

from .admin import JSON_HELP, Target, _emit_json, _run, _tasks, broker_options

__all__ = ('echo_task', 'tasks_show', 'when')


@click.command('show')
@broker_options
@click.argument('task_ids', metavar='ID...', nargs=-1, required=True, type=click.IntRange(min=1, max=2**63 - 1))
@click.option('--json', 'as_json', is_flag=True, help=JSON_HELP)
def tasks_show(target: Target, task_ids: tuple[int, ...], as_json: bool) -> None:
    """Show tasks with their history: stored, delivered to whom, given back and why, answered, dead-lettered."""
    answer = _run(target, 'task-info', ids=list(task_ids))
    if as_json:
        _emit_json(answer['tasks'])
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
        line = f'{indent}task {task["id"]}{process}: {task["state"]}, {_tasks(task["attempts"], "delivery")}'
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
