"""``aiida-zmq repair``: ``verdi process repair`` that is safe while the daemon runs (:mod:`aiida_zmq.aiida.repair`)."""

from __future__ import annotations

import dataclasses
import typing as t

import click

from .admin import JSON_HELP, emit_json, profile_target, run_operation

__all__ = ('repair',)


@click.command()
@click.option('-p', '--profile', 'profile_name', metavar='PROFILE', help='The AiiDA profile (default: the default).')
@click.option('--dry-run', is_flag=True, help='Say what would be revived, revive nothing.')
@click.option(
    '--min-age',
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help='Leave alone processes created this many seconds ago or less (submit() may not have sent their task yet).',
)
@click.option('--json', 'as_json', is_flag=True, help=JSON_HELP)
def repair(profile_name: str | None, dry_run: bool, min_age: float, as_json: bool) -> None:
    """Revive the active processes that have no task, with the daemon running or stopped, and never make a second
    task for a process whose task waits or is held by a worker (as `verdi process repair` may while the daemon runs,
    which is why it refuses to). Tasks of processes that are no longer active are left to the worker given them."""
    from ..aiida.processes import load_storage
    from ..aiida.repair import repair as run_repair
    from ..exceptions import BrokerRunning

    target = profile_target(profile_name)
    assert target.data_dir is not None
    load_storage(target.profile)

    def snapshot() -> list[dict[str, t.Any]]:
        return run_operation(target, 'tasks', quiet=True, limit=100_000)['tasks']

    def live_tasks_of(pk: int) -> int:
        tasks = run_operation(target, 'task-info', quiet=True, processes=[pk])['tasks']
        return sum(1 for task in tasks if task['state'] in ('ready', 'delivered'))

    def revive(pk: int) -> None:
        from aiida.manage import get_manager

        get_manager().get_process_controller().continue_process(pk, nowait=True, no_reply=True)

    try:
        report = run_repair(target.data_dir, snapshot, live_tasks_of, revive, dry_run=dry_run, min_age=min_age)
    except BrokerRunning as exception:
        raise click.ClickException(str(exception)) from None
    if as_json:
        emit_json(dataclasses.asdict(report))
        return
    _echo(report, dry_run)


def _echo(report: t.Any, dry_run: bool) -> None:
    click.echo(f'Active processes: {len(report.active)}, with a task: {len(report.with_task)}')
    for pk in report.revived:
        click.echo(f'{"Would revive" if dry_run else "Revived"} process `{pk}`')
    if report.too_young:
        click.echo(f'Left alone (created less than --min-age ago, their task may be on its way): {report.too_young}')
    if report.gained_task:
        click.echo(f'Got a task meanwhile (not revived): {report.gained_task}')
    if report.ended:
        click.echo(f'Terminated meanwhile (not revived): {report.ended}')
    if report.tasks_of_inactive:
        click.echo(f'Tasks of processes no longer active (the worker given one drops it): {report.tasks_of_inactive}')
    if report.duplicated:
        click.echo(f'Processes with more than one task (made before, not by this repair): {report.duplicated}')
    if not (report.revived or report.too_young or report.duplicated):
        click.echo('No process without a task.')
