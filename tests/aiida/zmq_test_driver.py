"""Submit workflows to the daemon of a profile and wait for them: run as ``python zmq_test_driver.py PROFILE N``.

A separate process, like a user's script, so the test process never loads an AiiDA profile itself. Prints one JSON
line with the outcome and the timings.
"""

from __future__ import annotations

import json
import sys
import time


def main(profile_name: str, count: int, timeout: float) -> int:
    from aiida import load_profile, orm
    from aiida.engine import submit
    from zmq_test_workflows import AddWorkChain

    load_profile(profile_name)
    started = time.monotonic()
    nodes = [submit(AddWorkChain, x=orm.Int(index), y=orm.Int(1)) for index in range(count)]
    submitted = time.monotonic()
    deadline = started + timeout
    pending = {node.pk for node in nodes}
    # Polling with a deadline: a process in another process (the daemon) offers no event to this one but the
    # broker's broadcasts, and relying on those here would test the broker with itself.
    while pending and time.monotonic() < deadline:
        pending = {pk for pk in pending if not orm.load_node(pk).is_terminated}
        if pending:
            time.sleep(0.1)
    finished = time.monotonic()
    results = []
    for submitted in nodes:
        node = orm.load_node(submitted.pk)
        total = node.outputs.sum.value if node.is_finished_ok else None
        results.append(
            {
                'pk': node.pk,
                'state': node.process_state.value if node.process_state else None,
                'exit_status': node.exit_status,
                'sum': total,
                'children': len(node.called),
            }
        )
    print(
        json.dumps(
            {
                'submitted_s': submitted - started,
                'elapsed_s': finished - started,
                'pending': sorted(pending),
                'results': results,
            }
        )
    )
    return 0 if not pending and all(result['exit_status'] == 0 for result in results) else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 60.0))
