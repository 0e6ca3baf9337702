"""``pytest --aiida-broker=zmq`` on a plugin's own tests (tests/plugin_example/), as its author would run them.

The example's conftest asks aiida-core's ``aiida_profile_factory`` for a RabbitMQ profile at a port nothing listens on:
with the option its tests, daemon included, pass on aiida-zmq; without it the profile is the RabbitMQ one it asked for.
"""

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

EXAMPLE = Path(__file__).parent / 'plugin_example'


def run_pytest(*args: str, cwd: Path = EXAMPLE, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(('AIIDA_', 'PYTEST_'))}
    # aiida-core's daemon client runs `verdi` from the PATH, as in an activated virtual environment.
    env['PATH'] = f'{Path(sys.executable).parent}{os.pathsep}{env.get("PATH", "")}'
    return subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-s', '-p', 'no:cacheprovider', *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def printed(result: subprocess.CompletedProcess[str], tag: str) -> dict:
    # With -q -s, what a test prints follows the progress dots of the tests before it on the same line.
    found = [line.split(f'{tag} ', 1)[1] for line in result.stdout.splitlines() if f'{tag} {{' in line]
    assert found, f'no {tag} line in the output:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}'
    return json.loads(found[-1])


def test_a_plugins_tests_pass_on_aiida_zmq_with_the_option() -> None:
    result = run_pytest('--aiida-broker=zmq')
    output = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    assert '4 passed' in result.stdout, output
    assert printed(result, 'PROFILE')['broker'] == 'zmq'
    daemon = printed(result, 'DAEMON')
    assert len(daemon['pids']) >= 3, daemon  # circusd, a worker, the broker (and its plugins)

    def all_gone() -> bool:
        alive = [pid for pid in daemon['pids'] if psutil.pid_exists(pid)]
        return not [pid for pid in alive if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]

    # The session stopped its daemon, and with it the broker: nothing of it is left running.
    wait_until(all_gone, 30, interval=0.1, what='the daemon and broker of the finished session to be gone')


def test_the_ini_setting_does_the_same() -> None:
    result = run_pytest('-o', 'aiida_broker=zmq', '-k', 'session_profile')
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert printed(result, 'PROFILE')['broker'] == 'zmq'


def test_without_the_option_the_profile_is_what_the_conftest_asks_for() -> None:
    result = run_pytest('-k', 'session_profile')
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert printed(result, 'PROFILE')['broker'] == 'core.rabbitmq'


def test_a_bad_ini_value_is_a_usage_error_that_lists_the_choices() -> None:
    result = run_pytest('-o', 'aiida_broker=rabbit', '-k', 'session_profile')
    assert result.returncode == 4, result.stdout[-4000:] + result.stderr[-2000:]
    assert "aiida_broker = 'rabbit'" in result.stderr and 'zmq, default' in result.stderr


def test_the_option_imports_no_aiida_where_no_aiida_fixture_is_used(tmp_path: Path) -> None:
    (tmp_path / 'test_plain.py').write_text(
        'import sys\n\n\ndef test_plain():\n'
        '    assert not [name for name in sys.modules if name.split(".")[0] == "aiida"]\n'
    )
    result = run_pytest('--aiida-broker=zmq', str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert '1 passed' in result.stdout


def test_a_session_profile_not_made_by_the_factory_fails_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / 'conftest.py').write_text(
        "import pytest\n\npytest_plugins = ['aiida.tools.pytest_fixtures']\n\n\n"
        "@pytest.fixture(scope='session')\ndef aiida_profile(aiida_config, aiida_profile_factory):\n"
        '    with aiida_profile_factory.__wrapped__(aiida_config) as profile:\n        yield profile\n'
    )
    # Every test that uses the profile fails, not the first only (pytest caches the fixture's value).
    (tmp_path / 'test_profile.py').write_text('def test_one(aiida_profile):\n    pass\n\n\ndef test_two():\n    pass\n')
    result = run_pytest('--aiida-broker=zmq', '-rE', str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-2000:]
    assert '2 errors' in result.stdout, result.stdout[-4000:]
    assert result.stdout.count('has the broker None, not zmq') >= 2, result.stdout[-4000:]


STALE_TASK_TESTS = """
from aiida.engine.processes.control import get_process_tasks
from aiida.manage import get_manager


def test_leave_a_task_behind(aiida_profile):
    # What `verdi process repair` does for an active process without a task, with the daemon stopped.
    get_manager().get_process_controller().continue_process(12345, nowait=True, no_reply=True)
    assert get_process_tasks(get_manager().get_broker()) == [12345]


def test_a_clean_profile_has_a_clean_queue(aiida_profile_clean):
    # The storage was reset: pks start again, and a task naming pk 12345 would meet another process.
    assert get_process_tasks(get_manager().get_broker()) == []
"""


def test_a_storage_reset_takes_the_tasks_of_the_old_storage_with_it(tmp_path: Path) -> None:
    """aiida-core's suite leaves tasks in the queue (its repair tests revive made-up pks); after a storage reset a
    worker of a later test would continue whatever new process got such a pk (seen: a calc job run twice)."""
    (tmp_path / 'conftest.py').write_text("pytest_plugins = ['aiida.tools.pytest_fixtures']\n")
    (tmp_path / 'test_stale.py').write_text(STALE_TASK_TESTS)
    result = run_pytest('--aiida-broker=zmq', cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert '2 passed' in result.stdout, result.stdout[-4000:]
