"""The same faults against aiida-core's ``core.zeromq`` broker and against aiida-zmq, side by side (run by hand).

    .venv/bin/python -m tests.chaos.compare_core_zeromq --out /tmp/azmq-ledgers [--seed N] [--faults a,b]

Each run uses the chaos actors (``tests/chaos/actor.py``: the same producer and consumer code for both brokers, only
the communicator differs) and writes one JSON summary per broker and fault into ``--out``, next to the ones the
chaos tests write; ``python -m tests.chaos.report DIR`` renders them all as one table.

For ``core.zeromq`` the broker runs as aiida-core's circus watcher runs it (``python -m aiida.brokers.zeromq.service
--service-dir DIR``) and clients are made as ``ZeromqBroker.get_communicator`` makes them. A "confirmed" task there
is one whose ``task_send`` returned (it has no publisher confirm). After a broker restart core.zeromq listens on a
new socket directory, so the clients that were running cannot find it: phase A counts what they achieve by
themselves; phase B then starts a fresh consumer on the new endpoint (what ``verdi daemon restart`` would do) and
counts what is still delivered, so that "lost" there means lost from the store, not merely stuck.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiida_zmq.testing import BrokerProcess, wait_until

from .harness import Actor, Books, write_summary

PRODUCERS, CONSUMERS, PER_PRODUCER, RATE, PREFETCH = 2, 2, 600, 60, 20
QUEUE = 'aiida-zmq-compare'


class CoreZeromq:
    """aiida-core's broker service in a subprocess; each (re)start binds a new socket directory."""

    def __init__(self, base: Path) -> None:
        self.service_dir = base / 'service'
        self.log_path = base / 'core.zeromq.log'
        self.process: subprocess.Popen | None = None
        self.endpoint = ''

    def start(self) -> None:
        sockets = self.service_dir / 'broker.sockets'
        status = self.service_dir / 'broker.status'
        old = sockets.read_text().strip() if sockets.exists() else None
        status.unlink(missing_ok=True)
        with open(self.log_path, 'ab') as log:
            self.process = subprocess.Popen(
                [sys.executable, '-m', 'aiida.brokers.zeromq.service', '--service-dir', str(self.service_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(
            lambda: status.exists() and sockets.exists() and sockets.read_text().strip() not in ('', old),
            30,
            what='core.zeromq to start',
        )
        self.endpoint = f'ipc://{sockets.read_text().strip()}/router.sock'

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(15)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()


class AiidaZmq:
    def __init__(self, base: Path) -> None:
        self.broker = BrokerProcess(base / 'data', '--heartbeat', '0.2', '--peer-timeout', '2')
        self.endpoint = self.broker.endpoint

    def start(self) -> None:
        self.broker.start()

    def kill(self) -> None:
        self.broker.kill()

    def stop(self) -> None:
        self.broker.stop()


def run(kind: str, fault: str, out: Path, rng: random.Random, seed: int) -> dict:
    base = Path(tempfile.mkdtemp(prefix='azcmp-'))
    ledgers = base / 'ledgers'
    ledgers.mkdir()
    broker = CoreZeromq(base) if kind == 'core.zeromq' else AiidaZmq(base)
    actors: list[Actor] = []
    extra: dict = {}
    try:
        broker.start()
        consumers = [
            Actor('consumer', broker.endpoint, QUEUE, ledgers / f'c{i}.log', kind=kind, prefetch=PREFETCH, work_ms=50)
            for i in range(CONSUMERS)
        ]
        actors += consumers
        for consumer in consumers:
            consumer.wait_ready()
        producers = [
            Actor(
                'producer',
                broker.endpoint,
                QUEUE,
                ledgers / f'p{i}.log',
                kind=kind,
                count=PER_PRODUCER,
                rate=RATE,
                prefix=f'p{i}',
            )
            for i in range(PRODUCERS)
        ]
        actors += producers
        paths = lambda: [actor.ledger for actor in actors]  # noqa: E731
        wait_until(lambda: Books.read(paths()).confirmed, 30, what='the first confirmed task')
        time.sleep(rng.uniform(2.0, 4.0))  # a random moment under load

        if fault == 'broker_kill9':
            killed_at = time.time()
            broker.kill()
            broker.start()
            ready_at = time.time()
            extra['down_s'] = round(ready_at - killed_at, 3)
            # Work resumes when tasks reach consumers again (a send that returns proves nothing on core.zeromq).
            try:
                resumed = wait_until(lambda: Books.read(paths()).first_after('delivered', ready_at), 20)
                extra['delivery_resume_s'] = round(resumed - killed_at, 3)
            except TimeoutError:
                extra['delivery_resume_s'] = None  # the running clients never got through again
        elif fault == 'producer_kill9':
            for producer in producers:
                time.sleep(rng.uniform(0.0, 1.0))  # a random moment inside its stream of sends
                producer.kill()
        elif fault == 'consumer_kill9':
            victim = max(consumers, key=lambda a: a.count('delivered') - a.count('processed'))
            held = Books.read([victim.ledger])
            held_ids = held.delivered - held.processed
            victim.kill()
            killed = time.time()
            others = [c.ledger for c in consumers if c is not victim]
            try:
                wait_until(lambda: held_ids <= Books.read(others).delivered, 30, interval=0.1)
                extra['takeover_s'] = round(time.time() - killed, 3)
            except TimeoutError:
                extra['takeover_s'] = None  # not taken over within 30 s
            extra['held_at_death'] = len(held_ids)
        elif fault == 'consumer_sigstop':
            victim = max(consumers, key=lambda a: a.count('delivered') - a.count('processed'))
            held = Books.read([victim.ledger])
            held_ids = held.delivered - held.processed
            os.kill(victim.pid, signal.SIGSTOP)
            stopped = time.time()
            others = [c.ledger for c in consumers if c is not victim]
            try:
                wait_until(lambda: held_ids <= Books.read(others).delivered, 30, interval=0.1)
                extra['takeover_s'] = round(time.time() - stopped, 3)
            except TimeoutError:
                extra['takeover_s'] = None  # not taken over within 30 s
            extra['held_when_stopped'] = len(held_ids)
        # Phase A: the clients that were running, on their own.
        for producer in producers:
            try:
                producer.wait_done(PER_PRODUCER / RATE + 30)
            except (TimeoutError, RuntimeError):
                pass  # a producer stuck on a broker that moved away: its ledger says how far it got
        try:
            wait_until(lambda: not Books.read(paths()).lost, 30, interval=0.2)
        except TimeoutError:
            pass
        books = Books.read(paths())
        extra['lost_phase_a'] = len(books.lost)
        if fault == 'consumer_sigstop':
            os.kill(victim.pid, signal.SIGCONT)
        # Phase B: a fresh consumer on the broker's current endpoint, as after `verdi daemon restart`.
        if books.lost:
            fresh = Actor('consumer', broker.endpoint, QUEUE, ledgers / 'fresh.log', kind=kind, prefetch=PREFETCH)
            actors.append(fresh)
            fresh.wait_ready()
            try:
                wait_until(lambda: not Books.read(paths()).lost, 30, interval=0.2)
            except TimeoutError:
                pass
        books = Books.read(paths())
        record = write_summary(
            out,
            f'compare_{kind}_{fault}',
            books,
            broker=kind,
            seed=seed,
            fault={
                'broker_kill9': 'broker kill -9 under load, restarted by hand',
                'consumer_kill9': 'consumer kill -9 holding tasks',
                'consumer_sigstop': 'consumer SIGSTOP holding tasks',
                'producer_kill9': 'producer kill -9 mid-send',
            }[fault],
            injected='1 time',
            producers=PRODUCERS,
            consumers=CONSUMERS,
            rate_per_s=RATE * PRODUCERS,
            **extra,
        )
        return record
    finally:
        for actor in actors:
            actor.stop()
        broker.stop()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, required=True, help='directory for the JSON summaries')
    parser.add_argument('--seed', type=int, default=None)
    parser.add_argument('--faults', default='broker_kill9,consumer_kill9,consumer_sigstop,producer_kill9')
    parser.add_argument('--brokers', default='aiida-zmq,core.zeromq')
    options = parser.parse_args()
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(1 << 30)
    options.out.mkdir(parents=True, exist_ok=True)
    for fault in options.faults.split(','):
        for kind in options.brokers.split(','):
            record = run(kind, fault, options.out, random.Random(seed), seed)
            keys = (
                'sent',
                'confirmed',
                'delivered',
                'lost',
                'lost_phase_a',
                'duplicated',
                'delivery_resume_s',
                'takeover_s',
            )
            print(kind, fault, {key: record.get(key) for key in keys}, flush=True)


if __name__ == '__main__':
    main()
