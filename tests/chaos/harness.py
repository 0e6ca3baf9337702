"""The chaos harness: actor processes that keep ledgers, the ledger arithmetic, and the JSON summaries.

A test starts producers and consumers (``tests/chaos/actor.py``) that append one line per event to their own ledger
file, injects faults, then reads every ledger and checks the books: every confirmed task delivered (a confirmed task
that never reached a consumer is *lost*), duplicates counted and bounded, nothing corrupt. Each test writes its
figures as JSON (``write_summary``) into ``$AZMQ_LEDGER_OUT`` when set, else into the test's temporary directory;
``python -m tests.chaos.report DIR`` turns them into the table of ``docs/reliability.md``.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiida_zmq.codec import default_codec
from aiida_zmq.testing import wait_until

from .actor import payload_ok

ROOT = Path(__file__).resolve().parents[2]


class Actor:
    """One actor process with its ledger file."""

    def __init__(
        self, role: str, endpoint: str, queue: str, ledger: Path, kind: str = 'aiida-zmq', **options: Any
    ) -> None:
        self.role = role
        self.ledger = ledger
        self.log_path = ledger.with_suffix('.err')
        command = [sys.executable, '-m', 'tests.chaos.actor', role, kind, endpoint, queue, str(ledger)]
        with open(self.log_path, 'ab') as err:
            self.process = subprocess.Popen(
                [*command, json.dumps(options)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def events(self) -> list[tuple[str, str, float]]:
        return read_ledger(self.ledger)

    def count(self, event: str) -> int:
        return sum(1 for name, _, _ in self.events() if name == event)

    def wait_ready(self, timeout: float = 30.0) -> Actor:
        wait_until(lambda: self._check_alive() and self.count('ready'), timeout, what=f'{self.role} {self.pid} ready')
        return self

    def wait_done(self, timeout: float) -> None:
        wait_until(lambda: self._check_alive() and self.count('done'), timeout, what=f'{self.role} {self.pid} done')

    def _check_alive(self) -> bool:
        if self.process.poll() is not None and not self.count('done'):
            raise RuntimeError(f'{self.role} {self.pid} exited with {self.process.returncode}: {self.stderr()}')
        return True

    def stderr(self) -> str:
        try:
            return self.log_path.read_text(errors='replace')[-3000:]
        except OSError:
            return ''

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            if signum == signal.SIGKILL:
                os.kill(self.process.pid, signal.SIGCONT)  # a stopped process dies at once too
            self.process.send_signal(signum)
            if signum in (signal.SIGKILL, signal.SIGTERM):
                self.process.wait(15)

    def stop(self) -> None:
        self.kill(signal.SIGKILL)


def read_ledger(path: Path) -> list[tuple[str, str, float]]:
    """The events of one ledger; a last line cut short by a kill -9 is skipped."""
    events = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        parts = line.split(' ')
        if len(parts) != 3:
            continue
        try:
            events.append((parts[0], parts[1], float(parts[2])))
        except ValueError:
            continue
    return events


@dataclass
class Books:
    """What all ledgers say together."""

    sent: set[str] = field(default_factory=set)
    confirmed: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    deliveries: collections.Counter[str] = field(default_factory=collections.Counter)
    processed: set[str] = field(default_factory=set)
    corrupt: int = 0
    times: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))

    @classmethod
    def read(cls, ledgers: Iterable[Path]) -> Books:
        books = cls()
        for path in ledgers:
            for event, task_id, when in read_ledger(path):
                books.times[event].append(when)
                if event == 'sent':
                    books.sent.add(task_id)
                elif event == 'confirmed':
                    books.confirmed.add(task_id)
                elif event == 'failed':
                    books.failed.add(task_id)
                elif event == 'delivered':
                    books.deliveries[task_id] += 1
                elif event == 'processed':
                    books.processed.add(task_id)
                elif event == 'corrupt':
                    books.corrupt += 1
        return books

    @property
    def delivered(self) -> set[str]:
        return set(self.deliveries)

    @property
    def lost(self) -> set[str]:
        """Confirmed by the broker, never delivered to anyone."""
        return self.confirmed - self.delivered

    @property
    def duplicates(self) -> int:
        """Deliveries beyond the first, over all tasks (at-least-once allows them; they must stay bounded)."""
        return sum(count - 1 for count in self.deliveries.values())

    def first_after(self, event: str, moment: float) -> float | None:
        later = [when for when in self.times.get(event, ()) if when > moment]
        return min(later) if later else None

    def summary(self) -> dict[str, Any]:
        return {
            'sent': len(self.sent),
            'confirmed': len(self.confirmed),
            'failed': len(self.failed),
            'delivered': len(self.delivered),
            'deliveries': sum(self.deliveries.values()),
            'processed': len(self.processed),
            'lost': len(self.lost),
            'duplicated': self.duplicates,
            'corrupt': self.corrupt,
            # Sent but neither confirmed nor failed: the producer died inside task_send (it may or may not be stored).
            'in_doubt': len(self.sent - self.confirmed - self.failed),
        }


def stored_tasks(data_dir: Path) -> list[tuple[int, str, bytes, int]]:
    """(id, queue, payload, state) of every task row, read without the broker (read-only SQLite connection)."""
    path = data_dir / 'tasks.sqlite3'
    db = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        return db.execute('SELECT id, queue, payload, state FROM tasks ORDER BY id').fetchall()
    finally:
        db.close()


def undecodable(rows: Iterable[tuple[int, str, bytes, int]]) -> list[int]:
    """Ids of stored tasks whose payload does not decode to an intact actor payload (a half-written task)."""
    decode = default_codec().decode
    bad = []
    for task_id, _, payload, _ in rows:
        try:
            ok = payload_ok(decode(payload))
        except Exception:
            ok = False
        if not ok:
            bad.append(task_id)
    return bad


def ledger_out(default: Path) -> Path:
    out = Path(os.environ.get('AZMQ_LEDGER_OUT') or default)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_summary(out: Path, name: str, books: Books, **extra: Any) -> dict[str, Any]:
    """Write the test's figures as ``<out>/<name>.json`` and return them."""
    record = {'test': name, 'broker': 'aiida-zmq', 'when': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}
    record.update(books.summary())
    record.update(extra)
    (out / f'{name}.json').write_text(json.dumps(record, indent=1, sort_keys=True))
    return record
