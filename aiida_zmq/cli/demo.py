"""``aiida-zmq demo``: real AiiDA work chains through a real daemon with this broker, on a throwaway profile.

What it does, in order: a temporary AiiDA configuration directory (``AIIDA_PATH``) with a ``core.sqlite_dos`` profile
using the ``zmq`` broker (``aiida-zmq presto``); ``verdi daemon start`` (the broker comes up as a watcher of the
daemon's circus arbiter); a batch of work chains submitted (half call a calcfunction, half submit a child work chain
and wait for it); the daemon's watchers and the broker's status; the throughput; then ``verdi daemon stop`` and a
check that nothing is left running. With ``--keep`` the profile goes into the user's AiiDA configuration instead and
stays, daemon stopped.

AiiDA is imported inside the command only, after ``AIIDA_PATH`` is set.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
import typing as t
import uuid
import warnings
from pathlib import Path

import click

if t.TYPE_CHECKING:
    from aiida.engine.daemon.client import DaemonClient

__all__ = ('demo',)

LOGGER = logging.getLogger(__name__)

POLL_INTERVAL = 0.2
TERMINAL_STATES = ['finished', 'excepted', 'killed']
# Without a terminal (a log, CI) progress is a line every this many seconds, not a bar.
PROGRESS_LINE_INTERVAL = 5.0


def _prepare_environment(keep: bool) -> Path | None:
    """Point AiiDA at a temporary configuration directory (unless ``keep``); return it, to be removed at the end.

    ``verdi`` must be on ``PATH`` for the daemon (aiida-core looks it up once, when its daemon client is imported):
    the one of this installation is put first, so that the demo works from a virtualenv that is not activated.
    """
    bin_dir = os.path.dirname(sys.executable)
    os.environ['PATH'] = os.pathsep.join([bin_dir, os.environ.get('PATH', '')])
    if keep:
        return None
    # Short: the daemon's and the broker's unix sockets live below it.
    aiida_path = Path(tempfile.mkdtemp(prefix='azd-'))
    os.environ['AIIDA_PATH'] = str(aiida_path)
    # AiiDA warns when it creates a configuration directory: here that is the point.
    warnings.filterwarnings('ignore', message='Creating AiiDA configuration folder')
    os.environ.pop('AIIDA_PROFILE', None)
    if 'aiida.manage.configuration.settings' in sys.modules:
        from aiida.manage.configuration.settings import AiiDAConfigDir

        AiiDAConfigDir.set(aiida_path / '.aiida')
    return aiida_path


def _echo_step(message: str) -> None:
    click.secho(f'==> {message}', bold=True)


def _circus_status(client: DaemonClient) -> list[tuple[str, str, list[int]]]:
    """``circusctl status`` of the daemon's arbiter, with the pids of every watcher."""
    from aiida_zmq.circus import CircusController

    rows = []
    with CircusController(client.get_controller_endpoint(), timeout=10.0) as controller:
        statuses = controller.call('status').get('statuses', {})
        for name in sorted(statuses):
            rows.append((name, str(statuses[name]), controller.watcher_pids(name)))
    return rows


def _print_circus_status(rows: list[tuple[str, str, list[int]]]) -> None:
    width = max(len(name) for name, _, _ in rows)
    for name, status, pids in rows:
        colour = 'green' if status == 'active' else 'yellow'
        pid_list = ', '.join(map(str, pids)) or '-'
        click.echo(f'  {name:<{width}}  {click.style(status, fg=colour)}  pids: {pid_list}')


def _print_broker_status(status: dict[str, t.Any], queue_name: str) -> None:
    click.echo(
        f'  pid {status.get("pid")}, up {status.get("uptime", 0):.1f} s, {", ".join(status.get("endpoints", []))}'
    )
    for name, queue in sorted(status.get('queues', {}).items()):
        marker = ' (launch queue)' if name == queue_name else ''
        click.echo(f'  queue {name}{marker}: depth {queue.get("depth")}, consumers {queue.get("consumers")}')
    for client in status.get('clients', []):
        prefetch = ', '.join(f'{count}' for count in (client.get('prefetch') or {}).values()) or '-'
        click.echo(
            f'  client {client.get("name")} (pid {client.get("pid")}): held {client.get("held")}, prefetch {prefetch}, '
            f'broadcasts {"yes" if client.get("subscribed") else "no"}'
        )
    stats = status.get('stats', {})
    click.echo(
        f'  dead letters {status.get("dead_letters")}, store {status.get("store_bytes", 0) / 1024:.0f} KiB, '
        f'tasks stored {stats.get("tasks_stored", "?")}, acked {stats.get("tasks_acked", "?")}, '
        f'broadcasts {stats.get("broadcasts", "?")}'
    )


class _Progress:
    """A progress bar on a terminal; elsewhere (a log, CI) a line every few seconds with the count and the rate.

    click's bar prints only its label when the output is not a terminal, which says nothing about how far it got.
    """

    def __init__(self, label: str, total: int, verb: str, *, interval: float = PROGRESS_LINE_INTERVAL) -> None:
        self.label = label
        self.total = total
        self.verb = verb
        self.done = 0
        self.interval = interval
        self.started = self.last_line = time.monotonic()
        self._bar = click.progressbar(length=total, label=label, show_pos=True) if _is_terminal() else None

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def update(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif time.monotonic() - self.last_line >= self.interval:
            self._line()

    def _line(self) -> None:
        self.last_line = time.monotonic()
        elapsed = max(self.last_line - self.started, 1e-9)
        click.echo(
            f'{self.label.strip()}: {self.done}/{self.total} {self.verb} after {elapsed:.1f} s '
            f'({self.done / elapsed:.1f}/s)'
        )

    def __exit__(self, *exc_info: t.Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc_info)
        else:
            self._line()


def _is_terminal() -> bool:
    return sys.stdout.isatty()


def _wait_terminated(pks: list[int], timeout: float) -> list[int]:
    """Wait with a progress display until the processes terminated; return those that did not in time.

    Polls the database: what the user sees is what AiiDA stored, not what the broker claims.
    """
    from ..aiida.queries import terminated

    pending = set(pks)
    deadline = time.monotonic() + timeout
    with _Progress('Running   ', len(pks), 'finished') as progress:
        while pending and time.monotonic() < deadline:
            done = terminated(pending)
            pending -= done
            progress.update(len(done))
            if pending:
                time.sleep(POLL_INTERVAL)
    return sorted(pending)


def _leftover_processes(pids: list[int]) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:
            continue
    return alive


@click.command('demo')
@click.option('--workchains', type=click.IntRange(min=1), default=100, show_default=True, help='How many to submit.')
@click.option('--workers', type=click.IntRange(min=1), default=2, show_default=True, help='Daemon workers.')
@click.option(
    '--keep',
    is_flag=True,
    help='Create the profile in your AiiDA configuration and keep it (daemon stopped) instead of a throwaway one.',
)
@click.option('--timeout', type=float, default=600.0, show_default=True, help='Seconds to wait for the work chains.')
def demo(workchains: int, workers: int, keep: bool, timeout: float) -> None:
    """Run real AiiDA work chains through the daemon with this broker, on a throwaway SQLite profile.

    Creates the profile, starts the daemon (and with it the broker), submits WORKCHAINS work chains with a progress
    bar, waits for them, shows the daemon's circus watchers and the broker's status, the throughput, and cleans up.
    """
    aiida_path = _prepare_environment(keep)
    profile_name = f'demo-{uuid.uuid4().hex[:6]}'
    run = _DemoRun(profile_name)
    try:
        from aiida_zmq.cli.aiida import create_presto_profile

        _echo_step(
            f'Creating profile `{profile_name}` (core.sqlite_dos, broker zmq)'
            + (f' in {aiida_path}' if aiida_path else '')
        )
        create_presto_profile(profile_name, 'aiida@localhost', None, set_default=not keep, computer=False)
        submit_s, elapsed_s = run.run(workchains, workers, timeout)
        _echo_step('Throughput')
        parents = workchains // 2  # every other one submits a child (``_DemoRun.run``)
        processes = workchains + parents
        click.echo(
            f'  {workchains} work chains ({parents} of them submit a child and wait for it: {processes} processes) in '
            f'{elapsed_s:.1f} s: {click.style(f"{workchains / elapsed_s:.1f} workflows/s", bold=True)} end to end, '
            f'{processes / elapsed_s:.1f} processes/s'
        )
        click.echo(f'  submit: {workchains / submit_s:.1f} calls/s ({submit_s:.1f} s for {workchains})')
        click.echo(
            '  (docs/benchmarks.md measures other workloads: work chains without children, and parents alone, after a '
            'warm-up on an idle machine; docs/aiida.md, "End-to-end figures", compares them)'
        )
    finally:
        _cleanup(run.client, run.pids, aiida_path, keep, profile_name)


class _DemoRun:
    """The demo's steps, keeping what the cleanup needs (daemon client, pids seen) even when a step fails."""

    def __init__(self, profile_name: str) -> None:
        self.profile_name = profile_name
        self.client: DaemonClient | None = None
        self.pids: list[int] = []

    def _watch(self, rows: list[tuple[str, str, list[int]]]) -> None:
        assert self.client is not None
        for pid in [pid for _, _, pids in rows for pid in pids] + [self.client.get_daemon_pid() or 0]:
            if pid and pid not in self.pids:
                self.pids.append(pid)

    def run(self, workchains: int, workers: int, timeout: float) -> tuple[float, float]:
        """Start the daemon, submit, wait, show; return (submit seconds, end-to-end seconds)."""
        from aiida import load_profile, orm
        from aiida.engine import submit
        from aiida.engine.daemon.client import DaemonClient
        from aiida.manage import get_manager

        from aiida_zmq.aiida.broker import ZmqBroker
        from aiida_zmq.aiida.demo_workflows import AddWorkChain, ParentWorkChain

        profile_name = self.profile_name
        profile = load_profile(profile_name, allow_switch=True)
        client = self.client = DaemonClient(profile)
        # Said as what it does, not as an instruction: the demo starts the daemon itself.
        command = f'verdi -p {profile_name} daemon start {workers}'
        _echo_step(f'Starting the daemon with {workers} worker(s), as `{command}` does')
        client.start_daemon(number_workers=workers)
        broker = get_manager().get_broker()
        assert isinstance(broker, ZmqBroker)
        started = time.monotonic()
        try:
            broker.get_communicator()  # waits (bounded) for the broker the first worker attached to the daemon
        except ConnectionError as exception:
            raise click.ClickException(f'{exception}\nDaemon log: {client.daemon_log_file}')
        click.echo(f'  broker up after {time.monotonic() - started:.1f} s: {broker}')
        self._watch(_circus_status(client))

        kinds = (AddWorkChain, ParentWorkChain)
        pks: list[int] = []
        started = time.monotonic()
        with _Progress('Submitting', workchains, 'submitted') as progress:
            for index in range(workchains):
                pks.append(t.cast(int, submit(kinds[index % 2], x=orm.Int(index), y=orm.Int(1)).pk))
                progress.update(1)
        submit_s = time.monotonic() - started
        pending = _wait_terminated(pks, timeout)
        elapsed_s = time.monotonic() - started

        _echo_step(f'Daemon arbiter (circusctl --endpoint {client.get_controller_endpoint()} status)')
        rows = _circus_status(client)
        _print_circus_status(rows)
        self._watch(rows)

        _echo_step(f'Broker status (aiida-zmq status --data-dir {broker.data_dir})')
        status = broker.admin_status(timeout=10.0)
        _print_broker_status(status, broker.queue_name)

        failed = [pk for pk in pks if pk not in pending and not orm.load_node(pk).is_finished_ok]
        _echo_step('Result')
        if pending or failed:
            raise click.ClickException(
                f'{len(pending)} work chain(s) did not finish within {timeout:.0f} s and {len(failed)} failed '
                f'(pks {(pending + failed)[:10]}...). Daemon log: {client.daemon_log_file}'
            )
        wrong = [pk for index, pk in enumerate(pks) if orm.load_node(pk).outputs.sum.value != index + 1]
        if wrong:
            raise click.ClickException(f'work chains with a wrong sum: {wrong[:10]}')
        click.echo(f'  {click.style("all " + str(workchains) + " work chains finished ok", fg="green")}, sums checked')
        return submit_s, elapsed_s


def _cleanup(
    client: DaemonClient | None, watched_pids: list[int], aiida_path: Path | None, keep: bool, profile_name: str
) -> None:
    """Stop the daemon (and with it the broker), check that none of its processes is left, remove the directory."""
    _echo_step('Cleaning up')
    try:
        from aiida.manage import get_manager

        get_manager().reset_profile()  # closes this process's communicator before the broker goes
    except Exception as exception:  # cleanup goes on regardless
        LOGGER.debug('reset_profile failed: %s', exception)
    if client is not None:
        try:
            if client.is_daemon_running:
                # Busy workers may need more than aiida-core's default 2 s to stop: wait as long as it takes, bounded.
                client.stop_daemon(wait=True, timeout=60)
                click.echo(f'  daemon stopped (`verdi -p {profile_name} daemon stop`)')
        except Exception as exception:
            click.secho(f'  stopping the daemon failed: {exception}', fg='red', err=True)
    deadline = time.monotonic() + 20
    left = _leftover_processes(watched_pids)
    while left and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
        left = _leftover_processes(watched_pids)
    if left:
        click.secho(f'  processes still running: {left}', fg='red', err=True)
    elif watched_pids:
        click.echo(f'  no process left running (checked {len(watched_pids)} pids: arbiter, workers, broker, plugins)')
    if aiida_path is not None:
        shutil.rmtree(aiida_path, ignore_errors=True)
        click.echo(f'  removed the throwaway configuration {aiida_path}')
    elif keep:
        click.echo(f'  kept profile `{profile_name}`: `verdi -p {profile_name} daemon start` to use it again')
    if left:
        raise click.ClickException(f'processes left running after the daemon stopped: {left}')
