"""Which process each task is for, and why a process does not move: ``aiida-zmq tasks list`` and ``explain`` on a
real ``core.sqlite_dos`` profile, its daemon and broker run (and stopped) as a user runs them."""

from __future__ import annotations

import json

from aiida_profile import AiidaZmqProfile


def test_tasks_list_names_the_process_and_its_state(aiida_zmq_profile_factory) -> None:
    """Issue 22.5: a task's row says which process it is for and, for a profile, the process's state in AiiDA."""
    profile: AiidaZmqProfile = aiida_zmq_profile_factory()
    pks = profile.driver('submit', 'add', '2')['pks']  # no daemon: the tasks wait in the store
    rows = json.loads(profile.aiida_zmq('tasks', 'list', '-p', profile.name, '--json').stdout)
    assert [(row['process'], row['process_state']) for row in rows] == [(pk, 'Created') for pk in pks], rows
    text = profile.aiida_zmq('tasks', 'list', '-p', profile.name).stdout
    header, *lines = text.splitlines()
    assert 'process' in header and 'process state' in header, text
    for pk, line in zip(pks, lines, strict=True):
        assert line.split()[5:7] == [str(pk), 'Created'], text
    # Only a data directory: the process is named, its state is not known (no profile to read).
    rows = json.loads(profile.aiida_zmq('tasks', 'list', '--data-dir', str(profile.data_dir), '--json').stdout)
    assert [row['process'] for row in rows] == pks and all('process_state' not in row for row in rows), rows
