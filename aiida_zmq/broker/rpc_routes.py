"""The broker's RPC routing table: which client holds each identifier, and the calls waiting for an answer.

Pure bookkeeping: the broker (``server.py``) sends what the table decides. An identifier has one holder at a time
(kiwipy's RabbitMQ communicator declares one exclusive queue per identifier, so a second subscriber is refused); a
call is remembered from its routing to its final reply, and when its recipient goes away its caller is told.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .config import BrokerConfig
from .peers import Client

__all__ = ('RpcCall', 'RpcRoutes')


@dataclass(slots=True)
class RpcCall:
    caller: Client  # the session the replies go to
    correlation: bytes  # the caller's, echoed in every RPC_RESULT
    owner: Client  # the holder of the identifier, which answers


class RpcRoutes:
    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.owners: dict[str, Client] = {}
        self.calls: dict[int, RpcCall] = {}
        self._call_ids = itertools.count(1)

    def register_refusal(self, client: Client, identifier: str) -> str | None:
        """Why ``client`` may not hold one more identifier (its limit, or the broker's), or None when it may."""
        if identifier in client.rpc_identifiers:
            return None
        mine, limit = len(client.rpc_identifiers), self.config.max_rpc_per_client
        if mine >= limit:
            return f'this client holds {mine} RPC identifiers, the most one client may (max_rpc_per_client={limit})'
        if len(self.owners) >= self.config.max_rpc:
            return f'the broker holds {len(self.owners)} RPC identifiers, its maximum (max_rpc={self.config.max_rpc})'
        return None

    def call_refusal(self, caller: Client) -> str | None:
        """Why ``caller`` may not open one more call (never-answered calls are held until answered), or None."""
        limit = self.config.max_open_calls_per_client
        if caller.calls_out >= limit:
            return (
                f'this client has {caller.calls_out} RPC calls waiting for an answer, the most one client may '
                f'(max_open_calls_per_client={limit})'
            )
        if len(self.calls) >= self.config.max_open_calls:
            return f'the broker holds {len(self.calls)} unanswered RPC calls, its maximum (max_open_calls)'
        return None

    def register(self, client: Client, identifier: str) -> bool:
        """Give ``identifier`` to ``client``; ``False`` if another client holds it."""
        owner = self.owners.get(identifier)
        if owner is not None and owner is not client:
            return False
        self.owners[identifier] = client
        client.rpc_identifiers.add(identifier)
        return True

    def unregister(self, client: Client, identifier: str) -> None:
        if self.owners.get(identifier) is client:
            del self.owners[identifier]
        client.rpc_identifiers.discard(identifier)

    def open_call(self, caller: Client, correlation: bytes, identifier: str) -> tuple[int, Client] | None:
        """Route a call: its id and recipient, or ``None`` when nobody holds the identifier (unroutable)."""
        owner = self.owners.get(identifier)
        if owner is None:
            return None
        call_id = next(self._call_ids)
        self.calls[call_id] = RpcCall(caller, correlation, owner)
        owner.calls_in.add(call_id)
        caller.calls_out += 1
        return call_id, owner

    def answer(self, client: Client, call_id: int, final: bool) -> RpcCall | None:
        """The call a reply from ``client`` belongs to (forgotten with the final one); ``None`` if it is not its."""
        call = self.calls.get(call_id)
        if call is None or call.owner is not client:
            return None
        if final:
            del self.calls[call_id]
            client.calls_in.discard(call_id)
            call.caller.calls_out -= 1
        return call

    def forget(self, client: Client) -> list[RpcCall]:
        """Free a departed client's identifiers and drop its calls; return the calls it owed an answer to."""
        for identifier in client.rpc_identifiers:
            if self.owners.get(identifier) is client:
                del self.owners[identifier]
        unanswered = [call for call_id in client.calls_in if (call := self.calls.pop(call_id, None)) is not None]
        for call in unanswered:
            call.caller.calls_out -= 1
        for call_id in [call_id for call_id, call in self.calls.items() if call.caller is client]:
            del self.calls[call_id]
        return unanswered
