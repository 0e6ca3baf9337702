"""Handlers of the broadcast commands: SUBSCRIBE, UNSUBSCRIBE and PUBLISH (to every subscribed session)."""

from __future__ import annotations

from collections.abc import Sequence

from ...protocol import Command
from ..context import Context, Peer
from ..peers import Client


def subscribe(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    client.subscribed = True
    broker.send(client, Command.DONE, args[0])


def unsubscribe(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    client.subscribed = False


def publish(broker: Context, sender: Peer, args: Sequence[bytes]) -> None:
    """A broadcast, from a session or a direct socket (it needs no session): DONE, then to every subscriber.

    DONE first: the broker has taken the broadcast, and hands it to every subscriber in this same call. The sender
    goes on while the subscribers wake, instead of after them (a third of a broadcast's round trip with ten).
    """
    correlation, payload = args
    broker.stats['broadcasts'] += 1
    broker.answer(sender, Command.DONE, correlation)
    for peer in broker.clients.values():
        if peer.subscribed:
            broker.send(peer, Command.BROADCAST, payload)
