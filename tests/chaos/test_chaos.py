"""Chaos with a ledger: several producer and consumer processes, faults injected under load, every task counted.

Each test fails on any confirmed task that was not delivered, on any corrupt delivery, and on duplicates beyond a
bound derived from the faults it injected (delivery is at-least-once: a task whose answer was in flight when its
holder or the broker died is delivered again). The seed of the random fault schedule is printed and written to the
ledger summary; ``AZMQ_CHAOS_SEED=N`` replays a run.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from aiida_zmq.testing import ArbiterProcess, BrokerProcess, wait_until

from .harness import Actor, Books, ledger_out, stored_tasks, undecodable, write_summary

BROKER_ARGS = ('--heartbeat', '0.2', '--peer-timeout', '2')


def seeded(request: pytest.FixtureRequest) -> tuple[int, random.Random]:
    seed = int(os.environ.get('AZMQ_CHAOS_SEED') or random.SystemRandom().randrange(1 << 30))
    print(f'{request.node.name}: AZMQ_CHAOS_SEED={seed}')
    return seed, random.Random(seed)


@pytest.fixture
def chaos_dir(tmp_path: Path) -> Path:
    directory = tmp_path / 'ledgers'
    directory.mkdir()
    return directory


@pytest.fixture
def actors() -> list[Actor]:
    started: list[Actor] = []
    yield started
    for actor in started:
        actor.stop()


def remaining(data_dir: Path, queue: str) -> int:
    return sum(1 for row in stored_tasks(data_dir) if row[1] == queue)


class Target:
    """The broker under test and how to crash it: ``crash()`` injects the fault and returns once a new broker is up."""

    def __init__(self, endpoint: str, data_dir: Path, crash: Callable[[], None], fault: str) -> None:
        self.endpoint, self.data_dir, self.crash, self.fault = endpoint, data_dir, crash, fault


def by_hand(broker: BrokerProcess) -> Target:
    def crash() -> None:
        broker.kill()
        broker.start()

    return Target(broker.endpoint, broker.data_dir, crash, 'broker kill -9 under load, restarted by hand')


def by_circus(arbiter: ArbiterProcess, signum: int) -> Target:
    """Signal the broker watcher's process; circus (kill -9) or the health plugin (SIGSTOP) brings a new one up."""

    def crash() -> None:
        pid = arbiter.broker_pid()
        assert pid is not None
        os.kill(pid, signum)
        arbiter.wait_for_broker(60, not_pid=pid)

    how = 'kill -9, restarted by circus' if signum == signal.SIGKILL else 'SIGSTOP, recovered by the health plugin'
    return Target(arbiter.broker_endpoint, arbiter.data_dir, crash, f'broker {how}')


def run_broker_faults(
    request: pytest.FixtureRequest,
    target: Target,
    chaos_dir: Path,
    actors: list[Actor],
    *,
    name: str,
    producers: int,
    consumers: int,
    per_producer: int,
    rate: float,
    kills: int,
    up_between: tuple[float, float] = (1.0, 3.0),
    payload_bytes: int = 256,
    prefetch: int = 20,
) -> dict:
    """Crash the broker ``kills`` times at random moments while producers send and consumers work; check the books."""
    seed, rng = seeded(request)
    queue = f'chaos-{uuid.uuid4().hex[:8]}'
    for index in range(consumers):
        ledger = chaos_dir / f'consumer{index}.log'
        actors.append(Actor('consumer', target.endpoint, queue, ledger, prefetch=prefetch, work_ms=2).wait_ready())
    sending = []
    for index in range(producers):
        ledger = chaos_dir / f'producer{index}.log'
        actor = Actor(
            'producer', target.endpoint, queue, ledger, count=per_producer, rate=rate, prefix=f'p{index}',
            payload_bytes=payload_bytes,
        )  # fmt: skip
        actors.append(actor)
        sending.append(actor)
    ledgers = [actor.ledger for actor in actors]
    wait_until(lambda: Books.read(ledgers).confirmed, 30, what='the first confirmed task')

    outages = []
    for _ in range(kills):
        time.sleep(rng.uniform(*up_between))  # a random moment under load is the point of the test
        killed_at = time.time()
        target.crash()
        ready_at = time.time()
        if all(actor.count('done') for actor in sending):
            raise AssertionError('the producers finished before the fault: give them more tasks to send')
        resumed = wait_until(
            lambda ready=ready_at: Books.read(ledgers).first_after('confirmed', ready), 60, what='sends to resume'
        )
        outages.append({'down_s': round(ready_at - killed_at, 3), 'resume_s': round(resumed - killed_at, 3)})

    for actor in sending:
        actor.wait_done(180)
    wait_until(lambda: not Books.read(ledgers).lost, 90, interval=0.2, what='every confirmed task delivered')
    wait_until(lambda: remaining(target.data_dir, queue) == 0, 60, interval=0.2, what='every task acknowledged')
    books = Books.read(ledgers)
    # Bound: each crash may redeliver what consumers held (prefetch each) and replay what producers had unconfirmed.
    bound = kills * (consumers * prefetch + producers)
    record = write_summary(
        ledger_out(chaos_dir),
        name,
        books,
        seed=seed,
        fault=target.fault + (f', {payload_bytes // 1024} KiB tasks' if payload_bytes >= 1024 else ''),
        injected=f'{kills}x, {up_between[0]}-{up_between[1]} s apart',
        producers=producers,
        consumers=consumers,
        rate_per_s=rate * producers,
        outages=outages,
        down_s_max=max(o['down_s'] for o in outages),
        resume_s_max=max(o['resume_s'] for o in outages),
        duplicate_bound=bound,
        acknowledged=len(books.confirmed),  # the store holds none of them any more
    )
    print(record)
    assert books.corrupt == 0
    assert not books.lost
    assert books.confirmed == {f'p{i}-{n}' for i in range(producers) for n in range(per_producer)}
    assert not books.failed  # sends wait through the outage instead of failing
    assert books.duplicates <= bound
    return record


def test_broker_kill9_under_load(request, zmq_broker_factory, chaos_dir, actors):
    """Three producers, two consumers, three kill -9 of the broker at random moments, restarted by hand."""
    target = by_hand(zmq_broker_factory(*BROKER_ARGS))
    run_broker_faults(
        request, target, chaos_dir, actors, name='broker_kill9', producers=3, consumers=2, per_producer=700, rate=80,
        kills=3,
    )  # fmt: skip


def test_broker_kill9_with_large_tasks_in_flight(request, zmq_broker_factory, chaos_dir, actors):
    """1 MiB tasks, so that kills land in the middle of multipart messages on the wire, in both directions."""
    target = by_hand(zmq_broker_factory(*BROKER_ARGS))
    run_broker_faults(
        request, target, chaos_dir, actors, name='broker_kill9_large', producers=2, consumers=2, per_producer=300,
        rate=40, kills=3, up_between=(0.3, 1.5), payload_bytes=1024 * 1024, prefetch=5,
    )  # fmt: skip


def test_broker_kill9_restarted_by_circus(request, zmq_arbiter, chaos_dir, actors):
    """The same with the broker as a circus watcher: circus notices the death and starts a new broker."""
    target = by_circus(zmq_arbiter, signal.SIGKILL)
    run_broker_faults(
        request, target, chaos_dir, actors, name='broker_kill9_circus', producers=2, consumers=2, per_producer=1000,
        rate=80, kills=2,
    )  # fmt: skip


def test_broker_sigstop_recovered_by_health_plugin(request, zmq_arbiter, chaos_dir, actors):
    """A hung broker (SIGSTOP) under load: the health plugin's round trip fails, it kills the broker, circus restarts
    it, and the books still balance."""
    target = by_circus(zmq_arbiter, signal.SIGSTOP)
    run_broker_faults(
        request, target, chaos_dir, actors, name='broker_sigstop_circus', producers=2, consumers=2, per_producer=800,
        rate=60, kills=1,
    )  # fmt: skip


@pytest.mark.slow
def test_broker_kill9_under_load_long(request, zmq_broker_factory, chaos_dir, actors):
    """Five minutes: twenty kills, some in quick succession."""
    target = by_hand(zmq_broker_factory(*BROKER_ARGS))
    run_broker_faults(
        request, target, chaos_dir, actors, name='broker_kill9_long', producers=4, consumers=3, per_producer=6000,
        rate=50, kills=20, up_between=(0.3, 10.0),
    )  # fmt: skip


def test_consumer_kill9_holding_tasks(request, zmq_broker_factory, chaos_dir, actors):
    """kill -9 of consumers that hold tasks: what they held goes to the other consumers; nothing is lost."""
    seed, rng = seeded(request)
    broker = zmq_broker_factory(*BROKER_ARGS)
    queue = f'chaos-{uuid.uuid4().hex[:8]}'
    prefetch, kills = 10, 3
    serial = iter(range(100))

    def new_consumer() -> Actor:
        ledger = chaos_dir / f'consumer{next(serial)}.log'
        return Actor('consumer', broker.endpoint, queue, ledger, prefetch=prefetch, work_ms=200).wait_ready()

    consumers = [new_consumer() for _ in range(3)]
    actors.extend(consumers)
    producer = Actor('producer', broker.endpoint, queue, chaos_dir / 'producer.log', count=900, rate=120, prefix='p')
    actors.append(producer)
    killed: list[Actor] = []
    for _ in range(kills):
        time.sleep(rng.uniform(1.0, 2.5))  # a random moment under load
        # Kill the consumer holding the most tasks right now (delivered but not processed).
        victim = max(consumers, key=lambda a: a.count('delivered') - a.count('processed'))
        victim.kill()
        killed.append(victim)
        consumers.remove(victim)
        replacement = new_consumer()
        consumers.append(replacement)
        actors.append(replacement)
    producer.wait_done(120)
    ledgers = [actor.ledger for actor in actors]
    started = time.time()
    wait_until(lambda: not Books.read(ledgers).lost, 60, interval=0.2, what='every confirmed task delivered')
    wait_until(lambda: remaining(broker.data_dir, queue) == 0, 30, interval=0.2, what='every task acknowledged')
    books = Books.read(ledgers)

    # What each victim held when it died was delivered again, to someone else.
    held_at_death = 0
    for victim in killed:
        victim_books = Books.read([victim.ledger])
        held = victim_books.delivered - victim_books.processed
        held_at_death += len(held)
        others = Books.read([actor.ledger for actor in actors if actor is not victim])
        assert held <= others.delivered
    record = write_summary(
        ledger_out(chaos_dir),
        'consumer_kill9',
        books,
        seed=seed,
        fault='consumer kill -9 holding tasks',
        injected=f'{kills} kills, 1-2.5 s apart, peer timeout 2 s',
        held_at_death=held_at_death,
        drain_s=round(time.time() - started, 3),
        duplicate_bound=kills * prefetch,
        acknowledged=len(books.confirmed),
    )
    print(record)
    assert held_at_death > 0  # the test did kill consumers holding tasks
    assert books.corrupt == 0 and not books.lost and not books.failed
    assert books.duplicates <= kills * prefetch


def test_producer_kill9_mid_send(request, zmq_broker_factory, chaos_dir, actors):
    """kill -9 of producers while they send large tasks: no half-written task is stored, every confirmed one is."""
    seed, rng = seeded(request)
    broker = zmq_broker_factory(*BROKER_ARGS)
    queue = f'chaos-{uuid.uuid4().hex[:8]}'
    kills = 0
    for round_ in range(3):
        producers = [
            Actor(
                'producer',
                broker.endpoint,
                queue,
                chaos_dir / f'producer{round_}-{index}.log',
                count=100_000,
                payload_bytes=256 * 1024,
                prefix=f'r{round_}p{index}',
            )
            for index in range(2)
        ]
        actors.extend(producers)
        wait_until(
            lambda group=producers: all(p.count('confirmed') >= 3 for p in group), 30, what='producers under way'
        )
        for producer in producers:
            time.sleep(rng.uniform(0.0, 0.4))  # a random moment inside the stream of sends
            producer.kill()
            kills += 1
    ledgers = [actor.ledger for actor in actors]
    books = Books.read(ledgers)
    assert broker.stop() == 0
    rows = stored_tasks(broker.data_dir)
    decode_failures = undecodable(rows)
    stored_ids = {row[0] for row in rows}
    assert not decode_failures, f'half-written tasks in the store: {decode_failures}'
    from aiida_zmq.codec import default_codec

    stored_names = {default_codec().decode(row[2])['id'] for row in rows}
    assert books.confirmed <= stored_names  # every confirmed task is on disk
    assert stored_names <= books.sent
    in_doubt = books.sent - books.confirmed  # the producer died inside task_send: stored or not, never half
    assert stored_names - books.confirmed <= in_doubt

    # And they are all delivered once a consumer comes.
    broker.start()
    consumer = Actor('consumer', broker.endpoint, queue, chaos_dir / 'consumer.log', prefetch=50).wait_ready()
    actors.append(consumer)
    wait_until(lambda: Books.read([consumer.ledger]).delivered >= stored_names, 60, what='stored tasks delivered')
    books = Books.read([*ledgers, consumer.ledger])
    record = write_summary(
        ledger_out(chaos_dir),
        'producer_kill9',
        books,
        seed=seed,
        fault='producer kill -9 mid-send (256 KiB tasks)',
        injected=f'{kills} kills',
        stored=len(stored_ids),
        half_written=len(decode_failures),
        acknowledged=len(books.confirmed),
    )
    print(record)
    assert books.corrupt == 0 and not books.lost


def test_consumer_sigstop_tasks_taken_over(request, zmq_broker_factory, chaos_dir, actors):
    """A consumer frozen (SIGSTOP) holding tasks: the others keep going, its tasks go to them after the peer timeout."""
    seed, _ = seeded(request)
    broker = zmq_broker_factory(*BROKER_ARGS)
    queue = f'chaos-{uuid.uuid4().hex[:8]}'
    # The victim works slowly (200 ms a task) so that, with its fair half of the tasks (~50/s), it soon holds several.
    frozen = Actor('consumer', broker.endpoint, queue, chaos_dir / 'frozen.log', prefetch=10, work_ms=200).wait_ready()
    worker = Actor('consumer', broker.endpoint, queue, chaos_dir / 'worker.log', prefetch=10, work_ms=5).wait_ready()
    actors.extend([frozen, worker])
    producer = Actor('producer', broker.endpoint, queue, chaos_dir / 'producer.log', count=600, rate=100, prefix='p')
    actors.append(producer)
    wait_until(lambda: frozen.count('delivered') - frozen.count('processed') >= 5, 30, what='the victim to hold tasks')
    os.kill(frozen.pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        held = Books.read([frozen.ledger])
        held_ids = held.delivered - held.processed
        wait_until(
            lambda: held_ids <= Books.read([worker.ledger]).delivered, 30, interval=0.1, what='held tasks taken over'
        )
        takeover = time.time() - stopped_at
        producer.wait_done(60)
        ledgers = [frozen.ledger, worker.ledger, producer.ledger]
        wait_until(lambda: not Books.read(ledgers).lost, 30, interval=0.2, what='every confirmed task delivered')
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    # Thawed, its late answers are refused (logged), never applied to tasks the worker now holds.
    wait_until(lambda: remaining(broker.data_dir, queue) == 0, 30, interval=0.2, what='every task acknowledged')
    books = Books.read(ledgers)
    record = write_summary(
        ledger_out(chaos_dir),
        'consumer_sigstop',
        books,
        seed=seed,
        fault='consumer SIGSTOP holding tasks',
        injected='1 stop until takeover, peer timeout 2 s',
        held_when_stopped=len(held_ids),
        takeover_s=round(takeover, 3),
        acknowledged=len(books.confirmed),
    )
    print(record)
    assert books.corrupt == 0 and not books.lost
    assert 1.5 <= takeover <= 10  # after the peer timeout (2 s), not before, and promptly
    assert books.duplicates <= 10 + len(held_ids)


def _rss_and_fds(pid: int) -> tuple[int, int]:
    """Resident memory (bytes) and open file descriptors of a process, from /proc."""
    with open(f'/proc/{pid}/status') as status:
        rss = [int(line.split()[1]) * 1024 for line in status if line.startswith('VmRSS:')]
    if not rss:
        raise AssertionError(f'process {pid} died during the soak (a zombie has no VmRSS)')
    return rss[0], len(os.listdir(f'/proc/{pid}/fd'))


def _flat(samples: list[int], slack: int) -> bool:
    """The median of the last quarter is within ``slack`` (plus 20%) of the median of the second quarter."""
    quarter = max(1, len(samples) // 4)
    early = sorted(samples[quarter : 2 * quarter])[len(samples[quarter : 2 * quarter]) // 2]
    late = sorted(samples[-quarter:])[quarter // 2]
    return late <= early * 1.2 + slack


@pytest.mark.slow
@pytest.mark.timeout(2 * float(os.environ.get('AZMQ_SOAK_SECONDS', '3600')) + 600)  # beyond pytest-timeout's default
def test_soak(request, zmq_broker_factory, chaos_dir, actors):
    """One hour (``AZMQ_SOAK_SECONDS``) at a steady rate with a broker kill -9 every ``AZMQ_SOAK_KILL_EVERY`` s:
    nothing lost, and memory and file descriptors flat in the broker and in the long-lived clients."""
    seed, rng = seeded(request)
    duration = float(os.environ.get('AZMQ_SOAK_SECONDS', '3600'))
    kill_every = float(os.environ.get('AZMQ_SOAK_KILL_EVERY', '300'))
    rate, producers, prefetch = 20, 2, 20
    broker = zmq_broker_factory(*BROKER_ARGS)
    queue = f'soak-{uuid.uuid4().hex[:8]}'
    for index in range(2):
        ledger = chaos_dir / f'consumer{index}.log'
        actors.append(Actor('consumer', broker.endpoint, queue, ledger, prefetch=prefetch, work_ms=5).wait_ready())
    count = int(rate * duration * 1.1)  # producers outlast the sampling
    for index in range(producers):
        ledger = chaos_dir / f'producer{index}.log'
        actors.append(Actor('producer', broker.endpoint, queue, ledger, count=count, rate=rate, prefix=f'p{index}'))
    clients = list(actors)
    samples: dict[str, tuple[list[int], list[int]]] = {'broker': ([], [])}
    samples.update({f'client{i}': ([], []) for i in range(len(clients))})
    started = time.monotonic()
    next_kill = started + kill_every * rng.uniform(0.5, 1.0)
    kills = 0
    while time.monotonic() - started < duration:
        time.sleep(10)  # the sampling period of a soak
        for key, actor in [('broker', None), *((f'client{i}', a) for i, a in enumerate(clients))]:
            if actor is not None and actor.count('done'):
                continue  # a producer that sent all its tasks has exited: nothing to sample
            rss, fds = _rss_and_fds(broker.pid if actor is None else actor.pid)
            samples[key][0].append(rss)
            samples[key][1].append(fds)
        if time.monotonic() >= next_kill:
            broker.kill()
            broker.start()
            kills += 1
            next_kill = time.monotonic() + kill_every * rng.uniform(0.5, 1.5)
    flat = {key: (_flat(rss, 16 << 20), _flat(fds, 8)) for key, (rss, fds) in samples.items()}
    figures = dict(
        seed=seed,
        fault='soak with periodic broker kill -9',
        injected=f'{kills} kills in {duration:.0f} s',
        duration_s=duration,
        rss_mib={
            key: [round(v / 2**20, 1) for v in rss[:: max(1, len(rss) // 12)]] for key, (rss, _) in samples.items()
        },
        fds={key: fds[:: max(1, len(fds) // 12)] for key, (_, fds) in samples.items()},
        flat=flat,
        duplicate_bound=kills * (2 * prefetch + producers),
    )
    ledgers = [actor.ledger for actor in clients]
    out = ledger_out(chaos_dir)
    # Written now and again at the end, so that a failure while the producers finish keeps the samples.
    write_summary(out, 'soak', Books.read(ledgers), phase='sampled, producers finishing', **figures)
    for actor in clients[2:]:
        # The producers send for 10% longer than the sampling (see `count`), plus the broker's downtimes.
        actor.wait_done(0.1 * duration + 300)
    wait_until(lambda: not Books.read(ledgers).lost, 120, interval=0.5, what='every confirmed task delivered')
    wait_until(lambda: remaining(broker.data_dir, queue) == 0, 120, interval=0.5, what='every task acknowledged')
    books = Books.read(ledgers)
    record = write_summary(out, 'soak', books, phase='done', acknowledged=len(books.confirmed), **figures)
    print(record)
    assert books.corrupt == 0 and not books.lost and not books.failed
    assert books.confirmed == {f'p{i}-{n}' for i in range(producers) for n in range(count)}
    assert books.duplicates <= kills * (2 * prefetch + producers)
    assert all(rss_flat and fds_flat for rss_flat, fds_flat in flat.values()), flat


def test_producer_sigstop_others_go_on(request, zmq_broker_factory, chaos_dir, actors):
    """A producer frozen mid-stream (SIGSTOP) for longer than the peer timeout: the other producer's tasks keep being
    delivered meanwhile; thawed, the frozen one finds its session gone, says HELLO again and finishes; nothing lost."""
    seed, rng = seeded(request)
    broker = zmq_broker_factory(*BROKER_ARGS)
    queue = f'chaos-{uuid.uuid4().hex[:8]}'
    consumer = Actor('consumer', broker.endpoint, queue, chaos_dir / 'consumer.log', prefetch=20).wait_ready()
    frozen = Actor('producer', broker.endpoint, queue, chaos_dir / 'frozen.log', count=400, rate=80, prefix='f')
    other = Actor('producer', broker.endpoint, queue, chaos_dir / 'other.log', count=400, rate=80, prefix='o')
    actors.extend([consumer, frozen, other])
    wait_until(lambda: frozen.count('confirmed') >= 50, 30, what='the victim under way')
    time.sleep(rng.uniform(0.0, 0.5))  # a random moment inside its stream
    os.kill(frozen.pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        # While it is frozen (past the 2 s peer timeout), the other producer's tasks are confirmed and delivered;
        # a delivery after stopped_at + 3 s also proves the victim stayed frozen longer than the peer timeout.
        wait_until(lambda: Books.read([consumer.ledger]).first_after('delivered', stopped_at + 3.0), 30)
        progress = Books.read([other.ledger, consumer.ledger])
        delivered_while_frozen = sum(1 for when in progress.times['delivered'] if when > stopped_at)
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    thawed_at = time.time()
    frozen.wait_done(60)
    other.wait_done(60)
    ledgers = [consumer.ledger, frozen.ledger, other.ledger]
    wait_until(lambda: not Books.read(ledgers).lost, 30, interval=0.2, what='every confirmed task delivered')
    books = Books.read(ledgers)
    resumed = Books.read([frozen.ledger]).first_after('confirmed', thawed_at)
    record = write_summary(
        ledger_out(chaos_dir),
        'producer_sigstop',
        books,
        seed=seed,
        fault='producer SIGSTOP mid-stream',
        injected='1 stop of ~3 s (peer timeout 2 s)',
        delivered_while_frozen=delivered_while_frozen,
        resume_after_thaw_s=round(resumed - thawed_at, 3) if resumed else None,
        acknowledged=len(books.confirmed),
    )
    print(record)
    assert delivered_while_frozen > 50  # the others went on
    assert books.corrupt == 0 and not books.lost and not books.failed
    assert books.confirmed == {f'{p}-{n}' for p in 'fo' for n in range(400)}
