"""Sessions bound to a secret (issue 21.2, 20.3): who may say HELLO for a routing id, name a session in TASK_SUBMIT or
RPC_SUBMIT, reclaim held tasks after a restart, and get a task's results.

A routing id is no proof of anything: a peer picks it freely, and the broker logs it. So the broker hands every new
session a random secret in its WELCOME, to that session only, and the session says it again in every HELLO (after a
broker restart too). A HELLO for a routing id whose session lives must carry that session's secret, or it is refused
(``ERROR session-taken``) and the session stays its owner's; a HELLO for a routing id without a session keeps the
secret it carries (the client resumes its identity: nobody but its holder knows it) or gets a new one. Everything the
broker binds to a session beyond its connection is bound to a *proof* of its secret (a hash: the store is readable
by whoever can read the data directory, the secret itself is written nowhere): the address a task's results go to,
and who holds a delivered task (so that only its holder reclaims it after a restart).

ZeroMQ's ``ROUTER_HANDOVER`` is off (``datadir.py``): a second connection with a live connection's routing id is not
attached, so it cannot take over the deliveries and RPCs of the first.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from .peers import Client

__all__ = ('Sessions', 'new_secret', 'proof', 'reply_address', 'reply_session')

SECRET_BYTES = 16  # random bytes of a secret (sent as 32 hex digits)


def new_secret() -> bytes:
    return secrets.token_hex(SECRET_BYTES).encode()


def proof(secret: bytes) -> str:
    """What the broker keeps of a secret where it outlives the session (the store): a hash, not the secret."""
    return hashlib.sha256(b'aiida-zmq session ' + secret).hexdigest()[:32]


def reply_address(client: Client) -> bytes:
    """Where a task's results go: the session's routing id and the proof of its secret (stored with the task)."""
    return client.routing_id + b' ' + client.proof.encode()


def reply_session(address: bytes) -> tuple[bytes, str]:
    """The routing id and proof of a :func:`reply_address` (an address of an older version has no proof: '')."""
    routing_id, _, digest = address.rpartition(b' ')
    if not routing_id:
        return address, ''
    return routing_id, digest.decode(errors='replace')


class Sessions:
    """The live sessions by secret, beside the broker's sessions by routing id (``clients``, which ZeroMQ addresses)."""

    def __init__(self, clients: dict[bytes, Client]) -> None:
        self._clients = clients
        self._by_secret: dict[bytes, Client] = {}

    def __len__(self) -> int:
        return len(self._by_secret)

    def admit(self, routing_id: bytes, presented: bytes) -> bytes | None:
        """The secret a HELLO from ``routing_id`` saying ``presented`` gets, or None when it is refused: a live
        session of that routing id has another secret."""
        client = self._clients.get(routing_id)
        if client is not None:
            return client.secret if hmac.compare_digest(presented, client.secret) else None
        if presented and presented in self._by_secret:
            return None  # another live session's secret, said from another routing id
        return presented or new_secret()

    def bind(self, client: Client, secret: bytes) -> None:
        client.secret = secret
        client.proof = proof(secret)
        self._by_secret[secret] = client

    def forget(self, client: Client) -> None:
        if self._by_secret.get(client.secret) is client:
            del self._by_secret[client.secret]

    def named(self, secret: bytes) -> Client | None:
        """The session a TASK_SUBMIT / RPC_SUBMIT names by its secret, if it lives."""
        return self._by_secret.get(secret) if secret else None

    def results_to(self, address: bytes) -> Client | None:
        """The live session a task's results go to: the one of that routing id, if its secret has that proof."""
        routing_id, digest = reply_session(address)
        client = self._clients.get(routing_id)
        if client is None or not digest or not hmac.compare_digest(client.proof, digest):
            return None
        return client
