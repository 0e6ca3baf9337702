"""The broker's peers: sessions (:class:`Client`), sockets without one (:class:`Sender`), and what waits for a client
that does not read (:class:`Outbound`).

ZeroMQ's own queue to a peer holds ``send_hwm`` messages (it counts messages, not bytes); past it, messages wait in
two lanes per client, as RabbitMQ keeps a communicator's broadcasts in a queue of their own: what must arrive
(deliveries, RPC requests and results, confirms, ``DONE``) goes first, within ``outbound_limit`` messages and
``outbound_bytes`` bytes (one larger message may wait alone); broadcasts fill what ZeroMQ takes after that, within the
same limits, and past them the oldest broadcasts are dropped (as RabbitMQ drops the head of a full queue). A message
that must arrive and does not fit, or a client that takes nothing for ``peer_timeout`` while messages wait, is the
slow-client rule: its session ends with the batch (the broker drops the clients :meth:`Outbound.take_overflowed`
returns), its tasks go to the others. Waiting broadcasts do not hold back a client's deliveries, only waiting
messages of the first lane do (:attr:`Client.stalled`).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from ..names import printable_id
from ..ratelimit import RateLimitedLog
from .config import BrokerConfig
from .deliveries import Held
from .liveness import ListeningClock

__all__ = ('Client', 'Outbound', 'Sender')

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sender:
    """A socket that only submits tasks (TASK_SUBMIT) and has no session: answered directly, nothing kept about it."""

    routing_id: bytes
    socket: zmq.Socket


@dataclass(eq=False)
class Client:
    """A connected client (one communicator), known from its HELLO until its BYE or its silence."""

    routing_id: bytes
    socket: zmq.Socket
    name: str
    last_seen: float
    last_sent: float = 0.0
    # What waits for ZeroMQ to take it: messages that must arrive, then broadcasts (entries: frames, size).
    outbound: collections.deque[tuple[list[bytes], int]] = field(default_factory=collections.deque)
    outbound_bytes: int = 0
    broadcasts: collections.deque[tuple[list[bytes], int]] = field(default_factory=collections.deque)
    broadcast_bytes: int = 0
    outbound_progress: float = 0.0  # when ZeroMQ last took a waiting message (or the first began to wait)
    overflowed: bool = False  # past its outbound budget: the session ends with this batch
    held: Held = field(default_factory=Held)  # the deliveries it holds (see deliveries.py)
    prefetch: dict[str, int] = field(default_factory=dict)  # queue -> prefetch (0 = unlimited)
    pid: int = 0  # the client's process id, as it said in its HELLO (0 when unknown)
    secret: bytes = b''  # handed to this session only, in its WELCOME (see sessions.py)
    proof: str = ''  # what outlives the session of its secret: a hash, stored with what it holds and is owed
    rpc_identifiers: set[str] = field(default_factory=set)
    calls_in: set[int] = field(default_factory=set)  # RPC calls this client must answer
    calls_out: int = 0  # RPC calls this client made that wait for their final answer
    subscribed: bool = False

    @property
    def stalled(self) -> bool:
        return len(self.outbound) > 0 or self.overflowed

    def room(self, queue: str) -> int:
        prefetch = self.prefetch.get(queue)
        if prefetch is None:
            return 0
        if prefetch == 0:
            return 1 << 30
        return prefetch - self.held.in_queue(queue)


class Outbound:
    """What the broker could not hand to ZeroMQ yet, per client, within its limits."""

    def __init__(
        self,
        config: BrokerConfig,
        stats: collections.Counter[str],
        log: RateLimitedLog,
        wake: Callable[[str], None],
        listening: ListeningClock,
    ) -> None:
        self.config = config
        self._listening = listening  # "takes nothing for the peer timeout" is counted in listening time too
        self.stats = stats
        self.limited_log = log
        self._wake = wake  # a queue a client consumes may hand it tasks again
        self.backlogged: dict[Client, None] = {}  # clients with messages waiting in their outbound queue
        self.overflowed: list[Client] = []  # clients past their outbound budget, dropped at the end of the batch
        self._memory_freed = False

    def send(self, client: Client, frames: list[bytes], droppable: bool) -> None:
        """Send at once if ZeroMQ takes it and nothing waits before it in its lane, else keep it (a broadcast is
        ``droppable``). A message that must arrive goes ahead of waiting broadcasts."""
        if droppable:
            if client.outbound or client.broadcasts or not self._try(client, frames):
                self._wait_broadcast(client, frames)
        elif client.outbound or not self._try(client, frames):
            self._wait(client, frames)

    def _try(self, client: Client, frames: list[bytes]) -> bool:
        """Hand ZeroMQ the message; whether it took it (a peer gone counts as taken: nobody will read it)."""
        try:
            client.socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as exception:
            if exception.errno != zmq.EHOSTUNREACH:
                raise
            # The peer is gone (its pipe closed); the heartbeat check will clean up after it.
            LOGGER.debug('client %s unreachable: a message to it dropped', client.name)
        return True

    def take_overflowed(self) -> list[Client]:
        overflowed, self.overflowed = self.overflowed, []
        return overflowed

    def take_memory_freed(self) -> bool:
        """Whether much memory was freed since the last call (the broker hands it back to the system)."""
        freed, self._memory_freed = self._memory_freed, False
        return freed

    def forget(self, client: Client) -> None:
        """The client's session ended: nothing waits for it any more."""
        self.backlogged.pop(client, None)
        if client.outbound_bytes + client.broadcast_bytes > 1024 * 1024:
            self._memory_freed = True
        self._clear(client)

    @staticmethod
    def _clear(client: Client) -> None:
        client.outbound.clear()
        client.broadcasts.clear()
        client.outbound_bytes = client.broadcast_bytes = 0

    def _began_waiting(self, client: Client) -> None:
        if client not in self.backlogged:
            client.outbound_progress = self._listening.now
            self.backlogged[client] = None
        waiting = client.outbound_bytes + client.broadcast_bytes
        if waiting > self.stats['outbound_peak_bytes']:
            self.stats['outbound_peak_bytes'] = waiting

    def _wait(self, client: Client, frames: list[bytes]) -> None:
        size = sum(len(frame) for frame in frames)
        if client.outbound and (
            len(client.outbound) >= self.config.outbound_limit
            or client.outbound_bytes + size > self.config.outbound_bytes
        ):
            self._overflow(client, size)
            return
        client.outbound.append((frames, size))
        client.outbound_bytes += size
        self._began_waiting(client)

    def _wait_broadcast(self, client: Client, frames: list[bytes]) -> None:
        size = sum(len(frame) for frame in frames)
        dropped = 0
        while client.broadcasts and (
            len(client.broadcasts) >= self.config.outbound_limit
            or client.broadcast_bytes + size > self.config.outbound_bytes
        ):
            client.broadcast_bytes -= client.broadcasts.popleft()[1]  # the oldest goes, as RabbitMQ's drop-head
            dropped += 1
        client.broadcasts.append((frames, size))
        client.broadcast_bytes += size
        if dropped:
            self._dropped_broadcasts(client, dropped)
        self._began_waiting(client)

    def _dropped_broadcasts(self, client: Client, count: int) -> None:
        self.stats['broadcasts_dropped_to_slow_clients'] += count
        self.limited_log.warning(
            'client %s (%s) is not reading its broadcasts: %d dropped (%d bytes of broadcasts waiting for it)',
            client.name,
            printable_id(client.routing_id),
            count,
            client.broadcast_bytes,
            key=('broadcasts-dropped', client.routing_id),
        )

    def _overflow(self, client: Client, size: int) -> None:
        """A client that does not read what it asked for: its session ends with this batch (its held tasks go to the
        others, its RPC callers are told), and what waited for it is dropped now. A slow or stopped client loses its
        tasks to others, not the broker its memory or its liveness (1.5 GiB for one deaf subscriber, before)."""
        self.stats['slow_clients_dropped'] += 1
        self.limited_log.warning(
            'client %s (%s) is not reading: %d message(s), %d bytes waiting for it%s: its session ends, %d held '
            'task(s) go to other consumers',
            client.name,
            printable_id(client.routing_id),
            len(client.outbound) + len(client.broadcasts),
            client.outbound_bytes + client.broadcast_bytes,
            f' (and {size} more)' if size else f', none taken for {self.config.peer_timeout:g}s',
            len(client.held),
            key=('overflow', client.routing_id),
        )
        client.overflowed = True
        self._clear(client)
        self.backlogged.pop(client, None)
        self.overflowed.append(client)
        self._memory_freed = True

    def flush(self) -> None:
        """Hand ZeroMQ what waits, in order, as far as it takes it, the first lane first; a client it takes nothing
        from for the peer timeout is not reading."""
        now = self._listening.now
        for client in list(self.backlogged):
            stalled = bool(client.outbound)
            for lane in (client.outbound, client.broadcasts):
                while lane:
                    if not self._try(client, lane[0][0]):
                        break
                    size = lane.popleft()[1]
                    if lane is client.outbound:
                        client.outbound_bytes -= size
                    else:
                        client.broadcast_bytes -= size
                    client.outbound_progress = now  # ZeroMQ's queue took one: the client reads
                if lane:
                    break  # ZeroMQ takes no more now
            if stalled and not client.outbound:  # no longer stalled: its queues may hand it tasks again
                for name in client.prefetch:
                    self._wake(name)
            if not client.outbound and not client.broadcasts:
                del self.backlogged[client]
            elif now - client.outbound_progress > self.config.peer_timeout:
                self._overflow(client, 0)  # alive (it heartbeats), but it has taken nothing for that long
