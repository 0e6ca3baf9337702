"""Client processes for tests: ``python -m tests.actors MODE ENDPOINT QUEUE`` prints one line per event.

Modes:
- ``hold``: consume QUEUE and never answer (the subscriber returns a future nobody resolves);
- ``consume``: consume QUEUE and answer every task with its body;
- ``listen``: subscribe to broadcasts and register RPC identifier QUEUE; answers RPCs, prints nothing per message.
"""

from __future__ import annotations

import sys
import threading

import kiwipy

import aiida_zmq


def main(mode: str, endpoint: str, queue: str) -> None:
    communicator = aiida_zmq.connect(endpoint, task_queue=queue, task_prefetch_count=100, heartbeat=0.2)

    def hold(_comm, task):
        print(f'got {task}', flush=True)
        return kiwipy.Future()

    def consume(_comm, task):
        print(f'got {task}', flush=True)
        return task

    if mode == 'hold':
        communicator.add_task_subscriber(hold)
    elif mode == 'consume':
        communicator.add_task_subscriber(consume)
    elif mode == 'listen':
        communicator.add_broadcast_subscriber(lambda *args: None)
        communicator.add_rpc_subscriber(lambda _comm, msg: msg, queue)
    print('ready', flush=True)
    threading.Event().wait(300)  # killed by the test long before


if __name__ == '__main__':
    main(*sys.argv[1:4])
