"""The limits of this machine, without any broker logic: a bare pyzmq broker hop and SQLite WAL commits."""

from __future__ import annotations

import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .procs import start_actor, stop_actor
from .workloads import Sizes, percentile, session

HOP_PAYLOAD = b'x' * 128


def hop_router(endpoint: str, q: Any, stop: Any) -> None:
    """Forward ``[src, dst, payload]`` to ``dst`` as ``[src, payload]``: the minimum a broker does. A message
    addressed to ``router`` goes straight back to its sender (the minimum of a confirmed send)."""
    import zmq

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    q.put(('ready',))
    while not stop.is_set():
        if router.poll(100):
            src, dst, payload = router.recv_multipart()
            router.send_multipart([src if dst == b'router' else dst, src, payload])
    router.close(0)
    ctx.term()


def hop_echo(endpoint: str, q: Any, stop: Any) -> None:
    """A DEALER that sends every message back to where it came from."""
    import zmq

    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b'echo')
    dealer.connect(endpoint)
    q.put(('ready',))
    while not stop.is_set():
        if dealer.poll(100):
            src, payload = dealer.recv_multipart()
            dealer.send_multipart([src, payload])
    dealer.close(0)
    ctx.term()


def hop_client(endpoint: str, q: Any, n: int, warmup: int, timeout: float, to: bytes = b'echo') -> None:
    """Round trips client -> router -> echo -> router -> client, one at a time; latencies in us. With
    ``to=b'router'``: client -> router -> client."""
    import zmq

    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b'client-' + to)
    dealer.connect(endpoint)
    deadline = time.monotonic() + timeout
    while True:  # the router drops messages to an echo it has not seen yet: retry the first one
        dealer.send_multipart([to, b'hello'])
        if dealer.poll(100):
            dealer.recv_multipart()
            break
        if time.monotonic() > deadline:
            q.put(('error', 'bare pyzmq hop: no answer from the echo'))
            return
    while dealer.poll(200):  # late answers to retried hellos
        dealer.recv_multipart()
    latencies = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        dealer.send_multipart([to, HOP_PAYLOAD])
        if not dealer.poll(int(timeout * 1000)):
            q.put(('error', 'bare pyzmq hop: round trip timed out'))
            return
        dealer.recv_multipart()
        if i >= warmup:
            latencies.append((time.perf_counter() - t0) * 1e6)
    q.put(('rpc', latencies))
    dealer.close(0)
    ctx.term()


def floor_hop(sizes: Sizes) -> dict[str, float]:
    """p50/p99 of a DEALER -> ROUTER -> DEALER round trip (3 processes, IPC), and of DEALER -> ROUTER -> back."""
    with tempfile.TemporaryDirectory(prefix='hop-') as tmp, session() as (inbox, stop):
        endpoint = f'ipc://{tmp}/hop.sock'
        inbox.procs.append(start_actor(hop_router, endpoint, inbox.q, stop))
        inbox.get('ready', 60)
        inbox.procs.append(start_actor(hop_echo, endpoint, inbox.q, stop))
        inbox.get('ready', 60)
        client = start_actor(hop_client, endpoint, inbox.q, sizes.rpc_calls, sizes.rpc_warmup, 30.0)
        inbox.procs.append(client)
        latencies = inbox.get('rpc', 120)[1]
        stop_actor(client)
        inbox.procs.remove(client)
        client = start_actor(hop_client, endpoint, inbox.q, sizes.rpc_calls, sizes.rpc_warmup, 30.0, b'router')
        inbox.procs.append(client)
        one_hop = inbox.get('rpc', 120)[1]
        stop_actor(client)
        inbox.procs.remove(client)
    return {
        'hop_p50_us': percentile(latencies, 50),
        'hop_p99_us': percentile(latencies, 99),
        'one_hop_p50_us': percentile(one_hop, 50),
        # A sender that waits for each confirm cannot go faster than one client -> router -> client round trip.
        'confirmed_sends_per_s': 1e6 / percentile(one_hop, 50),
    }


def _sqlite_rate(path: Path, synchronous: str, n: int, batch: int) -> float:
    """Rows per second inserting ``n`` rows of 1 KiB, ``batch`` rows per committed transaction."""
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute('PRAGMA journal_mode=WAL')
    conn.execute(f'PRAGMA synchronous={synchronous}')
    conn.execute('CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)')
    body = os.urandom(1024)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        conn.execute('BEGIN')
        conn.executemany('INSERT INTO t (body) VALUES (?)', [(body,)] * min(batch, n - start))
        conn.execute('COMMIT')
    rate = n / (time.perf_counter() - t0)
    conn.close()
    return rate


def sqlite_actor(q: Any, n: int) -> None:
    with tempfile.TemporaryDirectory(prefix='sqlite-') as tmp:
        path = Path(tmp) / 'floor.sqlite3'
        q.put(
            (
                'sqlite',
                {
                    'sqlite_commits_per_s': statistics.median([_sqlite_rate(path, 'NORMAL', n, 1) for _ in range(3)]),
                    'sqlite_fsync_commits_per_s': _sqlite_rate(path, 'FULL', max(200, n // 5), 1),
                    'sqlite_batched_rows_per_s': _sqlite_rate(path, 'NORMAL', n * 10, 100),
                },
            )
        )


def floor_sqlite(sizes: Sizes) -> dict[str, float]:
    """SQLite in WAL mode, 1 KiB rows: commits/s (synchronous=NORMAL), with fsync per commit (FULL), batched."""
    n = 2000 if sizes.tasks < 2000 else 5000
    with session() as (inbox, _stop):
        inbox.procs.append(start_actor(sqlite_actor, inbox.q, n))
        return dict(inbox.get('sqlite', 300)[1])


FLOORS = {'floor_hop': floor_hop, 'floor_sqlite': floor_sqlite}
