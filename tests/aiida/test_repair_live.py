"""Repair while the daemon runs (issue 23.4): ``aiida-zmq repair`` never makes a second task for a process whose
task is held by a worker or waits, and never drops the task of a process that is still active, while processes come
and go (``verdi process repair`` refuses to run with the daemon running: it would, aiida-core #5715, #3973)."""

from __future__ import annotations

import collections
import contextlib
import json
import subprocess
import sys

import pytest
from aiida_profile import DRIVER, AiidaZmqProfile, CommandFailed

from aiida_zmq.testing import wait_until


def _live_tasks(profile: AiidaZmqProfile) -> collections.Counter[int]:
    """How many waiting or held tasks each process has, per the broker."""
    rows = json.loads(profile.aiida_zmq('tasks', 'list', '-p', profile.name, '--json', '--limit', '10000').stdout)
    return collections.Counter(row['process'] for row in rows if row['state'] in ('ready', 'delivered'))


@pytest.mark.timeout(900)  # a daemon, four jobs and ten work chains on a loaded machine: beyond the default 300 s
def test_repair_with_the_daemon_running_makes_no_second_task(aiida_zmq_profile_factory, tmp_path) -> None:
    profile: AiidaZmqProfile = aiida_zmq_profile_factory()
    profile.daemon_start(2)
    hold = tmp_path / 'hold'
    hold.touch()
    zombies = [profile.driver('make-zombie')['pk'] for _ in range(2)]  # older than --min-age by the repair
    try:
        running = profile.driver('submit-held', '4', str(hold))['pks']

        def all_running() -> bool:
            states = profile.driver('states', *map(str, running))['states']
            return all(state['job_state'] == 'running' for state in states.values())

        wait_until(all_running, timeout=120, interval=0.5, what='the four held jobs to run in the workers')
        # Load beside the repair: processes submitted (and run by the workers) while it looks at queue and database.
        load = subprocess.Popen(
            [sys.executable, str(DRIVER), profile.name, 'submit', 'add', '10'],
            env=profile.env,
            cwd=profile.aiida_path,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            repair = profile.aiida_zmq('repair', '-p', profile.name, '--min-age', '3')
        finally:
            out, _ = load.communicate(timeout=180)
        assert load.returncode == 0, out
        submitted = json.loads([line for line in out.splitlines() if line.startswith('{')][-1])['pks']
        tasks = _live_tasks(profile)
        duplicated = {pk: count for pk, count in tasks.items() if count > 1}
        assert not duplicated, f'second tasks made by repair: {duplicated}\n{repair.stdout}'
        assert all(tasks[pk] == 1 for pk in running), (tasks, repair.stdout)  # still held, one each
        # Revived once each: one task ever (a worker may have taken and ended it already: the history tells).
        explained = json.loads(profile.aiida_zmq('explain', '-p', profile.name, '--json', *map(str, zombies)).stdout)
        assert [len(explained[str(pk)]['tasks']) for pk in zombies] == [1, 1], (explained, repair.stdout)
        for pk in zombies:
            assert f'Revived process `{pk}`' in repair.stdout, repair.stdout
        for pk in running:
            assert f'Revived process `{pk}`' not in repair.stdout, repair.stdout
        hold.unlink()
        answer = profile.driver('wait', *map(str, running + submitted), '--timeout', '180')
        assert not answer['pending'], answer
        failed = {pk: s for pk, s in answer['states'].items() if not s['ok']}
        assert not failed, f'processes that did not finish ok (run twice?): {failed}'
    finally:
        hold.unlink(missing_ok=True)
        for pk in zombies:  # a worker may have ended them already (they have no checkpoint to run from)
            with contextlib.suppress(CommandFailed):
                profile.driver('bury', str(pk))
