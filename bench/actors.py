"""The processes of the broker workloads. Each runs in its own spawned process and talks to the harness only
through a queue of ``(kind, ...)`` tuples; any failure is reported as ``('error', traceback)``.

Time stamps are ``time.perf_counter()``, i.e. CLOCK_MONOTONIC on Linux, comparable across processes.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from typing import Any

from .clients import ClientSpec, connect, preload, resolve

WARMUP_TASKS = 10
CLOSE_TIMEOUT = 10.0


@contextlib.contextmanager
def reporting(q: Any) -> Iterator[None]:
    """Report an exception of the actor body to the harness instead of dying silently."""
    try:
        yield
    except BaseException:
        q.put(('error', traceback.format_exc(limit=8)))
        raise


@contextlib.contextmanager
def communicator(spec: ClientSpec) -> Iterator[Any]:
    """A connected communicator, closed on exit (in a thread, so that a hanging close cannot hang the actor)."""
    comm = connect(spec)
    try:
        yield comm
    finally:
        closer = threading.Thread(target=comm.close, daemon=True)
        closer.start()
        closer.join(CLOSE_TIMEOUT)


def task_payload(run: str, i: int, size: int) -> dict[str, Any]:
    """A task of about ``size`` bytes once JSON-encoded."""
    return {'run': run, 'i': i, 'pad': 'x' * max(0, size - 48)}


def task_consumer(spec: ClientSpec, q: Any, stop: Any, run: str, expect: int, timeout: float) -> None:
    """Answer every task with ``{'i': i}``; report ``('done', t)`` once all ``expect`` distinct tasks were seen."""
    with reporting(q), communicator(spec) as comm:
        seen: set[int] = set()
        lock = threading.Lock()

        def on_task(_comm: Any, task: Any) -> Any:
            if not isinstance(task, dict) or task.get('run') != run or task.get('warm'):
                return {'i': task.get('i') if isinstance(task, dict) else None}
            with lock:
                seen.add(task['i'])
                if len(seen) == expect:
                    q.put(('done', time.perf_counter()))
            return {'i': task['i']}

        comm.add_task_subscriber(on_task)
        q.put(('ready',))
        stop.wait(timeout)
        q.put(('count', len(seen)))


def task_producer(
    spec: ClientSpec, q: Any, stop: Any, run: str, n: int, size: int, no_reply: bool, timeout: float
) -> None:
    """Send a warm-up, then ``n`` tasks; with replies, wait for every future and check its result."""
    with reporting(q), communicator(spec) as comm:
        deadline = time.monotonic() + timeout
        warm = [comm.task_send({'run': run, 'i': -1 - k, 'warm': True}) for k in range(WARMUP_TASKS)]
        for future in warm:
            resolve(future, deadline)
        payloads = [task_payload(run, i, size) for i in range(n)]
        deadline = time.monotonic() + timeout
        t0 = time.perf_counter()
        futures = [comm.task_send(payload, no_reply=no_reply) for payload in payloads]
        t_sent = time.perf_counter()
        answered, errors = 0, []
        if not no_reply:
            for i, future in enumerate(futures):
                try:
                    result = resolve(future, deadline)
                except Exception as exc:
                    errors.append(f'task {i}: {type(exc).__name__}: {exc}')
                    continue
                if result == {'i': i}:
                    answered += 1
                else:
                    errors.append(f'task {i}: wrong result {result!r:.80}')
        t_end = time.perf_counter()
        q.put(('sent', t0, t_sent, t_end, answered, len(errors), errors[:3]))
        stop.wait(timeout)  # stay connected until the harness is done: closing early may drop sends


def rpc_server(spec: ClientSpec, q: Any, stop: Any, identifier: str, timeout: float) -> None:
    """An RPC subscriber that echoes its message."""
    with reporting(q), communicator(spec) as comm:
        comm.add_rpc_subscriber(lambda _comm, msg: msg, identifier=identifier)
        q.put(('ready',))
        stop.wait(timeout)


def rpc_client(spec: ClientSpec, q: Any, identifier: str, n: int, warmup: int, timeout: float) -> None:
    """``n`` sequential ``rpc_send(...).result()`` calls after a warm-up; report their latencies in us."""
    with reporting(q), communicator(spec) as comm:
        deadline = time.monotonic() + timeout
        msg = {'intent': 'status', 'pad': 'x' * 64}
        for _ in range(warmup):
            resolve(comm.rpc_send(identifier, msg), deadline)
        latencies = []
        for _ in range(n):
            t0 = time.perf_counter()
            result = resolve(comm.rpc_send(identifier, msg), deadline)
            latencies.append((time.perf_counter() - t0) * 1e6)
            if result != msg:
                raise AssertionError(f'wrong RPC result {result!r:.80}')
        q.put(('rpc', latencies))


def connect_probe(spec: ClientSpec, q: Any, identifier: str, timeout: float) -> None:
    """Fresh process: connect, then one RPC; report both times in ms (imports done beforehand)."""
    with reporting(q):
        preload(spec)
        t0 = time.perf_counter()
        with communicator(spec) as comm:
            t1 = time.perf_counter()
            resolve(comm.rpc_send(identifier, {'intent': 'status'}), time.monotonic() + timeout)
            t2 = time.perf_counter()
        q.put(('connect', (t1 - t0) * 1e3, (t2 - t0) * 1e3))


def broadcast_subscriber(spec: ClientSpec, q: Any, stop: Any, idx: int, run: str, expect: int, timeout: float) -> None:
    """Count broadcasts of this run; answer the harness's probes once, so it knows the subscription is live.

    It also holds an RPC subscriber, as every AiiDA process does (core.zeromq only forwards broadcasts to clients
    that have a task or RPC subscriber).
    """
    with reporting(q), communicator(spec) as comm:
        seen: set[int] = set()
        probed = threading.Event()

        def on_broadcast(_comm: Any, body: Any, sender: Any = None, subject: Any = None, correlation_id: Any = None):
            if subject == 'probe':
                if not probed.is_set():
                    probed.set()
                    q.put(('probe', idx))
            elif subject == 'bench' and isinstance(body, dict) and body.get('run') == run:
                seen.add(body['i'])
                if len(seen) == expect:
                    q.put(('done', idx, time.perf_counter()))

        comm.add_rpc_subscriber(lambda _comm, msg: msg, identifier=f'bench-sub-{uuid.uuid4().hex[:12]}')
        comm.add_broadcast_subscriber(on_broadcast)
        q.put(('ready', idx))
        stop.wait(timeout)
        q.put(('count', idx, len(seen)))


def broadcast_sender(spec: ClientSpec, q: Any, go: Any, stop: Any, run: str, n: int, timeout: float) -> None:
    """Send probes until the harness says go (every subscriber saw one), then ``n`` broadcasts."""
    with reporting(q), communicator(spec) as comm:
        q.put(('ready', -1))
        deadline = time.monotonic() + timeout
        while not go.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError('no go from the harness: a subscriber never saw a probe broadcast')
            comm.broadcast_send({'probe': True}, subject='probe')
            go.wait(0.05)
        t0 = time.perf_counter()
        for i in range(n):
            comm.broadcast_send({'run': run, 'i': i}, subject='bench')
        q.put(('sent', t0, time.perf_counter()))
        stop.wait(timeout)


def many_clients(spec: ClientSpec, q: Any, stop: Any, idx: int, k: int, run: str, expect: int, timeout: float) -> None:
    """``k`` communicators in this process, each with an RPC and a broadcast subscriber (as every AiiDA process has);
    report once all ``k`` saw a probe broadcast, then, for each broadcast ``i`` of this run, when the last of the
    ``k`` received it."""
    with reporting(q), contextlib.ExitStack() as stack:
        lock = threading.Lock()
        got: dict[int, int] = {}
        probed: set[int] = set()

        def subscriber(j: int) -> Any:
            def on_broadcast(
                _comm: Any, body: Any, sender: Any = None, subject: Any = None, correlation_id: Any = None
            ):
                now = time.perf_counter()
                with lock:
                    if subject == 'probe' and j not in probed:
                        probed.add(j)
                        if len(probed) == k:
                            q.put(('probe', idx))
                    elif subject == 'fan' and isinstance(body, dict) and body.get('run') == run:
                        got[body['i']] = got.get(body['i'], 0) + 1
                        if got[body['i']] == k:
                            q.put(('fanned', idx, body['i'], now))

            return on_broadcast

        for j in range(k):
            comm = stack.enter_context(communicator(spec))
            comm.add_rpc_subscriber(lambda _comm, msg: msg, identifier=f'bench-many-{run}-{idx}-{j}')
            comm.add_broadcast_subscriber(subscriber(j))
        q.put(('ready', idx))
        stop.wait(timeout)


def fan_sender(spec: ClientSpec, q: Any, go: Any, stop: Any, run: str, n: int, rpcs: int, timeout: float) -> None:
    """Probe until told to go; then ``n`` broadcasts, one every 50 ms (their send times reported), then ``rpcs``
    sequential RPCs to one of the many clients (latencies in us)."""
    with reporting(q), communicator(spec) as comm:
        q.put(('ready', -1))
        deadline = time.monotonic() + timeout
        while not go.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError('no go from the harness: a client never saw a probe broadcast')
            comm.broadcast_send({'probe': True}, subject='probe')
            go.wait(0.1)
        sent = []
        for i in range(n):
            sent.append(time.perf_counter())
            comm.broadcast_send({'run': run, 'i': i}, subject='fan')
            time.sleep(0.05)  # one broadcast at a time: this measures fan-out latency, not throughput
        latencies = []
        for _ in range(rpcs):
            t0 = time.perf_counter()
            resolve(comm.rpc_send(f'bench-many-{run}-0-0', {'x': 1}), deadline)
            latencies.append((time.perf_counter() - t0) * 1e6)
        q.put(('fan_sent', sent, latencies))
        stop.wait(timeout)
