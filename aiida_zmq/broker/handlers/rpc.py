"""Handlers of the RPC commands: RPC_REGISTER, RPC_UNREGISTER, RPC_CALL / RPC_SUBMIT (routed to the identifier's
holder, ``rpc_routes.py``) and RPC_REPLY (back to the caller)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ... import protocol
from ...protocol import Command, ErrorCode
from ..context import Context, Peer
from ..peers import Client

LOGGER = logging.getLogger(__name__)


def register(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    correlation, identifier = args
    refusal = broker.rpc.register_refusal(client, bytes(identifier).decode())
    if refusal is not None:
        _refuse(broker, client, correlation, 'RPC_REGISTER', refusal)
        return
    registered = broker.rpc.register(client, bytes(identifier).decode())
    broker.send(client, Command.RPC_REGISTERED, correlation, b'ok' if registered else b'duplicate')


def unregister(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    correlation, identifier = args
    broker.rpc.unregister(client, bytes(identifier).decode())
    broker.send(client, Command.DONE, correlation)


def call(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    correlation, identifier, payload = args
    _route(broker, client, client, correlation, identifier, payload)


def submit(broker: Context, sender: Peer, args: Sequence[bytes]) -> None:
    """An RPC from a caller thread's own socket: answered there, its replies go to the session it names."""
    correlation, session, identifier, payload = args
    caller = broker.sessions.named(bytes(session))
    if caller is None:
        # Its replies would have nowhere to go: the caller sends it again once its session is welcomed.
        broker.answer(sender, Command.ERROR, correlation, ErrorCode.UNKNOWN_CLIENT, b'no such session: say HELLO')
        return
    _route(broker, caller, sender, correlation, identifier, payload)


def _route(broker: Context, caller: Client, peer: Peer, correlation: bytes, identifier: bytes, payload: bytes) -> None:
    """Hand a call to its recipient, then tell ``peer`` (``DONE``), or tell it at once that nobody holds it."""
    refusal = broker.rpc.call_refusal(caller)
    if refusal is not None:
        _refuse(broker, peer, correlation, 'RPC call', refusal)
        return
    routed = broker.rpc.open_call(caller, correlation, bytes(identifier).decode())
    if routed is None:
        reason = b"no subscriber with identifier '" + bytes(identifier) + b"'"
        broker.answer(peer, Command.RPC_UNROUTABLE, correlation, reason)
        return
    call_id, owner = routed
    broker.send(owner, Command.RPC_REQUEST, protocol.number(call_id), identifier, payload)
    # After the request: a client calling its own subscriber has it handled when its rpc_send returns.
    broker.answer(peer, Command.DONE, correlation)


def _refuse(broker: Context, peer: Peer, correlation: bytes, what: str, text: str) -> None:
    """A bound of the broker (``rpc_routes.py``) was reached: the caller learns which."""
    broker.stats['refused_limit'] += 1
    broker.limited_log.warning('%s refused: %s', what, text, key=('limit', what, peer.routing_id))
    broker.answer(peer, Command.ERROR, correlation, ErrorCode.LIMIT, text.encode())


def reply(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    call_id = protocol.to_int(args[0])
    answered = broker.rpc.answer(client, call_id, final=args[1] == protocol.FLAG_TRUE)
    if answered is None:
        LOGGER.debug('reply from %s for unknown call %d dropped', client.name, call_id)
        return
    if answered.caller.routing_id in broker.clients:
        broker.send(answered.caller, Command.RPC_RESULT, answered.correlation, args[1], args[2])
