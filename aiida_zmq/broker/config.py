"""The broker's tunables, each default written once: ``aiida-zmq serve`` and the AiiDA plugin's profile options take
theirs from :data:`DEFAULTS`.

This module imports nothing but the standard library, so that the CLI can read the defaults without loading the
broker.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ('DEFAULTS', 'BrokerConfig')


@dataclass
class BrokerConfig:
    """Tunables of a broker. Times in seconds."""

    heartbeat: float = 1.0  # interval of heartbeats in both directions
    peer_timeout: float = 10.0  # silence after which a client is dead and its held tasks go to others
    max_message_bytes: int = 64 * 1024 * 1024
    max_deliveries: int = 20  # deliveries of one task before it goes to the dead-letter queue
    fsync: bool = True  # sync every batch's commit before its confirms (survives power loss, not only crashes)
    task_history: bool = True  # keep each task's events in the store (aiida_zmq.store_history)
    batch_size: int = 2000  # messages read per turn of the loop before the batch is committed
    outbound_limit: int = 50_000  # messages waiting for one client before it counts as not reading (its session ends)
    outbound_bytes: int = 32 * 1024 * 1024  # bytes waiting for one client before the same (one larger message may)
    # Messages ZeroMQ itself queues to (ZMQ_SNDHWM) and from (ZMQ_RCVHWM) one peer. It counts messages, not bytes: a
    # peer that does not read can hold send_hwm of the largest messages there. Shorter bounds that, but each turn then
    # moves fewer messages to a busy reader (100: an RPC behind a broadcast flood waited 3.6 s instead of 17 ms).
    send_hwm: int = 1000
    receive_hwm: int = 1000
    window: int = 2000  # ready tasks per queue kept in memory; the rest stay on disk
    window_bytes: int = 32 * 1024 * 1024
    reclaim_grace: float | None = None  # after a restart, how long holders may reclaim tasks (default: peer_timeout)
    retry_backoff: float = 0.1  # first delay before a rejected task is offered again; doubles per delivery
    retry_backoff_max: float = 10.0
    quick_release: float = 10.0  # a pushed task given back cleanly sooner than this after its delivery counts as one
    max_queues: int = 10_000  # queues in all (each costs memory whether or not it holds tasks)
    max_queues_per_client: int = 1_000  # queues one client consumes at once
    # What one client, and all of them, can make the broker hold (issue 21.4); past each, the request is answered
    # ERROR limit with a text naming the bound. An AiiDA daemon worker holds an RPC identifier per running process.
    max_rpc_per_client: int = 10_000  # RPC identifiers one client holds
    max_rpc: int = 100_000  # RPC identifiers in all
    max_open_calls_per_client: int = 10_000  # RPC calls of one client waiting for their answer
    max_open_calls: int = 100_000  # in all
    max_sessions: int = 4_096  # sessions in all (each holds a connection, hence a descriptor)
    status_top: int = 100  # queues and clients `status` lists (the largest first), with the count of the rest
    store_retry: float = 0.5  # after the store failed (disk full), first wait before trying again; doubles
    store_retry_max: float = 10.0
    queue_expiry: float = 60.0  # an empty queue nobody consumes is forgotten after this long (RabbitMQ's x-expires)
    # How long to wait for the data directory's lock. ``None``: up to 30 s for a holder that does not serve (a broker
    # starting or still closing, an offline submit), and a refusal at once, naming it, for a broker that serves.
    lock_timeout: float | None = None
    log_interval: float = 10.0  # a line a peer can make the broker repeat: 5 per interval, the rest counted
    curve: bool = False  # CURVE on tcp:// endpoints (keys in DATA_DIR/curve); TCP is refused without it
    insecure_tcp: bool = False  # plain TCP on loopback only (any local user can connect): for tests

    @property
    def grace(self) -> float:
        return self.peer_timeout if self.reclaim_grace is None else self.reclaim_grace


#: The defaults, for the options that expose a field (``aiida-zmq serve``, the AiiDA profile's broker options).
DEFAULTS = BrokerConfig()
