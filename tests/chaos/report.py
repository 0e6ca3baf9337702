"""Render the chaos ledgers' JSON summaries as the table of ``docs/reliability.md``.

AZMQ_LEDGER_OUT=/tmp/azmq-ledgers .venv/bin/python -m pytest tests/chaos tests/test_security.py   # writes JSON
.venv/bin/python -m tests.chaos.compare_core_zeromq --out /tmp/azmq-ledgers                    # core.zeromq
.venv/bin/python -m tests.chaos.report /tmp/azmq-ledgers                                        # prints the table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ('broker', 'fault', 'injected', 'sent', 'confirmed', 'delivered', 'lost', 'duplicated', 'recovery')


def recovery(record: dict) -> str:
    """The time until work went on, in the unit the fault has: resume of sends, takeover of held tasks."""
    if 'resume_s_max' in record:
        return f'sends resume ≤ {record["resume_s_max"]:.2f} s (down ≤ {record["down_s_max"]:.2f} s)'
    if 'delivery_resume_s' in record:
        if record['delivery_resume_s'] is None:
            return 'never for the running clients (orphaned)'
        return f'deliveries resume {record["delivery_resume_s"]:.2f} s (down {record["down_s"]:.2f} s)'
    if 'takeover_s' in record:
        return (
            'not within 30 s' if record['takeover_s'] is None else f'held tasks taken over {record["takeover_s"]:.2f} s'
        )
    if 'drain_s' in record:
        return f'drained {record["drain_s"]:.2f} s after the last send'
    return '-'


def row(record: dict) -> list[str]:
    lost = str(record['lost'])
    if record.get('lost_phase_a') and record['lost_phase_a'] != record['lost']:
        lost += f' ({record["lost_phase_a"]} before a fresh consumer)'
    duplicated = str(record['duplicated'])
    if 'duplicate_bound' in record:
        duplicated += f' (bound {record["duplicate_bound"]})'
    values = {**record, 'lost': lost, 'duplicated': duplicated, 'recovery': recovery(record)}
    return [str(values.get(column, '-')) for column in COLUMNS]


def main(directory: str) -> None:
    records = [json.loads(path.read_text()) for path in sorted(Path(directory).glob('*.json'))]
    print('| ' + ' | '.join(COLUMNS) + ' |')
    print('|' + '---|' * len(COLUMNS))
    for record in sorted(records, key=lambda r: (r['fault'], r['broker'])):
        print('| ' + ' | '.join(row(record)) + ' |')


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else '.')
