"""`aiida-zmq status` names the circus arbiter that runs the broker, with the `circusctl` line to paste (issue 15)."""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest
from click.testing import CliRunner

from aiida_zmq.cli.main import main


def status(*args: str) -> str:
    result = CliRunner().invoke(main, ['status', *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize('via', ['ini', 'add'])  # a standalone circusd (circus-config) and attached as the daemon does
def test_status_shows_the_arbiter_and_a_circusctl_line_that_works(zmq_arbiter_factory, via):
    arbiter = zmq_arbiter_factory(via=via, plugins=False)
    text = status('--data-dir', str(arbiter.data_dir))
    assert f'circus     watcher {arbiter.broker_watcher}: active; arbiter {arbiter.controller}' in text, text
    line = next(line.strip() for line in text.splitlines() if 'circusctl --endpoint' in line)
    answer = json.loads(status('--data-dir', str(arbiter.data_dir), '--json'))
    assert answer['circus'] == {
        'endpoint': arbiter.controller,
        'watcher': arbiter.broker_watcher,
        'status': 'active',
        'circusctl': line,
    }
    # What the user pastes works as it is.
    pasted = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=60, check=False)
    assert pasted.returncode == 0, pasted.stderr
    assert f'{arbiter.broker_watcher}: active' in pasted.stdout


def test_status_of_a_broker_outside_circus_has_no_circus_line(zmq_broker):
    text = status('--data-dir', str(zmq_broker.data_dir))
    assert 'circus ' not in text
    assert json.loads(status('--endpoint', zmq_broker.endpoint, '--json'))['circus'] is None
