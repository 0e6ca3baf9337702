"""Summaries: machine facts, medians over repetitions, the markdown tables, the JSON file, optional plots."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

# (workload, metric, label, higher is better, format)
ROWS: list[tuple[str, str, str, bool, str]] = [
    ('tasks', 'tasks_per_s', 'tasks/s, with replies', True, '{:,.0f}'),
    ('tasks_noreply', 'tasks_per_s', 'tasks/s, no_reply', True, '{:,.0f}'),
    ('rpc', 'rpc_p50_us', 'RPC round trip p50 (us)', False, '{:,.0f}'),
    ('rpc', 'rpc_p99_us', 'RPC round trip p99 (us)', False, '{:,.0f}'),
    ('broadcast', 'deliveries_per_s', 'broadcast deliveries/s', True, '{:,.0f}'),
    ('broadcast', 'broadcasts_per_s', 'broadcasts/s to all subscribers', True, '{:,.0f}'),
    ('connect', 'connect_ms', 'connect (ms)', False, '{:,.1f}'),
    ('connect', 'connect_first_rpc_ms', 'connect + first RPC (ms)', False, '{:,.1f}'),
    ('clients', 'connect_all_s', 'clients (100; 30 with --quick): time to connect all (s)', False, '{:,.2f}'),
    ('clients', 'fanout_p50_ms', 'clients: one broadcast reaching all, p50 (ms)', False, '{:,.1f}'),
    ('clients', 'rpc_p50_us', 'clients: RPC round trip p50 while connected (us)', False, '{:,.0f}'),
    ('e2e', 'chains_per_s', 'AiiDA daemon (2 workers): work chains/s', True, '{:,.1f}'),
    ('e2e', 'parents_per_s', 'AiiDA daemon: parent+child work chains/s', True, '{:,.2f}'),
    (
        'control',
        'pause_all.effect_last_s',
        'verdi process pause of every parent: sent to the last paused (s)',
        False,
        '{:,.2f}',
    ),
    (
        'control',
        'play_all.effect_last_s',
        'verdi process play of every parent: sent to the last played (s)',
        False,
        '{:,.2f}',
    ),
    (
        'control',
        'kill.effect_p50_s',
        'kill of many parents: sent to half of them and their jobs killed (s)',
        False,
        '{:,.2f}',
    ),
    ('control', 'kill.effect_last_s', 'kill of many parents: sent to the last killed (s)', False, '{:,.2f}'),
]
FLOOR_ROWS: list[tuple[str, str, str]] = [
    ('floor_hop', 'hop_p50_us', 'bare pyzmq DEALER->ROUTER->DEALER round trip p50 (us)'),
    ('floor_hop', 'hop_p99_us', 'bare pyzmq DEALER->ROUTER->DEALER round trip p99 (us)'),
    ('floor_hop', 'one_hop_p50_us', 'bare pyzmq DEALER->ROUTER->back round trip p50 (us)'),
    ('floor_hop', 'confirmed_sends_per_s', 'most sends/s of one sender that waits for each answer (1 / the above)'),
    ('floor_sqlite', 'sqlite_commits_per_s', 'SQLite WAL commits/s, 1 KiB row each (synchronous=NORMAL)'),
    ('floor_sqlite', 'sqlite_fsync_commits_per_s', 'SQLite WAL commits/s with fsync (synchronous=FULL)'),
    ('floor_sqlite', 'sqlite_batched_rows_per_s', 'SQLite WAL rows/s, 100 rows per commit'),
]
MAIN = 'aiida-zmq'


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return 'absent'


def _cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'], check=False, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return out.stdout.strip() or 'unknown'


def machine_facts(rabbitmq_version: str = '') -> dict[str, Any]:
    import psutil
    import zmq

    return {
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'cpu_count': os.cpu_count(),
        'cpu_model': _cpu_model(),
        'memory_gib': round(psutil.virtual_memory().total / 2**30, 1),
        'platform': platform.platform(),
        'python': platform.python_version(),
        'pyzmq': zmq.__version__,
        'libzmq': zmq.zmq_version(),
        'kiwipy': _version('kiwipy'),
        'aiida-core': _version('aiida-core'),
        'aiida-zmq': _version('aiida-zmq'),
        'rabbitmq': rabbitmq_version or 'not used',
        'git_commit': _git_commit(),
        'loadavg_at_end': [round(x, 2) for x in os.getloadavg()],
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{workload: {broker: {'runs', 'failed', 'errors', metric: {'median', 'values'}}}}``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for rec in records:
        cell = out.setdefault(rec['workload'], {}).setdefault(rec['broker'], {'runs': 0, 'failed': 0, 'errors': []})
        cell['runs'] += 1
        if rec['status'] != 'ok':
            cell['failed'] += 1
            cell['errors'].append(rec['error'])
            continue
        for metric, value in rec['metrics'].items():
            cell.setdefault(metric, {'values': []})['values'].append(value)
    for brokers in out.values():
        for cell in brokers.values():
            for value in cell.values():
                if isinstance(value, dict):
                    value['median'] = statistics.median(value['values'])
    return out


def _cell(summary: dict, workload: str, broker: str, metric: str, fmt: str) -> str:
    cell = summary.get(workload, {}).get(broker)
    if cell is None:
        return '-'
    if metric not in cell:
        return 'FAILED' if cell['failed'] else '-'
    text = fmt.format(cell[metric]['median'])
    return f'{text} ({cell["failed"]} of {cell["runs"]} failed)' if cell['failed'] else text


def _median(summary: dict, workload: str, broker: str, metric: str) -> float | None:
    value = summary.get(workload, {}).get(broker, {}).get(metric)
    return value['median'] if value else None


def markdown(summary: dict, brokers: list[str], reps: int) -> str:
    """The broker table (medians, then aiida-zmq / peer ratios) and the floor table."""
    peers = [b for b in brokers if b != MAIN] if MAIN in brokers else []
    lines = [f'Medians of {reps} repetition(s). Ratios are {MAIN} / peer (> 1 is better for rates, < 1 for times).', '']
    header = ['figure', *brokers, *[f'{MAIN} / {p}' for p in peers]]
    lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for workload, metric, label, _higher, fmt in ROWS:
        if workload not in summary:
            continue
        cells = [_cell(summary, workload, b, metric, fmt) for b in brokers]
        ratios = []
        for peer in peers:
            mine, theirs = _median(summary, workload, MAIN, metric), _median(summary, workload, peer, metric)
            ratios.append(f'{mine / theirs:.2f}' if mine and theirs else '-')
        lines.append('| ' + ' | '.join([label, *cells, *ratios]) + ' |')
    floors = [(w, m, label) for w, m, label in FLOOR_ROWS if w in summary]
    if floors:
        lines += ['', '| floor on this machine | median |', '|---|---|']
        lines += [f'| {label} | {_cell(summary, w, "floor", m, "{:,.0f}")} |' for w, m, label in floors]
    failures = [
        f'- {w} / {b}: {err}' for w, bs in summary.items() for b, cell in bs.items() for err in cell.get('errors', [])
    ]
    if failures:
        lines += ['', 'Failed runs:', *failures]
    return '\n'.join(lines) + '\n'


def scale_markdown(scale: dict[str, Any]) -> str:
    if not scale:
        return ''
    if scale.get('status') != 'ok':
        return f'\nScale ({MAIN}): FAILED: {scale.get("error")}\n'
    m = scale['metrics']
    return (
        f'\n| scale ({MAIN}, {m["n"]:,} tasks) | value |\n|---|---|\n'
        f'| enqueue rate, no_reply (tasks/s) | {m["enqueue_per_s"]:,.0f} |\n'
        f'| broker RSS after enqueue (MiB) | {m["rss_mib"]:,.0f} |\n'
        f'| store size on disk (MiB) | {m["store_mib"]:,.0f} |\n'
        f'| restart after kill -9 until broker.json (s) | {m["restart_info_s"]:.2f} |\n'
        f'| restart after kill -9 until a round trip is answered (s) | {m["restart_ready_s"]:.2f} |\n'
        f'| drain rate (tasks/s) | {m["drain_per_s"]:,.0f} |\n'
    )


# One PNG per group of figures: (file name, title, [(workload, metric, label)], unit, higher is better, floor metric)
PLOTS: list[tuple[str, str, list[tuple[str, str, str]], str, bool, str | None]] = [
    ('bench-tasks', 'Tasks of ~1 KiB, one producer, one consumer',
     [('tasks', 'tasks_per_s', 'with reply futures'), ('tasks_noreply', 'tasks_per_s', 'no_reply')],
     'tasks/s', True, None),
    ('bench-rpc', 'RPC round trip, 1,000 sequential calls',
     [('rpc', 'rpc_p50_us', 'p50'), ('rpc', 'rpc_p99_us', 'p99')], 'microseconds', False, 'hop_p50_us'),
    ('bench-broadcast', 'Broadcast to 10 subscribers',
     [('broadcast', 'deliveries_per_s', 'deliveries/s')], 'deliveries/s', True, None),
    ('bench-connect', 'Fresh process: connect, then first RPC answered',
     [('connect', 'connect_ms', 'connect'), ('connect', 'connect_first_rpc_ms', 'connect + first RPC')],
     'milliseconds', False, None),
    ('bench-e2e', 'AiiDA daemon with 2 workers',
     [('e2e', 'chains_per_s', '100 work chains'), ('e2e', 'parents_per_s', '50 parents, each with a child')],
     'work chains/s', True, None),
]  # fmt: skip
FLOOR_LABELS = {
    'confirmed_sends_per_s': 'floor: one bare pyzmq round trip per send',
    'hop_p50_us': 'floor: bare pyzmq DEALER-ROUTER-DEALER p50',
}
COLORS = {'aiida-zmq': '#1f77b4', 'aiida-zmq-yaml': '#6baed6', 'core.zeromq': '#ff7f0e',
          'rabbitmq-yaml': '#2ca02c', 'rabbitmq-json': '#98df8a'}  # fmt: skip


def plot(summary: dict, brokers: list[str], out_dir: Path) -> list[Path]:
    """Grouped bar charts (PNG): medians, whiskers from the lowest to the highest repetition, FAILED where a broker
    failed, and the machine's floor as a line where there is one. Needs matplotlib, which is optional."""
    try:
        import matplotlib

        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('plots: matplotlib is not installed (pip install matplotlib, or the [bench] extra); none written')
        return []
    written = []
    for name, title, series, unit, higher, floor_metric in PLOTS:
        if not any(workload in summary for workload, _, _ in series):
            continue
        fig, ax = plt.subplots(figsize=(7.5, 3.8))
        width = 0.8 / max(1, len(brokers))
        labelled: set[str] = set()
        for b_index, broker in enumerate(brokers):
            for s_index, (workload, metric, _label) in enumerate(series):
                cell = summary.get(workload, {}).get(broker)
                x = s_index + (b_index - (len(brokers) - 1) / 2) * width
                value = (cell or {}).get(metric)
                if value is None:
                    if cell is not None:
                        ax.text(x, 0, 'FAILED', rotation=90, ha='center', va='bottom', fontsize=7, color='red')
                    continue
                values = value['values']
                median = value['median']
                whiskers = [[median - min(values)], [max(values) - median]]
                label = None if broker in labelled else broker
                labelled.add(broker)
                color = COLORS.get(broker, 'grey')
                ax.bar(
                    x, median, width * 0.95, color=color, label=label, yerr=whiskers, capsize=2, error_kw={'lw': 0.8}
                )
                text = f'{median:,.0f}' if median >= 10 else f'{median:,.1f}'
                ax.text(x, median, text, ha='center', va='bottom', fontsize=6.5)
        if floor_metric:
            floor = _median(summary, 'floor_hop', 'floor', floor_metric)
            if floor:
                ax.axhline(floor, color='black', ls='--', lw=0.8, label=f'{FLOOR_LABELS[floor_metric]} ({floor:,.0f})')
        ax.set_xticks(range(len(series)), [label for _, _, label in series])
        ax.set_ylabel(unit + (' (higher is better)' if higher else ' (lower is better)'))
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis='y', lw=0.3)
        fig.tight_layout()
        path = out_dir / f'{name}.png'
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
