"""Where a daemon worker's CPU goes in the end-to-end workload: py-spy on both workers during the parents phase.

    python -m bench.profile_e2e [--broker aiida-zmq] [--chains 20] [--parents 50] [--out DIR]

Runs the ``e2e`` workload of ``bench.run`` once (a throwaway profile, ``verdi daemon start 2``), samples each worker
while the parent work chains run, and prints what share of the workers' busy samples is AiiDA's storage
(SQLAlchemy and SQLite), YAML (checkpoints and, for RabbitMQ, messages), the disk object store, and the
communicator (aiida-zmq's communicator, codec and broker plugin, pyzmq, kiwipy). That share bounds what any broker
can gain end to end. py-spy is not a dependency: ``pip install py-spy``.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ''):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import e2e
from bench.profile import _pyspy

# A sample whose innermost function ends so is a thread waiting, not working (py-spy does not always tell).
IDLE_SUFFIXES = ('.poll', '.select', '.wait', 'sleep', 'Lock.acquire', '_worker')  # _worker: an idle thread pool
# Categories by a frame anywhere in the stack, first match wins.
CATEGORIES = [
    ('communicator (aiida_zmq, pyzmq, kiwipy, aio_pika, pamqp)', ('aiida_zmq/communicator', 'aiida_zmq/codec',
     'aiida_zmq/protocol', 'aiida_zmq/aiida/', 'zmq/', 'kiwipy/', 'aio_pika/', 'aiormq/', 'pamqp/')),
    ('AiiDA storage (SQLAlchemy, SQLite)', ('sqlalchemy/', 'sqlite3')),
    ('YAML (checkpoints)', ('yaml/',)),
    ('disk object store', ('disk_objectstore/',)),
]  # fmt: skip


def categorize(paths: list[Path]) -> tuple[int, int, dict[str, int]]:
    """Samples in all, busy samples, and busy samples per category (the rest is ``AiiDA and plumpy, other``)."""
    total = busy = 0
    counts: collections.Counter[str] = collections.Counter()
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(' ')
            if not stack:
                continue
            count = int(count_text)
            total += count
            if stack.rsplit(';', 1)[-1].split(' (')[0].endswith(IDLE_SUFFIXES):
                continue
            busy += count
            name = next((name for name, marks in CATEGORIES if any(mark in stack for mark in marks)), None)
            counts[name or 'AiiDA and plumpy, other'] += count
    return total, busy, dict(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m bench.profile_e2e', description=__doc__.split('\n')[0])
    parser.add_argument('--broker', default='aiida-zmq', choices=sorted(e2e.PROFILES))
    parser.add_argument('--chains', type=int, default=20)
    parser.add_argument('--parents', type=int, default=50)
    parser.add_argument('--timeout', type=float, default=300.0)
    parser.add_argument('--out', type=Path, default=None, help='keep the collapsed stacks here')
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix='azpe-'))
    out = (args.out or root / 'profile').resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ['AIIDA_PATH'] = str(root / 'aiida')  # a throwaway AiiDA configuration, as bench.run uses
    os.environ['AZMQ_E2E_SPY'] = str(out)
    os.environ['AZMQ_PYSPY'] = _pyspy()
    metrics = e2e.run(args.broker, args.chains, args.parents, args.timeout)
    print(f'{args.broker}: {metrics["parents_per_s"]:.2f} parents/s while sampled')
    for key in sorted(k for k in metrics if k.startswith('cpu_ms_per_parent.')):
        role = key.split('.', 1)[1]
        if role == 'busiest_worker_share':
            print(f"  {role:>22}: {metrics[key]:8.2f} of the workers' CPU")
        else:
            print(f'  {role:>22}: {metrics[key]:8.1f} CPU ms per parent')
    total, busy, counts = categorize(sorted(out.glob('worker*.txt')))
    if not busy:
        print('no py-spy samples from the workers')
        return 1
    print(f'workers: {total} samples, {busy} busy ({100 * busy / total:.0f}%); share of busy samples:')
    for name, count in sorted(counts.items(), key=lambda item: -item[1]):
        print(f'  {100 * count / busy:5.1f}%  {name}')
    print(f'collapsed stacks in {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
