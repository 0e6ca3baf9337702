"""The ``aiida_profile_zmq`` fixture of the pytest plugin, as a plugin author uses it: in their own pytest session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from aiida_zmq.testing import wait_until

pytestmark = pytest.mark.aiida

CONFTEST = """
import pytest

pytest_plugins = ['aiida.tools.pytest_fixtures']


@pytest.fixture(scope='session', autouse=True)
def aiida_profile(aiida_profile_zmq):
    return aiida_profile_zmq
"""

TEST = """
import json

import psutil
from aiida import orm

from aiida_zmq.aiida.broker import broker_data_dir
from aiida_zmq.aiida.demo_workflows import ParentWorkChain
from aiida_zmq.discovery import read_live_broker_info


def test_work_chains_run_in_the_daemon_with_this_broker(aiida_profile, submit_and_await, started_daemon_client):
    assert aiida_profile.process_control_backend == 'zmq'
    node = submit_and_await(ParentWorkChain, x=orm.Int(1), y=orm.Int(2), timeout=120)
    assert node.is_finished_ok, node.exit_status
    info = read_live_broker_info(broker_data_dir(aiida_profile))
    circusd = psutil.Process(started_daemon_client.get_daemon_pid())
    assert info['pid'] in {child.pid for child in circusd.children(recursive=True)}  # the daemon's watcher
    pids = [circusd.pid] + [child.pid for child in circusd.children(recursive=True)]
    print('PIDS ' + json.dumps(pids))
"""


def test_aiida_profile_zmq_in_a_plugin_authors_session(tmp_path: Path) -> None:
    (tmp_path / 'conftest.py').write_text(CONFTEST)
    (tmp_path / 'test_in_daemon.py').write_text(TEST)
    env = {key: value for key, value in os.environ.items() if not key.startswith('AIIDA_')}
    # aiida-core's daemon client looks for `verdi` on the PATH, as in any virtual environment that is activated.
    env['PATH'] = f'{Path(sys.executable).parent}{os.pathsep}{env.get("PATH", "")}'
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-s', '-p', 'no:cacheprovider', str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert '1 passed' in result.stdout
    pids = json.loads(next(line for line in result.stdout.splitlines() if line.startswith('PIDS '))[5:])
    assert len(pids) >= 4  # circusd, two plugin watchers or more, the broker and a worker

    def all_gone() -> bool:
        return not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != 'zombie']

    # The fixture stopped the daemon and with it the broker: nothing of the session is left running.
    wait_until(all_gone, 30, interval=0.1, what='the daemon and broker of the finished session to be gone')
