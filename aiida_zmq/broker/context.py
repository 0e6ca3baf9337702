"""What the broker's handlers and ADMIN operations see of the broker: :class:`Context`, and the :class:`Batch` of
what waits for the turn's commit.

The handlers (``handlers/``) and the operations (``admin.py``) act through this interface only, so that they import
neither ``server.py`` nor each other's private state; :class:`aiida_zmq.broker.server.Broker` is the one
implementation. Everything here runs on the broker's loop thread.
"""

from __future__ import annotations

import collections
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol import Command
from ..ratelimit import RateLimitedLog
from ..store import StoredTask, TaskStore
from .config import BrokerConfig
from .deliveries import Deliveries
from .intake import Intake
from .liveness import ListeningClock
from .peers import Client, Outbound, Sender
from .queues import TaskQueues
from .rpc_routes import RpcRoutes
from .sessions import Sessions
from .store_fault import StoreFault

__all__ = ('Batch', 'Context', 'Peer')

#: Who a request came from: a session, or a socket without one (answered on that socket).
Peer: t.TypeAlias = Client | Sender


@dataclass
class Batch:
    """What this turn of the loop did that waits for its commit: nothing in it leaves before the store has it."""

    #: (peer, correlation, task id, sender's session): the confirms of the tasks stored in this batch.
    confirms: list[tuple[Peer, bytes, int, bytes | None]] = field(default_factory=list)
    inserted: list[StoredTask] = field(default_factory=list)  # the new tasks (refused if the commit fails)
    #: (client, task, TASK_DELIVER or TASK_GOT, its first argument): the deliveries, sent after the commit.
    outgoing: list[tuple[Client, StoredTask, Command, bytes]] = field(default_factory=list)
    admin_replies: list[tuple[Client, bytes, bytes]] = field(default_factory=list)  # (client, correlation, JSON)

    def stored(self, task: StoredTask, peer: Peer, correlation: bytes, session: bytes | None) -> None:
        """A task stored in this batch: its confirm goes to ``peer`` after the commit."""
        self.inserted.append(task)
        self.confirms.append((peer, correlation, task.id, session))

    def delivered(self, client: Client, task: StoredTask, command: Command, first: bytes) -> None:
        self.outgoing.append((client, task, command, first))

    def reply_after_commit(self, client: Client, correlation: bytes, response: bytes) -> None:
        self.admin_replies.append((client, correlation, response))


class Context(t.Protocol):
    """The broker as its handlers and ADMIN operations see it."""

    config: BrokerConfig
    epoch: str
    started: float
    endpoints: list[str]
    data_dir: Path
    clients: dict[bytes, Client]
    sessions: Sessions  # the same sessions by secret (sessions.py)
    queues: TaskQueues
    deliveries: Deliveries
    rpc: RpcRoutes
    outbound: Outbound
    intake: Intake
    stats: collections.Counter[str]
    limited_log: RateLimitedLog
    store_fault: StoreFault
    batch: Batch
    listening: ListeningClock  # peers' silence and the reclaim grace are counted in listening time

    @property
    def store(self) -> TaskStore:
        """The open task store."""

    def send(self, client: Client, command: Command, *args: bytes) -> None:
        """Send to a client's session (through its outbound queue: never blocks)."""

    def answer(self, peer: Peer, command: Command, *args: bytes) -> None:
        """Answer a client through its session, a socket without a session directly."""

    def drop_client(self, client: Client, *, released: bool, why: str = ...) -> None:
        """End a client's session: its held tasks go back (``why`` goes into their history), its RPC identifiers
        free up."""
