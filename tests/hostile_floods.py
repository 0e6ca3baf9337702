"""The floods of issue 14 against a real ``aiida-zmq serve`` process, with what they cost.

Each flood runs for a while from processes of their own while a victim client keeps making RPC round trips through
the broker. Measured: the broker's RSS (peak during the flood, and after every client left), the victim's RPC
latency (before, during, after) and the bytes the broker logged, per 10 s. The slow tests in
``test_hostile_clients.py`` call :func:`run_flood` and check bounds; to measure another checkout's broker (the figures
before a fix), point ``--source`` at it:

    python -m tests.hostile_floods consume --seconds 15 --source /tmp/main-checkout

Kinds: ``consume`` (CONSUMEs of unique queue names), ``malformed`` (frames that are no aiida-zmq message),
``broadcast`` (4 KB broadcasts to a subscriber that heartbeats but never reads), ``broadcast-sigstop`` (the same to a
real communicator that is SIGSTOPped), ``frames`` (messages of 150 frames of 1 MiB under ``--max-message-bytes
1048576``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

import aiida_zmq
from aiida_zmq.discovery import read_broker_info

FAST = {'heartbeat': 0.2, 'broker_timeout': 5.0}

PRELUDE = """
import sys, time, zmq
from aiida_zmq import protocol
from aiida_zmq.protocol import Command
endpoint = sys.argv[1]
def session(name, **options):
    socket = zmq.Context.instance().socket(zmq.DEALER)
    for option, value in options.items():
        socket.setsockopt(getattr(zmq, option), value)
    socket.connect(endpoint)
    socket.send_multipart(protocol.encode(Command.HELLO, name.encode(), b'1000', b'', b'0', b''))
    assert socket.poll(10000), 'no WELCOME'
    socket.recv_multipart()
    return socket
def report(count):
    print(count, flush=True)
def drain(socket):  # read the answers (DONE): a fast client, not a deaf one
    while socket.poll(0):
        socket.recv_multipart()
"""

FLOODERS = {
    'consume': """
socket = session('consume-flooder')
sent = 0
while True:
    for _ in range(5000):
        socket.send_multipart(protocol.encode(Command.CONSUME, b'%d' % sent, b'flood-%d' % sent, b'1'))
        sent += 1
    drain(socket)
    report(sent)
""",
    'malformed': """
socket = zmq.Context.instance().socket(zmq.DEALER)
socket.connect(endpoint)
sent = 0
while True:
    for _ in range(5000):
        socket.send_multipart([b'\\xde\\xad' * 8, b'junk'])
        sent += 1
    report(sent)
""",
    'broadcaster': """
socket = session('broadcaster')
payload = b'\\x00J"' + b'b' * (int(sys.argv[2]) - 4) + b'"'
sent = 0
while True:
    for _ in range(1000):
        socket.send_multipart(protocol.encode(Command.PUBLISH, b'%d' % sent, payload))
        sent += 1
    drain(socket)
    report(sent)
""",
    'deaf-subscriber': """
socket = session('deaf-subscriber', RCVHWM=1, RCVBUF=4096)
socket.send_multipart(protocol.encode(Command.SUBSCRIBE, b's'))
report(0)
while True:  # alive, never reading
    time.sleep(0.2)
    socket.send_multipart(protocol.encode(Command.HEARTBEAT))
""",
    'stopped-subscriber': """
import aiida_zmq
communicator = aiida_zmq.connect(endpoint, heartbeat=0.2, broker_timeout=5.0)
communicator.add_broadcast_subscriber(lambda *args: None)
communicator.rpc_send  # connected and subscribed
report(0)
time.sleep(3600)
""",
    'frames': """
socket = session('frames-flooder')
frame = b'f' * (1024 * 1024)
sent = 0
while True:
    head = protocol.encode(Command.TASK_SEND, b'%d' % sent, b'frames', b'1', b'x')[:-1]
    socket.send_multipart([*head, *([frame] * 147)])  # 152 frames, 147 MiB
    sent += 1
    drain(socket)
    report(sent)
""",
}


SOURCE_LAUNCHER = """
import sys
sys.meta_path[:] = [finder for finder in sys.meta_path if 'editable' not in repr(finder).lower()]
sys.path.insert(0, sys.argv[1])
import aiida_zmq.cli.main
assert aiida_zmq.cli.main.__file__.startswith(sys.argv[1]), aiida_zmq.cli.main.__file__
aiida_zmq.cli.main.main(sys.argv[2:], prog_name='aiida-zmq')
"""


KINDS = ['consume', 'malformed', 'broadcast', 'broadcast-sigstop', 'frames']


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.05):
            try:
                rss = self.process.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self.samples.append((time.monotonic(), rss))

    def now(self) -> int:
        return self.process.memory_info().rss


def _round_trips(victim, count: int | None = None, until: threading.Event | None = None) -> list[float]:
    latencies: list[float] = []
    index = 0
    while (count is None or index < count) and (until is None or not until.is_set()):
        started = time.perf_counter()
        try:
            assert victim.rpc_send('victim-echo', index).result(timeout=10) == index
        except Exception:  # a timeout counts as its wait: the victim was not served
            pass
        latencies.append(time.perf_counter() - started)
        index += 1
    return latencies


def _summary(latencies: list[float]) -> dict:
    if len(latencies) < 2:
        return {'count': len(latencies)}
    return {
        'count': len(latencies),
        'p50_ms': round(statistics.median(latencies) * 1e3, 2),
        'p99_ms': round(statistics.quantiles(latencies, n=100)[98] * 1e3, 2),
        'max_ms': round(max(latencies) * 1e3, 2),
    }


def _flooder(kind: str, endpoint: str, env: dict, *args: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, '-c', PRELUDE + FLOODERS[kind], endpoint, *args], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None
    process.stdout.readline()  # connected (and for the flooders, the first batch is out)
    return process


def run_flood(
    kind: str,
    seconds: float = 10.0,
    source: str | None = None,
    broker_args: tuple[str, ...] = (),
    broadcast_bytes: int = 4096,
) -> dict:
    """Run one flood and return its figures (see the module docstring)."""
    base = Path(tempfile.mkdtemp(prefix='azfl-'))
    data = base / 'data'
    data.mkdir(mode=0o700)
    endpoint = f'ipc://{data}/broker.sock'
    log_path = base / 'broker.log'
    env = dict(os.environ)
    launcher = [sys.executable, '-m', 'aiida_zmq.cli']
    if source:
        # This checkout is installed in editable mode, whose import hook wins over PYTHONPATH: step around it.
        launcher = [sys.executable, '-c', SOURCE_LAUNCHER, source]
    args = list(broker_args)
    if kind == 'frames':
        args += ['--max-message-bytes', str(1024 * 1024)]
    with open(log_path, 'wb') as log:
        broker = subprocess.Popen(
            [*launcher, 'serve', '--data-dir', str(data), '--bind', endpoint, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    flooders: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 30
        while (read_broker_info(data) or {}).get('pid') != broker.pid:
            assert broker.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        sampler = RssSampler(broker.pid)
        sampler.start()
        server = aiida_zmq.connect(endpoint, **FAST)
        server.add_rpc_subscriber(lambda _comm, msg: msg, 'victim-echo')
        victim = aiida_zmq.connect(endpoint, **FAST)
        before = _round_trips(victim, 300)
        rss_before = sampler.now()

        if kind in ('broadcast', 'broadcast-sigstop'):
            listener = 'deaf-subscriber' if kind == 'broadcast' else 'stopped-subscriber'
            flooders.append(_flooder(listener, endpoint, env))
            if kind == 'broadcast-sigstop':
                os.kill(flooders[-1].pid, signal.SIGSTOP)
            flooders.append(_flooder('broadcaster', endpoint, env, str(broadcast_bytes)))
        else:
            flooders.append(_flooder(kind, endpoint, env))
        log_start = log_path.stat().st_size
        started = time.monotonic()
        done = threading.Event()
        timer = threading.Timer(seconds, done.set)
        timer.start()
        during = _round_trips(victim, until=done)
        elapsed = time.monotonic() - started
        log_bytes = log_path.stat().st_size - log_start
        peak_during = sampler.peak
        for process in flooders:
            process.kill()
            process.wait(10)
        counts = []
        for process in flooders:
            assert process.stdout is not None
            lines = process.stdout.read().split()
            counts.append(int(lines[-1]) if lines else 0)
        time.sleep(2)  # the broker's heartbeat check notices the departed (a clock: there is no event to await)
        after = _round_trips(victim, 300)
        victim.close()
        server.close()
        time.sleep(6)  # everyone left; the broker hands freed memory back every 5 s
        rss_after = sampler.now()
        sampler.halt.set()
        alive = broker.poll() is None
        return {
            'kind': kind,
            'seconds': round(elapsed, 1),
            'messages': counts,
            'broker_alive': alive,
            'rss_before_mib': round(rss_before / 2**20, 1),
            'rss_peak_mib': round(peak_during / 2**20, 1),
            'rss_after_everyone_left_mib': round(rss_after / 2**20, 1),
            'rpc_before': _summary(before),
            'rpc_during': _summary(during),
            'rpc_after': _summary(after),
            'log_bytes_per_10s': int(log_bytes * 10 / max(elapsed, 0.1)),
            'log_tail': log_path.read_text(errors='replace')[-1500:],
        }
    finally:
        for process in flooders:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        if broker.poll() is None:
            broker.terminate()
            try:
                broker.wait(20)
            except subprocess.TimeoutExpired:
                broker.kill()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('kinds', nargs='+', choices=KINDS)
    parser.add_argument('--seconds', type=float, default=10.0)
    parser.add_argument('--source', help='run the broker from this checkout (PYTHONPATH) instead of this one')
    parser.add_argument('--broadcast-bytes', type=int, default=4096, help='size of the broadcasts (default 4 KB)')
    parser.add_argument('--no-log-tail', action='store_true')
    options = parser.parse_args()
    for kind in options.kinds:
        result = run_flood(kind, options.seconds, options.source, broadcast_bytes=options.broadcast_bytes)
        if options.no_log_tail:
            result.pop('log_tail')
        print(json.dumps(result, indent=1), flush=True)


if __name__ == '__main__':
    main()
