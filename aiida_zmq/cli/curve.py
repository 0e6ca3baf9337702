"""``aiida-zmq curve-client``: a CURVE key pair for a client of a broker on ``tcp://`` (:mod:`aiida_zmq.security`)."""

from __future__ import annotations

import click

from ..security import SERVER_NAME, create_client_keys, curve_dir

__all__ = ('curve_client',)


@click.command('curve-client')
@click.option('--data-dir', required=True, type=click.Path(file_okay=False), help="The broker's data directory.")
@click.argument('name')
def curve_client(data_dir: str, name: str) -> None:
    """Create and authorize a CURVE key pair for client NAME; prints the files the client needs."""
    try:
        secret_file = create_client_keys(data_dir, name)
    except (ValueError, OSError) as exception:
        raise click.ClickException(str(exception)) from exception
    server_public = curve_dir(data_dir) / f'{SERVER_NAME}.key'
    click.echo(f'client secret key: {secret_file}\nbroker public key: {server_public}')
    click.echo(
        'Give both files to the client (keep the secret one private) and connect with '
        "aiida_zmq.connect('tcp://HOST:PORT', curve=aiida_zmq.security.client_keys(SECRET, PUBLIC)). "
        f'Revoke it by deleting {curve_dir(data_dir) / "authorized" / (name + ".key")}.'
    )
