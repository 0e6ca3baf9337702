"""A broker client that takes tasks and never finishes them: stands in for an AiiDA daemon worker running processes.

Run as a circus watcher: ``python holder.py ENDPOINT``. Prints ``ready`` once subscribed and ``holding <task>`` for
every task it took.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading

from aiida_zmq import connect


def say(line: str) -> None:
    # One write per line: circus's stream redirector logs each chunk it reads as a line of its own.
    os.write(1, f'{line}\n'.encode())


def main() -> None:
    communicator = connect(sys.argv[1], heartbeat=0.2, broker_timeout=2.0)

    def hold(_communicator: object, task: object) -> concurrent.futures.Future:
        say(f'holding {task}')
        # Never resolved: the task stays with this process until it dies.
        return concurrent.futures.Future()

    communicator.add_task_subscriber(hold)
    say('ready')
    threading.Event().wait()


if __name__ == '__main__':
    main()
