"""What the AiiDA end-to-end tests do inside a profile: ``python zmq_test_driver.py PROFILE COMMAND [ARGS]``.

A separate process, like a user's script, so the test process never loads an AiiDA profile itself. Every command
prints one JSON line with its outcome.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import typing as t

POLL = 0.2
TERMINAL = ['finished', 'excepted', 'killed']


def _states(pks: list[int]) -> dict[int, dict[str, t.Any]]:
    from aiida import orm

    states = {}
    for pk in pks:
        node = orm.load_node(pk)
        states[pk] = {
            'state': node.process_state.value if node.process_state else None,
            'paused': node.paused,
            'exit_status': node.exit_status,
            'terminated': node.is_terminated,
            'ok': node.is_finished_ok,
            'job_state': node.get_scheduler_state().value
            if isinstance(node, orm.CalcJobNode) and node.get_scheduler_state()
            else None,
            'sum': node.outputs.sum.value if node.is_finished_ok and 'sum' in node.outputs else None,
            'children': [child.pk for child in node.called],
        }
    return states


def _wait(pks: list[int], timeout: float) -> tuple[float, list[int]]:
    """Poll the database until every process terminated: the test must not rely on the broker it tests."""
    from aiida_zmq.aiida.queries import terminated

    started = time.monotonic()
    pending = set(pks)
    while pending and time.monotonic() - started < timeout:
        pending -= terminated(pending)
        if pending:
            time.sleep(POLL)
    return time.monotonic() - started, sorted(pending)


def cmd_info(args: argparse.Namespace) -> dict[str, t.Any]:
    from aiida.manage import get_manager

    broker = get_manager().get_broker()
    return {'uuid': str(get_manager().get_profile().uuid), 'data_dir': str(broker.data_dir), 'queue': broker.queue_name}


def cmd_submit(args: argparse.Namespace) -> dict[str, t.Any]:
    from aiida import orm
    from aiida.engine import submit

    from aiida_zmq.aiida.demo_workflows import AddWorkChain, ParentWorkChain

    kinds = {'add': [AddWorkChain], 'parent': [ParentWorkChain], 'mixed': [AddWorkChain, ParentWorkChain]}[args.kind]
    started = time.monotonic()
    pks = [submit(kinds[index % len(kinds)], x=orm.Int(index), y=orm.Int(1)).pk for index in range(args.count)]
    submitted = time.monotonic() - started
    answer: dict[str, t.Any] = {'pks': pks, 'submit_s': submitted}
    if args.wait:
        elapsed, pending = _wait(pks, args.wait)
        answer.update({'elapsed_s': elapsed + submitted, 'pending': pending, 'states': _states(pks)})
    return answer


def cmd_run(args: argparse.Namespace) -> dict[str, t.Any]:
    """``engine.run`` of a work chain that calls a calcfunction, and of a parent with a child: no daemon needed."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_zmq.aiida.demo_workflows import AddWorkChain, ParentWorkChain

    started = time.monotonic()
    _, node = run_get_node(AddWorkChain, x=orm.Int(2), y=orm.Int(3))
    _, parent = run_get_node(ParentWorkChain, x=orm.Int(4), y=orm.Int(5))
    return {'elapsed_s': time.monotonic() - started, 'states': _states([node.pk, parent.pk])}


def cmd_wait(args: argparse.Namespace) -> dict[str, t.Any]:
    elapsed, pending = _wait(args.pks, args.timeout)
    return {'elapsed_s': elapsed, 'pending': pending, 'states': _states(args.pks)}


def cmd_states(args: argparse.Namespace) -> dict[str, t.Any]:
    return {'states': _states(args.pks)}


def _hold_code(hold_file: str) -> t.Any:
    from aiida_zmq.aiida.demo_workflows import held_code

    return held_code(hold_file)


def cmd_submit_held(args: argparse.Namespace) -> dict[str, t.Any]:
    """Submit ``core.arithmetic.add`` jobs that run until the test removes the hold file (they wait, not spin)."""
    from aiida import orm
    from aiida.engine import submit
    from aiida.plugins import CalculationFactory

    code = _hold_code(args.hold_file)
    calculation = CalculationFactory('core.arithmetic.add')
    pks = [
        submit(
            calculation,
            code=code,
            x=orm.Int(index),
            y=orm.Int(1),
            metadata={'options': {'resources': {'num_machines': 1}}},
        ).pk
        for index in range(args.count)
    ]
    return {'pks': pks}


def cmd_submit_held_parent(args: argparse.Namespace) -> dict[str, t.Any]:
    """Submit work chains that each wait for a held job (:class:`aiida_zmq.aiida.demo_workflows.JobParentWorkChain`)."""
    from aiida import orm
    from aiida.engine import submit

    from aiida_zmq.aiida.demo_workflows import JobParentWorkChain

    code = _hold_code(args.hold_file)
    return {'pks': [submit(JobParentWorkChain, code=code, x=orm.Int(i), y=orm.Int(1)).pk for i in range(args.count)]}


def cmd_submit_two_children(args: argparse.Namespace) -> dict[str, t.Any]:
    """Submit work chains with a quick child, then a held job (:class:`zmq_test_workflows.TwoChildrenWorkChain`)."""
    from aiida import orm
    from aiida.engine import submit
    from zmq_test_workflows import TwoChildrenWorkChain

    code = _hold_code(args.hold_file)
    return {'pks': [submit(TwoChildrenWorkChain, code=code, x=orm.Int(i), y=orm.Int(1)).pk for i in range(args.count)]}


def cmd_make_zombie(args: argparse.Namespace) -> dict[str, t.Any]:
    """Store an active process node with no task anywhere: what ``verdi process repair`` calls a zombie."""
    from aiida import orm
    from plumpy import ProcessState

    node = orm.WorkflowNode()
    node.set_process_state(ProcessState.CREATED)
    node.store()
    return {'pk': node.pk}


def cmd_bury(args: argparse.Namespace) -> dict[str, t.Any]:
    """End a process node by hand (killed, sealed): for a zombie a test made, which no worker can continue."""
    from aiida import orm
    from plumpy import ProcessState

    node = orm.load_node(args.pk)
    node.set_process_state(ProcessState.KILLED)
    node.seal()
    return {'buried': args.pk}


def cmd_send_continue(args: argparse.Namespace) -> dict[str, t.Any]:
    """Send a continue task for ``pk`` as AiiDA's controller does (with the daemon stopped: into the store)."""
    from aiida.manage import get_manager

    get_manager().get_process_controller().continue_process(args.pk, nowait=True, no_reply=True)
    return {'sent': args.pk}


def cmd_live_status(args: argparse.Namespace) -> dict[str, t.Any]:
    """The process's own status, from the worker that runs it (``verdi process status``'s RPC); nothing if none."""
    from aiida.manage import get_manager
    from plumpy.futures import unwrap_kiwi_future

    try:
        status = unwrap_kiwi_future(get_manager().get_process_controller().get_status(args.pk)).result(timeout=10)
    except Exception as exception:  # not loaded yet (unroutable) or slow: the test asks again
        return {'error': repr(exception)}
    return {'status': {key: value for key, value in status.items() if key in ('paused', 'state', 'process_string')}}


def cmd_checkpoint_paused(args: argparse.Namespace) -> dict[str, t.Any]:
    """Whether the process's saved checkpoint is of a paused process (what a worker reloads it as)."""
    import yaml
    from aiida import orm
    from aiida.orm.utils import serialize

    checkpoint = orm.load_node(args.pk).checkpoint
    bundle = yaml.load(checkpoint, Loader=serialize.AiiDALoader) if checkpoint else {}
    return {'paused': bundle.get('_paused') is not None}


def _ready_then_wait_to_go(args: argparse.Namespace, communicator: t.Any) -> None:
    """Say how the communicator is (its repr, in the ready file), then wait for the test's go file (bounded)."""
    from pathlib import Path

    Path(args.ready_file).write_text(repr(communicator))
    deadline = time.monotonic() + 120
    while not Path(args.go_file).exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # another process's file: no event to wait on


def cmd_repair_session(args: argparse.Namespace) -> dict[str, t.Any]:
    """An interpreter that connected while the daemon ran, repairing after the daemon stopped, as ``verdi process
    repair`` does (same calls): tasks of terminated processes acknowledged, zombies revived."""
    from aiida.engine.processes.control import get_active_processes, get_process_tasks, iterate_process_tasks
    from aiida.manage import get_manager

    manager = get_manager()
    communicator = manager.get_communicator()
    _ready_then_wait_to_go(args, communicator)
    started = time.monotonic()
    broker = manager.get_broker()
    active = list(get_active_processes(project='id'))
    tasks = get_process_tasks(broker)
    acknowledged = []
    for task in iterate_process_tasks(broker):
        pid = task.body.get('args', {}).get('pid', None)
        if pid not in active:
            with task.processing() as outcome:
                outcome.set_result(False)
            acknowledged.append(pid)
    zombies = sorted(set(active) - set(tasks))
    controller = manager.get_process_controller()
    for pid in zombies:
        controller.continue_process(pid)
    return {
        'communicator': repr(communicator),
        'active': active,
        'tasks': tasks,
        'acknowledged': acknowledged,
        'revived': zombies,
        'tasks_after': get_process_tasks(broker),
        'elapsed_s': time.monotonic() - started,
    }


def cmd_session(args: argparse.Namespace) -> dict[str, t.Any]:
    """A long-lived session (a notebook): connect while the daemon runs, then submit when told (after a stop)."""

    from aiida import orm
    from aiida.engine import submit
    from aiida.manage import get_manager

    from aiida_zmq.aiida.demo_workflows import AddWorkChain

    communicator = get_manager().get_communicator()
    _ready_then_wait_to_go(args, communicator)
    started = time.monotonic()
    pks = [submit(AddWorkChain, x=orm.Int(index), y=orm.Int(1)).pk for index in range(args.count)]
    return {'communicator': repr(communicator), 'pks': pks, 'submit_s': time.monotonic() - started}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('profile')
    commands = parser.add_subparsers(dest='command', required=True)
    commands.add_parser('info').set_defaults(function=cmd_info)
    submit = commands.add_parser('submit')
    submit.add_argument('kind', choices=['add', 'parent', 'mixed'])
    submit.add_argument('count', type=int)
    submit.add_argument('--wait', type=float, default=0.0, help='wait this long for them to terminate')
    submit.set_defaults(function=cmd_submit)
    commands.add_parser('run').set_defaults(function=cmd_run)
    wait = commands.add_parser('wait')
    wait.add_argument('pks', type=int, nargs='+')
    wait.add_argument('--timeout', type=float, default=60.0)
    wait.set_defaults(function=cmd_wait)
    states = commands.add_parser('states')
    states.add_argument('pks', type=int, nargs='+')
    states.set_defaults(function=cmd_states)
    held = commands.add_parser('submit-held')
    held.add_argument('count', type=int)
    held.add_argument('hold_file')
    held.set_defaults(function=cmd_submit_held)
    held_parent = commands.add_parser('submit-held-parent')
    held_parent.add_argument('count', type=int)
    held_parent.add_argument('hold_file')
    held_parent.set_defaults(function=cmd_submit_held_parent)
    two = commands.add_parser('submit-two-children')
    two.add_argument('count', type=int)
    two.add_argument('hold_file')
    two.set_defaults(function=cmd_submit_two_children)
    commands.add_parser('make-zombie').set_defaults(function=cmd_make_zombie)
    bury = commands.add_parser('bury')
    bury.add_argument('pk', type=int)
    bury.set_defaults(function=cmd_bury)
    send_continue = commands.add_parser('send-continue')
    send_continue.add_argument('pk', type=int)
    send_continue.set_defaults(function=cmd_send_continue)
    for name, function in (('live-status', cmd_live_status), ('checkpoint-paused', cmd_checkpoint_paused)):
        command = commands.add_parser(name)
        command.add_argument('pk', type=int)
        command.set_defaults(function=function)
    repair = commands.add_parser('repair-session')
    repair.add_argument('ready_file')
    repair.add_argument('go_file')
    repair.set_defaults(function=cmd_repair_session)
    session = commands.add_parser('session')
    session.add_argument('count', type=int)
    session.add_argument('ready_file')
    session.add_argument('go_file')
    session.set_defaults(function=cmd_session)
    args = parser.parse_args()

    from aiida import load_profile

    load_profile(args.profile)
    print(json.dumps(args.function(args)), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
