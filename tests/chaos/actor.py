"""A chaos actor in its own process: ``python -m tests.chaos.actor ROLE KIND ENDPOINT QUEUE LEDGER OPTIONS_JSON``.

Every event goes to the LEDGER file as one line ``EVENT TASK_ID UNIX_TIME`` written with a single ``write`` call and
flushed at once, so that a kill -9 at any moment leaves at most one unfinished last line (which the reader skips).

Roles:
- ``producer``: sends ``count`` tasks ``{prefix}-{i}`` at ``rate`` per second (0: as fast as confirms come back).
  Logs ``sent`` before ``task_send``, ``confirmed`` once it returned (the broker stored the task) and ``failed``
  when it raised. Payloads carry a SHA-256 of their padding so that a half-written task is detectable.
- ``consumer``: consumes the queue with ``prefetch``; logs ``delivered`` when its subscriber gets a task and
  ``processed`` when the work is done (the answer then goes to the broker, which acknowledges the task).

KIND is ``aiida-zmq`` or ``core.zeromq`` (aiida-core's broker, for the side-by-side script).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from typing import Any


class Ledger:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()

    def log(self, event: str, task_id: str = '-') -> None:
        line = f'{event} {task_id} {time.time():.6f}\n'.encode()
        with self._lock:
            os.write(self._fd, line)  # one O_APPEND write per event: lines never interleave


def make_payload(task_id: str, size: int) -> dict[str, Any]:
    pad = (task_id * (size // max(1, len(task_id)) + 1))[:size]
    return {'id': task_id, 'pad': pad, 'sha': hashlib.sha256(pad.encode()).hexdigest()}


def payload_ok(payload: Any) -> bool:
    return (
        isinstance(payload, dict)
        and isinstance(payload.get('pad'), str)
        and hashlib.sha256(payload['pad'].encode()).hexdigest() == payload.get('sha')
    )


def connect(kind: str, endpoint: str, queue: str, prefetch: int, fast: bool) -> Any:
    if kind == 'aiida-zmq':
        import aiida_zmq

        timing = {'heartbeat': 0.2, 'broker_timeout': 2.0} if fast else {}
        return aiida_zmq.connect(
            endpoint, task_queue=queue, task_prefetch_count=prefetch, connect_timeout=30, confirm_timeout=120, **timing
        )
    if kind == 'core.zeromq':
        from aiida.brokers.zeromq.communicator import ZeromqCommunicator

        communicator = ZeromqCommunicator(router_endpoint=endpoint, task_timeout=10, task_prefetch_count=prefetch)
        communicator.start()
        return communicator
    raise ValueError(f'unknown broker kind {kind!r}')


def produce(communicator: Any, ledger: Ledger, options: dict[str, Any]) -> None:
    count, rate, size = options['count'], options.get('rate', 0), options.get('payload_bytes', 256)
    prefix = options['prefix']
    interval = 1.0 / rate if rate else 0.0
    next_send = time.monotonic()
    for index in range(count):
        task_id = f'{prefix}-{index}'
        if interval:
            delay = next_send - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the load, not waiting for an event
            next_send += interval
        ledger.log('sent', task_id)
        try:
            communicator.task_send(make_payload(task_id, size), no_reply=True)
        except Exception as exception:  # a send may fail loudly; the ledger records it
            ledger.log('failed', task_id)
            print(f'send {task_id} failed: {exception!r}', file=sys.stderr, flush=True)
            continue
        ledger.log('confirmed', task_id)
    ledger.log('done')


def consume(communicator: Any, ledger: Ledger, options: dict[str, Any]) -> None:
    """As an AiiDA worker does: the subscriber returns a future at once and the work runs concurrently, so that the
    consumer holds up to ``prefetch`` tasks at any moment (each logged ``delivered`` and not yet ``processed``)."""
    import concurrent.futures

    import kiwipy

    work = options.get('work_ms', 0) / 1000
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, options.get('prefetch', 1)))

    def process(task_id: str, future: kiwipy.Future) -> None:
        if work:
            time.sleep(work)  # simulated work, so that tasks are held when the chaos strikes
        ledger.log('processed', task_id)
        future.set_result(task_id)

    def subscriber(_communicator: Any, task: Any) -> Any:
        task_id = task.get('id', '?') if isinstance(task, dict) else '?'
        ledger.log('delivered' if payload_ok(task) else 'corrupt', task_id)
        future = kiwipy.Future()
        pool.submit(process, task_id, future)
        return future

    communicator.add_task_subscriber(subscriber)
    ledger.log('ready')
    threading.Event().wait(options.get('lifetime'))  # until killed (the harness kills every actor)


def main(role: str, kind: str, endpoint: str, queue: str, ledger_path: str, options_json: str = '{}') -> None:
    options = json.loads(options_json)
    ledger = Ledger(ledger_path)
    communicator = connect(kind, endpoint, queue, options.get('prefetch', 1), options.get('fast', True))
    if role == 'producer':
        produce(communicator, ledger, options)
        if options.get('linger', False):
            threading.Event().wait(options.get('lifetime'))  # until killed (the harness kills every actor)
        communicator.close()
    elif role == 'consumer':
        consume(communicator, ledger, options)
    else:
        raise SystemExit(f'unknown role {role!r}')


if __name__ == '__main__':
    main(*sys.argv[1:])
