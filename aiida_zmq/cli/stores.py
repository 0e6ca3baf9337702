"""``aiida-zmq stores``: the broker stores of the AiiDA configuration, and removing those of deleted profiles."""

from __future__ import annotations

import click

__all__ = ('stores',)


@click.command()
@click.option('--remove-orphans', is_flag=True, help='Remove the stores that no profile uses (after a confirmation).')
@click.option('--yes', '-y', is_flag=True, help='Do not ask for the confirmation.')
def stores(remove_orphans: bool, yes: bool) -> None:
    """List the broker stores of the AiiDA configuration, with the profile each belongs to.

    `verdi profile delete` leaves the profile's broker store behind (aiida-core gives a broker no hook on deletion):
    its tasks, which no profile can run any more. --remove-orphans removes such stores, never one that a profile
    uses or that a broker holds.
    """
    from ..aiida.stores import StoreInUse, broker_stores, remove_store, stores_root

    found = broker_stores()
    if not found:
        click.echo(f'no broker stores in {stores_root()}')
        return
    for store in found:
        owner = ', '.join(store.profiles) if store.profiles else 'no profile (left by a deleted one)'
        click.echo(f'{store.path}: {owner}')
    orphans = [store for store in found if store.orphaned]
    if not remove_orphans:
        if orphans:
            click.echo(f'{len(orphans)} store(s) of deleted profiles: `aiida-zmq stores --remove-orphans` removes them')
        return
    if not orphans:
        click.echo('no store of a deleted profile: nothing to remove')
        return
    if not yes:
        click.confirm(f'Remove {len(orphans)} store(s) of deleted profiles, with the tasks in them?', abort=True)
    failed = 0
    for store in orphans:
        try:
            remove_store(store)
        except (StoreInUse, OSError) as exception:
            failed += 1
            click.echo(f'not removed: {exception}', err=True)
        else:
            click.echo(f'removed {store.path}')
    if failed:
        raise SystemExit(1)
