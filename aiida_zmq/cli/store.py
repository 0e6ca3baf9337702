"""``aiida-zmq accept-store``: accept a task store the broker refused (:mod:`aiida_zmq.store_identity`)."""

from __future__ import annotations

from pathlib import Path

import click

from ..exceptions import BrokerRunning, StoreError
from ..store import STORE_FILENAME, accept_store

__all__ = ('accept_store_command',)


@click.command('accept-store')
@click.option('--data-dir', required=True, type=click.Path(file_okay=False), help="The broker's data directory.")
def accept_store_command(data_dir: str) -> None:
    """Accept the task store in DATA_DIR as it is, after the broker refused it as not the one it left.

    The broker refuses to start on a store that was truncated, replaced, or lost its last transactions (its -wal
    file), rather than serve what is left as if nothing had happened. Restore the file if you can; otherwise
    this makes the store as it is now the accepted one (what was lost stays lost) and the broker starts on it.
    """
    try:
        result = accept_store(data_dir)
    except BrokerRunning as exception:
        raise click.ClickException(f'{exception}; stop the broker first') from exception
    except (StoreError, OSError) as exception:
        raise click.ClickException(str(exception)) from exception
    lost = max(0, result['recorded_before'] - result['high_water'])
    before = f' (the broker had recorded ids up to {result["recorded_before"]})' if lost else ''
    click.echo(
        f'accepted {Path(data_dir) / STORE_FILENAME} as it is: {result["tasks"]} stored task(s), ids up to '
        f'{result["high_water"]}{before}'
    )
    click.echo('Start the broker again (`verdi daemon start`, or `aiida-zmq serve --data-dir ...`).')
