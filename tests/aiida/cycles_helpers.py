"""Helpers of ``test_daemon_cycles.py``: checks run in the test process, and a script run inside the profile.

As a script, ``python cycles_helpers.py PROFILE COMMAND [ARGS]`` loads the profile (the test process never does) and
prints one JSON line:

- ``submit OFFSET COUNT``: submit ``COUNT`` work chains, alternately an ``AddWorkChain`` and a ``ParentWorkChain``
  (which submits an ``AddWorkChain`` child), with ``x = OFFSET + i`` and ``y = 1``, so that every sum is unique; also
  say how many processes of the profile are not terminated right after (the work in flight);
- ``restart-api``: ``DaemonClient(profile).restart_daemon()``, the Python API of a restart;
- ``describe PK...``: kind, state and caller of processes (what ``verdi process repair`` lists).
"""

from __future__ import annotations

import json
import sys
import typing as t
from pathlib import Path

import psutil

if t.TYPE_CHECKING:
    from aiida_profile import AiidaZmqProfile

HERE = Path(__file__)
TERMINAL = ['finished', 'excepted', 'killed']


# --- in the test process ---------------------------------------------------------------------------------------------


def helper(profile: AiidaZmqProfile, *args: str, timeout: float = 180.0) -> dict[str, t.Any]:
    """Run a command of this script in ``profile`` and return its JSON answer."""
    from aiida_profile import CommandFailed

    result = profile.run(sys.executable, str(HERE), profile.name, *args, check=False, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith('{')]
    if result.returncode != 0 or not lines:
        raise CommandFailed(
            f'cycles_helpers {" ".join(args)} exited with {result.returncode}\n--- stdout\n{result.stdout}\n'
            f'--- stderr\n{result.stderr}'
        )
    return json.loads(lines[-1])


def daemon_processes(profile: AiidaZmqProfile) -> dict[str, list[int]]:
    """Every watcher of the profile's arbiter with its pids (workers, broker, plugins), and the arbiter itself."""
    from aiida_zmq.circus import CircusController

    found: dict[str, list[int]] = {}
    arbiter = profile.daemon_pid()
    if arbiter is not None:
        found['circusd'] = [arbiter]
    with CircusController(profile.circus_endpoint(), timeout=5.0) as controller:
        for name in controller.call('status').get('statuses', {}):
            found[name] = controller.watcher_pids(name)
    return found


def broker_alive_in_arbiter(profile: AiidaZmqProfile) -> dict[str, t.Any] | None:
    """The broker's ``admin('status')`` if its watcher is active in the arbiter and the broker answers, else None.

    ``None`` (not an exception) while things are still coming up, so that it can be waited for.
    """
    from aiida_zmq.circus import CircusCallError, CircusController
    from aiida_zmq.exceptions import AdminError

    try:
        with CircusController(profile.circus_endpoint(), timeout=5.0) as controller:
            if controller.watcher_status(profile.watcher) != 'active':
                return None
        if profile.broker_pid() is None:
            return None
        return profile.broker_status()
    except (CircusCallError, OSError, AdminError, TimeoutError):
        return None


def identities(pids: list[int]) -> set[tuple[int, float]]:
    """``(pid, start time)`` of running processes: a pid alone may be reused by another process later."""
    found = set()
    for pid in pids:
        try:
            found.add((pid, psutil.Process(pid).create_time()))
        except psutil.NoSuchProcess:
            pass
    return found


def alive(processes: set[tuple[int, float]]) -> list[int]:
    """The processes of ``processes`` that still run (zombies do not count: circus just has not reaped them yet)."""
    running = []
    for pid, started in sorted(processes):
        try:
            process = psutil.Process(pid)
            if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


# --- inside the profile ----------------------------------------------------------------------------------------------


def _not_terminated() -> int:
    from aiida import orm

    query = orm.QueryBuilder().append(
        orm.ProcessNode, filters={'attributes.process_state': {'!in': TERMINAL}}, project='id'
    )
    return query.count()


def cmd_submit(offset: int, count: int) -> dict[str, t.Any]:
    from aiida import orm
    from aiida.engine import submit

    from aiida_zmq.aiida.demo_workflows import AddWorkChain, ParentWorkChain

    kinds = [AddWorkChain, ParentWorkChain]
    pks = [submit(kinds[i % 2], x=orm.Int(offset + i), y=orm.Int(1)).pk for i in range(count)]
    return {'pks': pks, 'in_flight': _not_terminated()}


def cmd_describe(pks: list[int]) -> dict[str, t.Any]:
    """Kind, state and caller of processes: what ``verdi process repair`` listed."""
    from aiida import orm

    described = {}
    for pk in pks:
        node = orm.load_node(pk)
        caller = node.caller
        described[pk] = {
            'calcfunction': isinstance(node, orm.CalcFunctionNode),
            'label': node.label,
            'state': node.process_state.value if node.process_state else None,
            'caller_finished_ok': caller.is_finished_ok if caller is not None else None,
        }
    return {'processes': described}


def cmd_restart_api() -> dict[str, t.Any]:
    from aiida.engine.daemon.client import DaemonClient
    from aiida.manage import get_manager

    profile = get_manager().get_profile()
    assert profile is not None  # main() loaded it
    response = DaemonClient(profile).restart_daemon(wait=True)
    return {'response': response, 'in_flight': _not_terminated()}


def main() -> int:
    profile, command, *args = sys.argv[1:]
    from aiida import load_profile

    load_profile(profile)
    if command == 'submit':
        answer = cmd_submit(int(args[0]), int(args[1]))
    elif command == 'restart-api':
        answer = cmd_restart_api()
    elif command == 'describe':
        answer = cmd_describe([int(pk) for pk in args])
    else:
        raise SystemExit(f'unknown command {command!r}: use `submit OFFSET COUNT`, `restart-api` or `describe PK...`')
    print(json.dumps(answer, default=str), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
