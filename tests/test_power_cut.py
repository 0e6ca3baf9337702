"""Power cuts (issue 20.1): a real broker with its data directory on LazyFS, one producer of confirmed tasks, cuts at
random moments, and the confirmed tasks that are missing afterwards counted.

A cut: the broker is frozen (SIGSTOP, so that nothing it does after the cut counts), LazyFS drops every byte that was
not synced (``clear-cache``), the broker is killed (kill -9) and started again on the same directory. A task counts as
confirmed once its ``task_send`` returned. Durable (the default), no confirmed task may be missing and the broker
must start again by itself after every cut. With ``--no-fsync`` the same test must lose tasks: that is the trade-off
the option states, and the proof that this test can fail.

Needs root, ``/dev/fuse`` and a LazyFS build (tests/lazyfs.py says which is missing when it skips). A minute or two
by default; the long variant (``--run-slow``) cuts many more times.
"""

from __future__ import annotations

import random
import re
import sqlite3
import subprocess
import sys
import threading
from dataclasses import dataclass, field

import pytest

import aiida_zmq
from aiida_zmq.store import STORE_FILENAME
from aiida_zmq.testing import BrokerProcess, wait_until

from . import lazyfs

pytestmark = pytest.mark.skipif(lazyfs.unavailable() is not None, reason=str(lazyfs.unavailable()))

FAST = {'heartbeat': 0.2, 'broker_timeout': 2.0}
PAD = 'x' * 400  # ~0.5 KiB a task: the WAL grows as under real payloads
MARK = re.compile(rb'pc:(\d+):')


@dataclass
class Outcome:
    confirmed: int = 0
    missing: list[int] = field(default_factory=list)
    cuts: int = 0
    refused: list[str] = field(default_factory=list)  # the broker's words each time it did not start by itself


class Producer:
    """One client sending tasks nobody consumes, one at a time, each counted once its send returned (confirmed)."""

    def __init__(self, endpoint: str) -> None:
        self.communicator = aiida_zmq.connect(endpoint, task_queue='power-cut', **FAST)
        self.confirmed: list[int] = []
        self.failed: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            try:
                self.communicator.task_send(f'pc:{index}:{PAD}', no_reply=True)
                self.confirmed.append(index)
            except Exception as exception:  # a send may fail loudly (then it was not confirmed), never silently
                self.failed.append(exception)
            index += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), 'the producer is stuck in a send'
        self.communicator.close()


def stored_indexes(data_dir) -> set[int]:
    with sqlite3.connect(data_dir / STORE_FILENAME) as db:
        return {
            int(match.group(1))
            for (payload,) in db.execute('SELECT payload FROM tasks')
            for match in [MARK.search(payload)]
            if match
        }


def cut_power(filesystem: lazyfs.LazyFS, broker: BrokerProcess) -> None:
    broker.freeze()
    filesystem.clear_cache()
    broker.kill()


def run_cuts(cuts: int, *serve_args: str, seed: int) -> Outcome:
    rng = random.Random(seed)
    outcome = Outcome()
    with lazyfs.mounted() as filesystem:
        broker = BrokerProcess(filesystem.mount / 'data', *serve_args, endpoint=f'ipc://{filesystem.base}/b.sock')
        broker.log_path = filesystem.base / 'broker.log'  # off the mount: the log must survive the cuts
        broker.start()
        producer = Producer(broker.endpoint)
        try:
            for _ in range(cuts):
                target = len(producer.confirmed) + rng.randint(1, 600)  # a random moment of the stream
                wait_until(lambda n=target: len(producer.confirmed) >= n, 120, what=f'{target} confirmed tasks')
                cut_power(filesystem, broker)
                outcome.cuts += 1
                try:
                    broker.start()
                except RuntimeError as refusal:
                    outcome.refused.append(str(refusal)[-600:])
                    accept = [sys.executable, '-m', 'aiida_zmq.cli', 'accept-store', '--data-dir', str(broker.data_dir)]
                    subprocess.run(accept, check=True, capture_output=True, timeout=60)
                    broker.start()
            wait_until(lambda: len(producer.confirmed) >= target + 10, 120, what='sends after the last restart')
        finally:
            producer.stop()
            broker.stop()
        assert not producer.failed, producer.failed[:3]
        outcome.confirmed = len(producer.confirmed)
        outcome.missing = sorted(set(producer.confirmed) - stored_indexes(broker.data_dir))
    return outcome


def report(outcome: Outcome) -> str:
    return (
        f'{len(outcome.missing)} of {outcome.confirmed} confirmed tasks missing after {outcome.cuts} cuts, '
        f'{len(outcome.refused)} restart(s) refused: {outcome.refused[:2]}'
    )


@pytest.mark.parametrize('cuts', [pytest.param(8, id='8-cuts'), pytest.param(60, id='60-cuts', marks=pytest.mark.slow)])
def test_power_cuts_lose_no_confirmed_task_and_the_broker_starts_by_itself(cuts):
    outcome = run_cuts(cuts, seed=cuts)
    print(report(outcome))
    assert outcome.missing == [], report(outcome)
    assert outcome.refused == [], report(outcome)


@pytest.mark.parametrize('cuts', [pytest.param(4, id='4-cuts'), pytest.param(30, id='30-cuts', marks=pytest.mark.slow)])
def test_power_cuts_without_fsync_lose_confirmed_tasks(cuts):
    """The trade-off of ``--no-fsync``, and the proof that the test above can fail: confirmed tasks are lost."""
    outcome = run_cuts(cuts, '--no-fsync', seed=cuts)
    print(report(outcome))
    assert outcome.missing, report(outcome)
