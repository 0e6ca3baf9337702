"""Scale (aiida-zmq only): enqueue N tasks, measure the broker's RSS, kill -9 it, time the restart, drain."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Any

from .actors import communicator, reporting
from .clients import ClientSpec, preload, resolve
from .procs import CTX, BenchError, start_actor
from .servers import AiidaZmqServer
from .workloads import session

PROGRESS_EVERY = 10_000


def enqueue(spec: ClientSpec, q: Any, n: int, timeout: float) -> None:
    """Send ``n`` small no_reply tasks; ``task_send`` returns once the broker has stored each."""
    with reporting(q), communicator(spec) as comm:
        deadline = time.monotonic() + timeout
        t0 = time.perf_counter()
        for i in range(n):
            comm.task_send({'i': i, 'pad': 'x' * 200}, no_reply=True)
            if time.monotonic() > deadline:
                raise TimeoutError(f'enqueued only {i} of {n} within {timeout:.0f} s')
        q.put(('enqueued', n / (time.perf_counter() - t0)))


def probe(spec: ClientSpec, q: Any, go: Any, timeout: float) -> None:
    """Once told to go, connect (retrying) and answer an RPC to itself: a round trip through the broker."""
    with reporting(q):
        preload(spec)
        q.put(('ready',))
        go.wait(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with communicator(spec) as comm:
                    identifier = f'bench-probe-{uuid.uuid4().hex[:12]}'
                    comm.add_rpc_subscriber(lambda _comm, msg: msg, identifier=identifier)
                    resolve(comm.rpc_send(identifier, 'ping'), deadline)
                    q.put(('probed', time.perf_counter()))
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def drain(spec: ClientSpec, q: Any, stop: Any, n: int, timeout: float) -> None:
    """Consume until ``n`` distinct tasks were seen; report progress and the time of the last one."""
    with reporting(q), communicator(spec) as comm:
        seen: set[int] = set()
        first: list[float] = []

        def on_task(_comm: Any, task: Any) -> None:
            if not first:
                first.append(time.perf_counter())
            seen.add(task['i'])
            if len(seen) == n:
                q.put(('drained', first[0], time.perf_counter()))

        comm.add_task_subscriber(on_task)
        stop.wait(timeout)
        q.put(('count', len(seen)))


def _store_mib(data_dir: Path) -> float:
    return sum(p.stat().st_size for p in data_dir.glob('tasks.sqlite3*')) / 2**20


def run(root: Path, n: int, timeout: float) -> dict[str, float]:
    import psutil

    server = AiidaZmqServer(root)
    bound = max(timeout, n / 500)  # enqueue and drain must go faster than 500 tasks/s
    try:
        endpoint = server.start()
        spec = ClientSpec(kind='aiida-zmq', endpoint=endpoint, prefetch=200).with_fresh_queue()
        with session() as (inbox, _stop):
            inbox.procs.append(start_actor(enqueue, spec, inbox.q, n, bound))
            enqueue_rate = inbox.get('enqueued', bound + 60)[1]
        rss = psutil.Process(server.pid()).memory_info().rss / 2**20
        store = _store_mib(server.dir)
        server.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        server.proc.wait(10)  # type: ignore[union-attr]
        (server.dir / 'broker.json').unlink(missing_ok=True)  # a crashed broker leaves it behind
        go = CTX.Event()
        with session() as (inbox, _stop):
            inbox.procs.append(start_actor(probe, spec, inbox.q, go, 120.0))
            inbox.get('ready', 60)
            go.set()
            t0 = time.perf_counter()
            server.start()
            t_info = time.perf_counter()
            t_ready = inbox.get('probed', 180)[1]
        with session() as (inbox, stop):
            inbox.procs.append(start_actor(drain, spec, inbox.q, stop, n, bound + 60))
            try:
                _, t_first, t_last = inbox.get('drained', bound)
            except BenchError as exc:
                stop.set()
                raise BenchError(f'{exc}; drained {inbox.get("count", 30)[1]} of {n}')
    finally:
        server.stop()
    return {
        'n': n,
        'enqueue_per_s': enqueue_rate,
        'rss_mib': rss,
        'store_mib': store,
        'restart_info_s': t_info - t0,
        'restart_ready_s': t_ready - t0,
        'drain_per_s': n / (t_last - t_first),
    }
