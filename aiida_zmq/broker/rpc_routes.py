"""The broker's RPC routing table: which client holds each identifier, and the calls waiting for an answer.

Pure bookkeeping: the broker (``server.py``) sends what the table decides. An identifier has one holder at a time
(kiwipy's RabbitMQ communicator declares one exclusive queue per identifier, so a second subscriber is refused); a
call is remembered from its routing to its final reply, and when its recipient goes away its caller is told.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .peers import Client

__all__ = ('RpcCall', 'RpcRoutes')


@dataclass(slots=True)
class RpcCall:
    caller: Client  # the session the replies go to
    correlation: bytes  # the caller's, echoed in every RPC_RESULT
    owner: Client  # the holder of the identifier, which answers


class RpcRoutes:
    def __init__(self) -> None:
        self.owners: dict[str, Client] = {}
        self.calls: dict[int, RpcCall] = {}
        self._call_ids = itertools.count(1)

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
        return call_id, owner

    def answer(self, client: Client, call_id: int, final: bool) -> RpcCall | None:
        """The call a reply from ``client`` belongs to (forgotten with the final one); ``None`` if it is not its."""
        call = self.calls.get(call_id)
        if call is None or call.owner is not client:
            return None
        if final:
            del self.calls[call_id]
            client.calls_in.discard(call_id)
        return call

    def forget(self, client: Client) -> list[RpcCall]:
        """Free a departed client's identifiers and drop its calls; return the calls it owed an answer to."""
        for identifier in client.rpc_identifiers:
            if self.owners.get(identifier) is client:
                del self.owners[identifier]
        unanswered = [call for call_id in client.calls_in if (call := self.calls.pop(call_id, None)) is not None]
        for call_id in [call_id for call_id, call in self.calls.items() if call.caller is client]:
            del self.calls[call_id]
        return unanswered
