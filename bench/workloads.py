"""The broker workloads, orchestrated from the harness. Each returns a dict of metrics or raises ``BenchError``
(a failed run: lost or unanswered messages, a timeout, a dead actor), which is recorded as a failure."""

from __future__ import annotations

import dataclasses
import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import actors
from .clients import ClientSpec
from .procs import CTX, BenchError, Inbox, start_actor, stop_actor


@dataclasses.dataclass
class Sizes:
    """Workload sizes; ``quick()`` shrinks them for a short run."""

    tasks: int = 2000
    task_bytes: int = 1024
    rpc_calls: int = 1000
    rpc_warmup: int = 50
    subscribers: int = 10
    broadcasts: int = 500
    connects: int = 5
    clients: int = 100
    clients_per_process: int = 10
    fanouts: int = 20
    e2e_chains: int = 100
    e2e_parents: int = 50
    control_parents: int = 60  # live work chains, each with a live job: 120 processes
    control_kills: int = 20
    timeout: float = 120.0

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            tasks=1000,
            rpc_calls=300,
            rpc_warmup=20,
            broadcasts=100,
            connects=3,
            clients=30,
            fanouts=10,
            e2e_chains=20,
            e2e_parents=10,
            control_parents=20,
            control_kills=5,
            timeout=60.0,
        )


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


CLOSE_GRACE = 12.0


@contextmanager
def session() -> Iterator[tuple[Inbox, Any]]:
    """A queue and a stop event for one measurement; every actor started in it is stopped on exit."""
    q, stop = CTX.Queue(), CTX.Event()
    inbox = Inbox(q)
    try:
        yield inbox, stop
    finally:
        stop.set()
        for proc in inbox.procs:
            stop_actor(proc, timeout=CLOSE_GRACE)
        q.close()
        q.join_thread()


def _start(inbox: Inbox, target: Any, *args: Any) -> None:
    inbox.procs.append(start_actor(target, *args))


def tasks(spec: ClientSpec, sizes: Sizes, no_reply: bool = False) -> dict[str, float]:
    """One producer sends ``sizes.tasks`` tasks of ~1 KiB; one consumer answers them (or just counts them).

    The run fails unless every future resolves to the consumer's own result (with replies) and the consumer sees
    every task, within the bound.
    """
    spec, run, n, timeout = spec.with_fresh_queue(), uuid.uuid4().hex[:12], sizes.tasks, sizes.timeout
    with session() as (inbox, stop):
        _start(inbox, actors.task_consumer, spec, inbox.q, stop, run, n, timeout + 60)
        inbox.get('ready', 60)
        _start(inbox, actors.task_producer, spec, inbox.q, stop, run, n, sizes.task_bytes, no_reply, timeout)
        _, t0, t_sent, t_end, answered, n_errors, errors = inbox.get('sent', timeout + 60)
        problems = []
        if not no_reply and answered < n:
            problems.append(
                f'{n - answered} of {n} futures did not give the consumer result ({n_errors} errors: {errors})'
            )
        try:
            t_done = inbox.get('done', max(1.0, timeout - (time.perf_counter() - t0)))[1]
        except BenchError as exc:
            t_done = None
            stop.set()
            problems.append(f'{exc}: consumer saw {inbox.get("count", 15)[1]} of {n} tasks')
        if problems:
            if t_done is not None:
                problems.append(f'consumer saw all {n} tasks at {n / (t_done - t0):,.0f} tasks/s')
            raise BenchError('; '.join(problems))
    end = t_done if no_reply else max(t_end, t_done)
    return {'tasks_per_s': n / (end - t0), 'send_per_s': n / (t_sent - t0)}


def tasks_noreply(spec: ClientSpec, sizes: Sizes) -> dict[str, float]:
    return tasks(spec, sizes, no_reply=True)


def rpc(spec: ClientSpec, sizes: Sizes) -> dict[str, float]:
    """``sizes.rpc_calls`` sequential RPCs to a subscriber in another process."""
    identifier = f'bench-rpc-{uuid.uuid4().hex[:12]}'
    with session() as (inbox, stop):
        _start(inbox, actors.rpc_server, spec, inbox.q, stop, identifier, sizes.timeout + 60)
        inbox.get('ready', 60)
        _start(inbox, actors.rpc_client, spec, inbox.q, identifier, sizes.rpc_calls, sizes.rpc_warmup, sizes.timeout)
        latencies = inbox.get('rpc', sizes.timeout + 60)[1]
    return {
        'rpc_p50_us': percentile(latencies, 50),
        'rpc_p99_us': percentile(latencies, 99),
        'rpc_mean_us': statistics.fmean(latencies),
    }


def connect(spec: ClientSpec, sizes: Sizes) -> dict[str, float]:
    """``sizes.connects`` fresh processes, one after the other: connect, then a first RPC (median over them)."""
    identifier = f'bench-rpc-{uuid.uuid4().hex[:12]}'
    connects, firsts = [], []
    with session() as (inbox, stop):
        _start(inbox, actors.rpc_server, spec, inbox.q, stop, identifier, sizes.timeout + 120)
        inbox.get('ready', 60)
        for _ in range(sizes.connects):
            _start(inbox, actors.connect_probe, spec, inbox.q, identifier, 30.0)
            _, connect_ms, first_ms = inbox.get('connect', 60)
            connects.append(connect_ms)
            firsts.append(first_ms)
            stop_actor(inbox.procs.pop())
    return {'connect_ms': statistics.median(connects), 'connect_first_rpc_ms': statistics.median(firsts)}


def broadcast(spec: ClientSpec, sizes: Sizes) -> dict[str, float]:
    """``sizes.subscribers`` subscriber processes each receive ``sizes.broadcasts`` broadcasts from one sender."""
    run, n, subs, timeout = uuid.uuid4().hex[:12], sizes.broadcasts, sizes.subscribers, sizes.timeout
    go = CTX.Event()
    with session() as (inbox, stop):
        for idx in range(subs):
            _start(inbox, actors.broadcast_subscriber, spec, inbox.q, stop, idx, run, n, timeout + 90)
        for _ in range(subs):
            inbox.get('ready', 90)
        _start(inbox, actors.broadcast_sender, spec, inbox.q, go, stop, run, n, timeout)
        inbox.get('ready', 60)
        for _ in range(subs):
            inbox.get('probe', 30)
        go.set()
        t0 = inbox.get('sent', timeout)[1]
        ends = []
        try:
            for _ in range(subs):
                ends.append(inbox.get('done', max(1.0, timeout - (time.perf_counter() - t0)))[2])
        except BenchError as exc:
            stop.set()
            counts = []
            for _ in range(subs):
                try:
                    counts.append(inbox.get('count', 15)[2])
                except BenchError:
                    break
            raise BenchError(f'{exc}: {len(ends)} of {subs} subscribers got all {n}; counts {sorted(counts)}')
    return {'deliveries_per_s': subs * n / (max(ends) - t0), 'broadcasts_per_s': n / (max(ends) - t0)}


def clients(spec: ClientSpec, sizes: Sizes) -> dict[str, float]:
    """``sizes.clients`` connected communicators (``clients_per_process`` per process), each with an RPC and a
    broadcast subscriber: the time to connect them all, the latency of one broadcast reaching all of them, and RPC
    round trips while they are connected."""
    run, per = uuid.uuid4().hex[:12], sizes.clients_per_process
    processes = max(1, sizes.clients // per)
    go = CTX.Event()
    with session() as (inbox, stop):
        t0 = time.perf_counter()
        for idx in range(processes):
            _start(inbox, actors.many_clients, spec, inbox.q, stop, idx, per, run, sizes.fanouts, sizes.timeout + 120)
        for _ in range(processes):
            inbox.get('ready', sizes.timeout)
        connected_s = time.perf_counter() - t0
        _start(inbox, actors.fan_sender, spec, inbox.q, go, stop, run, sizes.fanouts, 200, sizes.timeout)
        inbox.get('ready', 60)
        for _ in range(processes):
            inbox.get('probe', 60)
        go.set()
        _, sent, latencies = inbox.get('fan_sent', sizes.timeout)
        last: dict[int, float] = {}
        for _ in range(processes * sizes.fanouts):
            _, _idx, i, t = inbox.get('fanned', sizes.timeout)
            last[i] = max(last.get(i, 0.0), t)
    fanout_ms = [(last[i] - sent[i]) * 1e3 for i in range(sizes.fanouts)]
    return {
        'clients': processes * per,
        'connect_all_s': connected_s,
        'fanout_p50_ms': percentile(fanout_ms, 50),
        'rpc_p50_us': percentile(latencies, 50),
    }


WORKLOADS = {
    'tasks': tasks,
    'tasks_noreply': tasks_noreply,
    'rpc': rpc,
    'broadcast': broadcast,
    'connect': connect,
    'clients': clients,
}
