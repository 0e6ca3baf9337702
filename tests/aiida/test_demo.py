"""``aiida-zmq demo``, as the README runs it: a subprocess on a machine with no AiiDA profile of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from aiida_zmq.circus import watcher_name

pytestmark = pytest.mark.aiida


def _processes_under(path: str) -> list[str]:
    found = []
    for process in psutil.process_iter(['pid', 'cmdline', 'environ']):
        try:
            cmdline = ' '.join(process.info['cmdline'] or [])
            environ = process.info['environ'] or {}
            if (path in cmdline or environ.get('AIIDA_PATH') == path) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(f'{process.pid}: {cmdline}')
        except (psutil.Error, TypeError):
            continue
    return found


def test_demo_runs_and_cleans_up(tmp_path: Path) -> None:
    env = dict(os.environ)
    # As on a fresh machine: no AiiDA configuration to find, and the virtualenv not activated.
    env.pop('AIIDA_PATH', None)
    env.pop('AIIDA_PROFILE', None)
    env['HOME'] = str(tmp_path)
    env['PATH'] = '/usr/bin:/bin'
    result = subprocess.run(
        [str(Path(sys.executable).parent / 'aiida-zmq'), 'demo', '--workchains', '10'],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = result.stdout
    assert result.returncode == 0, f'{output}\n{result.stderr}'

    match = re.search(r'Creating profile `(demo-\w+)`.* in (\S+)', output)
    assert match, output
    profile, aiida_path = match.groups()
    assert 'all 10 work chains finished ok' in output
    # The daemon's watchers, the broker's among them, with their pids.
    assert re.search(rf'aiida-{profile}\s+active\s+pids: \d+, \d+', output), output
    assert re.search(rf'{re.escape(watcher_name(profile))}\s+active\s+pids: \d+', output), output
    assert re.search(r'queue \S+\.process\.queue \(launch queue\): depth 0, consumers 2', output), output
    assert re.search(r'\d+\.\d+ workflows/s end to end, \d+\.\d+ processes/s', output), output
    # It starts the daemon itself: it says so, it does not tell the user to.
    assert 'Start the daemon' not in output
    assert re.search(rf'Starting the daemon with 2 worker\(s\), as `verdi -p {profile} daemon start 2` does', output)
    # Without a terminal, progress is counted lines with a rate, not bare labels (the last line of each says all).
    assert re.search(r'^Submitting: 10/10 submitted after \d+\.\d s \(\d+\.\d/s\)$', output, re.MULTILINE), output
    assert re.search(r'^Running: 10/10 finished after \d+\.\d s \(\d+\.\d/s\)$', output, re.MULTILINE), output
    assert not re.search(r'^(Submitting|Running)\s*$', output, re.MULTILINE), output
    assert 'no process left running' in output
    assert not Path(aiida_path).exists()
    assert not _processes_under(aiida_path)
