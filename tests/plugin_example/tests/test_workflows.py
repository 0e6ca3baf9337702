"""The example plugin's tests: nothing here knows which broker runs them."""

import json
import os

import psutil
from aiida import orm
from aiida.engine import run_get_node
from aiida_plugin_example.workflows import DoubleSumWorkChain, DoubleWorkChain


def test_session_profile(aiida_profile):
    # What the project's test reads back: which broker the session profile has.
    print('PROFILE ' + json.dumps({'name': aiida_profile.name, 'broker': aiida_profile.process_control_backend}))


def test_run_in_this_interpreter(aiida_profile_clean):
    _, node = run_get_node(DoubleWorkChain, x=orm.Int(4))
    assert node.is_finished_ok
    assert node.outputs.result.value == 8


def test_submit_to_the_daemon(submit_and_await):
    node = submit_and_await(DoubleSumWorkChain, x=orm.Int(1), y=orm.Int(2), timeout=120)
    assert node.is_finished_ok, node.exit_status
    assert node.outputs.result.value == 6
    child = node.called[0]
    assert child.is_finished_ok


def test_daemon_runs(started_daemon_client):
    assert started_daemon_client.is_daemon_running
    circusd = psutil.Process(started_daemon_client.get_daemon_pid())
    pids = [circusd.pid] + [child.pid for child in circusd.children(recursive=True)]
    # What the project's test checks is gone when the session ends: the daemon and every process under it.
    print('DAEMON ' + json.dumps({'pids': pids, 'test_pid': os.getpid()}))
