"""``aiida-zmq top``: the broker live in a terminal, refreshed every second, as ``htop`` or ``circus-top`` are.

Plain curses over the broker's ADMIN ``status`` (one round trip a refresh): it works over SSH on a cluster login
node, without a browser. Queues (depth, consumers, in flight, how fast the depth changes), workers (the sessions
that consume: slots, held tasks), dead letters, the broker's memory, store size and rates (stored, delivered,
answered, commits per second). Keys: ``s`` sorts the queues by the next column, ``r`` reverses, ``q`` quits.
"""

from __future__ import annotations

import time
import typing as t

import click

from .admin import Target, broker_options, connect_broker, human_size

__all__ = ('Screen', 'top')

# The queue columns ``s`` cycles through, and how each sorts (largest first, except the name).
SORTS: tuple[tuple[str, t.Callable[[dict[str, t.Any]], t.Any]], ...] = (
    ('depth', lambda row: (-row['depth'], row['name'])),
    ('in flight', lambda row: (-row['in_flight'], row['name'])),
    ('consumers', lambda row: (-row['consumers'], row['name'])),
    ('rate', lambda row: (-abs(row['rate']), row['name'])),
    ('name', lambda row: row['name']),
)
RATES = (('stored', 'tasks_stored'), ('delivered', 'deliveries'), ('answered', 'tasks_acked'), ('commits', 'commits'))


class Screen:
    """What the screen shows: :meth:`update` takes each status answer (rates come from the one before), :meth:`lines`
    renders the last one with the current sort (a key redraws at once, without asking the broker)."""

    def __init__(self) -> None:
        self.sort = 0
        self.reverse = False
        self._previous: tuple[float, dict[str, t.Any]] | None = None
        self._status: dict[str, t.Any] = {}
        self._rates: dict[str, float] = {}
        self._depth_rates: dict[str, float] = {}

    def key(self, key: int) -> bool:
        """Handle a key; ``False`` to quit."""
        if key in (ord('q'), ord('Q'), 27):
            return False
        if key == ord('s'):
            self.sort = (self.sort + 1) % len(SORTS)
        elif key == ord('r'):
            self.reverse = not self.reverse
        return True

    def update(self, status: dict[str, t.Any], now: float) -> None:
        previous, self._previous, self._status = self._previous, (now, status), status
        if previous is None or now <= previous[0]:
            self._rates = {label: 0.0 for label, _ in RATES}
            self._depth_rates = {}
            return
        elapsed, before = now - previous[0], previous[1]
        stats, old = status.get('stats', {}), before.get('stats', {})
        self._rates = {label: (stats.get(key, 0) - old.get(key, 0)) / elapsed for label, key in RATES}
        old_queues = before.get('queues', {})
        self._depth_rates = {
            name: (queue['depth'] - old_queues.get(name, queue)['depth']) / elapsed
            for name, queue in status.get('queues', {}).items()
        }

    def lines(self) -> list[str]:
        """The screen's text, one string a line."""
        status = self._status
        rates = '  '.join(f'{label} {value:,.0f}/s' for label, value in self._rates.items())
        lines = [
            f'aiida-zmq top  broker pid {status.get("pid")}  up {status.get("uptime", 0):,.0f} s  memory '
            f'{_memory(status.get("pid"))}  store {human_size(status.get("store_bytes", 0))}',
            f'  {rates}  dead letters {status.get("dead_letters", 0)}',
            '',
            *self._queues(),
            '',
            *_workers(status),
        ]
        sort_name = SORTS[self.sort][0] + (' (reversed)' if self.reverse else '')
        return [*lines, '', f'sorted by {sort_name}   keys: s sort  r reverse  q quit']

    def _queues(self) -> list[str]:
        in_flight: dict[str, int] = {}
        for client in self._status.get('clients', []):
            for queue, count in (client.get('held_per_queue') or {}).items():
                in_flight[queue] = in_flight.get(queue, 0) + count
        rows = [
            {
                'name': name,
                'depth': queue['depth'],
                'consumers': queue['consumers'],
                'in_flight': in_flight.get(name, 0),
                'rate': self._depth_rates.get(name, 0.0),
            }
            for name, queue in self._status.get('queues', {}).items()
        ]
        rows.sort(key=SORTS[self.sort][1], reverse=self.reverse)
        lines = [f'{"QUEUE":<36} {"DEPTH":>8} {"CONSUMERS":>9} {"IN FLIGHT":>9} {"DEPTH/S":>8}']
        lines += [
            f'{_cut(row["name"], 36):<36} {row["depth"]:>8} {row["consumers"]:>9} {row["in_flight"]:>9} '
            f'{row["rate"]:>+8.1f}'
            for row in rows
        ]
        return lines


def _workers(status: dict[str, t.Any]) -> list[str]:
    """The sessions that consume a queue, with their slots (prefetch) and what they hold."""
    lines = [f'{"WORKER":<32} {"PID":>8} {"SLOTS":>6} {"HELD":>5}  TASKS HELD']
    for client in status.get('clients', []):
        prefetch = client.get('prefetch') or {}
        if not prefetch:
            continue
        slots = 'inf' if any(value == 0 for value in prefetch.values()) else str(sum(prefetch.values()))
        ids = ' '.join(str(task_id) for task_id in client.get('held_ids', [])[:8])
        more = ' ...' if client['held'] > 8 else ''
        lines.append(f'{_cut(client["name"], 32):<32} {client["pid"]:>8} {slots:>6} {client["held"]:>5}  {ids}{more}')
    return lines


def _cut(text: str, width: int) -> str:
    """Printable and at most ``width`` characters (names come from clients: never let one move the cursor)."""
    text = ''.join(char if char.isprintable() else '?' for char in text)
    return text if len(text) <= width else text[: width - 1] + '~'


def _memory(pid: t.Any) -> str:
    import psutil

    try:
        return human_size(psutil.Process(int(pid)).memory_info().rss)
    except (psutil.Error, TypeError, ValueError):  # another machine's broker, or gone
        return '?'


@click.command()
@broker_options
@click.option('--interval', type=click.FloatRange(min=0.2), default=1.0, show_default=True, help='Seconds a refresh.')
def top(target: Target, interval: float) -> None:
    """Show the broker live: queues, workers and their held tasks, dead letters, memory, store size and rates.

    Keys: s sorts the queues by the next column, r reverses the order, q quits."""
    import curses

    communicator = connect_broker(target)
    try:
        curses.wrapper(_loop, communicator, interval)
    except KeyboardInterrupt:
        pass
    finally:
        communicator.close()


def _loop(window: t.Any, communicator: t.Any, interval: float) -> None:
    import curses

    curses.curs_set(0)
    window.timeout(int(interval * 1000))
    screen = Screen()
    lines = ['aiida-zmq top: asking the broker...']
    next_poll = 0.0
    while True:
        now = time.monotonic()
        if now >= next_poll:
            try:
                screen.update(communicator.admin('status', timeout=10.0), now)
                lines = screen.lines()
            except Exception as exception:  # the broker stopped or does not answer: say so, keep trying
                lines = [f'aiida-zmq top: no answer from the broker ({exception}); trying again', '', 'q quits']
            next_poll = now + interval
        _draw(window, lines)
        key = window.getch()
        if key != -1:
            if not screen.key(key):
                return
            lines = screen.lines()


def _draw(window: t.Any, lines: list[str]) -> None:
    window.erase()
    height, width = window.getmaxyx()
    for row, line in enumerate(lines[: height - 1]):
        window.addnstr(row, 0, line, width - 1)
    window.refresh()
