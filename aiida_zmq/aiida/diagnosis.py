"""Why a process does not move: AiiDA's view of it joined with the broker's, and one sentence saying what goes on
and what to type (``aiida-zmq explain``; the cases are in ``docs/stuck.md``, each with a test that produces it).

:func:`diagnose` is a pure function of :class:`Facts` (gathered by ``aiida_zmq.cli.explain``): no AiiDA import, so
each case reads as a rule here. The cases, checked in this order (the first that holds is the answer):

- ``terminated``: the process finished, excepted or was killed; nothing waits (a task still stored for it is
  ``sealed-with-task``: safe to drop);
- ``daemon-not-running`` / ``broker-not-running``: nothing can run it until they are started;
- ``dead-lettered``: its task was given up on (why), ``aiida-zmq dead-letter requeue ID``;
- ``no-task``: an active process with no task anywhere: ``aiida-zmq repair`` revives it (exactly once);
- ``paused``: paused (its node says so): ``verdi process play PK``;
- ``checkpoint-paused``: its checkpoint says paused while its node does not, and its worker took the task after
  the node last changed (aiida-core saves no checkpoint on play, #6569: a daemon restart reloaded it paused):
  ``verdi process play PK``;
- ``holder-gone``: its task is held by a worker process that is gone or silent: the broker hands it out after the
  peer timeout, or ``aiida-zmq tasks requeue --pid P`` now;
- ``orphan``: delivered before the broker restarted, waiting for its worker to reclaim it;
- ``backing-off``: given back, offered again at a time;
- ``waiting-for-slot``: its task waits in the queue (how many are ahead; workers and their slots);
- ``waiting-on-children``: running in a worker, and waiting on children that have not terminated;
- ``running``: running in worker P (alive, answering heartbeats).
"""

from __future__ import annotations

import dataclasses
import time
import typing as t

__all__ = ('Diagnosis', 'Facts', 'Worker', 'diagnose')


@dataclasses.dataclass
class Worker:
    """A daemon worker as the broker sees it: a session consuming the profile's launch queue."""

    pid: int
    slots: int  # its prefetch: AiiDA's daemon.worker_process_slots (0: unlimited)
    held: int


@dataclasses.dataclass
class Facts:
    """What is known of one process: AiiDA's view (``process``: a ProcessView as a dict, None when there is none),
    the broker's tasks for it (the ``task-info`` rows), its RPC owner, its children, the daemon and the broker."""

    pk: int
    process: dict[str, t.Any] | None
    tasks: list[dict[str, t.Any]]
    rpc_owner: dict[str, t.Any] | None
    children: list[dict[str, t.Any]]
    daemon_running: bool
    broker_running: bool
    workers: list[Worker] | None  # None when the broker is not running (it knows them)
    peer_timeout: float | None
    holder_alive: dict[int, bool] = dataclasses.field(default_factory=dict)  # pid -> alive on this machine
    now: float = dataclasses.field(default_factory=time.time)


@dataclasses.dataclass
class Diagnosis:
    case: str
    sentence: str


_TERMINATED = ('finished', 'excepted', 'killed')


def _live_tasks(facts: Facts) -> list[dict[str, t.Any]]:
    return [task for task in facts.tasks if task['state'] != 'gone']


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f'{seconds:.0f} s'
    if seconds < 7200:
        return f'{seconds / 60:.0f} min'
    return f'{seconds / 3600:.1f} h'


def diagnose(facts: Facts) -> Diagnosis:
    """The first case (module docstring) that holds for these facts, with its sentence."""
    pk, process = facts.pk, facts.process
    if process is None:
        return Diagnosis(
            'unknown', f'There is no process {pk} in this profile: check the pk (`verdi process list -a`).'
        )
    live = _live_tasks(facts)
    if process['state'] in _TERMINATED or process['sealed']:
        return _terminated(facts, live)
    for rule in (_not_running, _dead, _no_task, _paused, _held, _waiting):
        found = rule(facts, live)
        if found is not None:
            return found
    return Diagnosis('unclear', f'Process {pk} is {process["state"]}; its task is {live[0]["state"]}.')


def _terminated(facts: Facts, live: list[dict[str, t.Any]]) -> Diagnosis:
    pk, state = facts.pk, facts.process['state'] if facts.process else None
    if live:
        ids = ', '.join(str(task['id']) for task in live)
        return Diagnosis(
            'sealed-with-task',
            f'Process {pk} is {state} (sealed), yet task {ids} for it is still stored: it is safe to drop; '
            '`verdi process repair` (daemon stopped) acknowledges it, and a worker given it drops it too.',
        )
    return Diagnosis('terminated', f'Process {pk} is {state}: it is not stuck, nothing waits for it.')


def _not_running(facts: Facts, live: list[dict[str, t.Any]]) -> Diagnosis | None:
    pk = facts.pk
    if not facts.daemon_running:
        where = 'its task waits in the broker store' if live else 'and it has no task (see below)'
        hint = '' if live else ' Then `verdi process repair` revives it (it has no task).'
        return Diagnosis(
            'daemon-not-running',
            f'The daemon is not running, so nothing runs process {pk} ({where}): start it with `verdi daemon start`.'
            + hint,
        )
    if not facts.broker_running:
        return Diagnosis(
            'broker-not-running',
            f'The daemon runs but its broker does not, so no worker gets process {pk}: `verdi daemon restart` '
            'starts it again (its task is kept in the store); `aiida-zmq status` shows why it stopped.',
        )
    return None


def _dead(facts: Facts, live: list[dict[str, t.Any]]) -> Diagnosis | None:
    dead = [task for task in live if task['state'] == 'dead']
    if not dead or len(dead) < len(live):
        return None
    task = dead[0]
    return Diagnosis(
        'dead-lettered',
        f'The task of process {facts.pk} (task {task["id"]}) is dead-lettered: {task.get("dead_reason")}. '
        f'Look at why (`verdi process report {facts.pk}`, the daemon log), then `aiida-zmq dead-letter requeue '
        f'{task["id"]}` to run it again.',
    )


def _no_task(facts: Facts, live: list[dict[str, t.Any]]) -> Diagnosis | None:
    if live:
        return None
    gone = [task for task in facts.tasks if task['state'] == 'gone']
    seen = ''
    if gone:
        last = gone[-1]['events'][-1] if gone[-1]['events'] else None
        seen = f' (its last task, {gone[-1]["id"]}, was {last["event"]}: {last["detail"]})' if last else ''
    return Diagnosis(
        'no-task',
        f'Process {facts.pk} is {facts.process["state"] if facts.process else "?"} but has no task in the broker'
        f'{seen}: it was lost before this broker or sent to another one. `aiida-zmq repair` revives it, exactly '
        'once, with the daemon running (`verdi process repair` too, with the daemon stopped).',
    )


def _paused(facts: Facts, live: list[dict[str, t.Any]]) -> Diagnosis | None:
    process = facts.process or {}
    if process.get('paused'):
        return Diagnosis('paused', f'Process {facts.pk} is paused: `verdi process play {facts.pk}` resumes it.')
    # Reloaded from a checkpoint that says paused: its worker took the task after the node last changed (the play
    # that unpaused it). Played within the worker that still holds it, it runs: its checkpoint is only stale then.
    reloaded = [
        task
        for task in live
        if task.get('holder') and (task['holder'].get('since') or 0) > process.get('last_change', float('inf'))
    ]
    if process.get('checkpoint_paused') and reloaded:
        return Diagnosis(
            'checkpoint-paused',
            f'Process {facts.pk} was reloaded paused: its checkpoint says paused while its node does not (aiida-core '
            'saves no checkpoint on play, aiida-core #6569, so a daemon restart reloads it paused). '
            f'`verdi process play {facts.pk}` resumes it.',
        )
    return None


def _held(facts: Facts, live: list[dict[str, t.Any]]) -> Diagnosis | None:
    pk = facts.pk
    for task in live:
        holder = task.get('holder')
        if holder is None:
            continue
        alive = facts.holder_alive.get(holder['pid'], True)
        timeout = facts.peer_timeout or 0.0
        if not alive or holder['silent_s'] > max(3.0, timeout / 2):
            at = time.strftime('%H:%M:%S', time.localtime(facts.now + max(0.0, timeout - holder['silent_s'])))
            state = 'is gone' if not alive else f'has been silent for {_ago(holder["silent_s"])}'
            return Diagnosis(
                'holder-gone',
                f'The task of process {pk} is held by worker pid {holder["pid"]}, which {state}: the broker hands it '
                f'to another worker at about {at} (peer timeout), or now with `aiida-zmq tasks requeue --pid '
                f'{holder["pid"]}`.',
            )
    return None


def _waiting(facts: Facts, live: list[dict[str, t.Any]]) -> Diagnosis | None:
    pk = facts.pk
    task = live[0]
    if task.get('orphan'):
        return Diagnosis(
            'orphan',
            f'The task of process {pk} was delivered before the broker restarted: its worker may reclaim it; if it '
            'does not within the reclaim grace, the broker hands it to another worker.',
        )
    if task.get('retry_at'):
        at = time.strftime('%H:%M:%S', time.localtime(task['retry_at']))
        return Diagnosis('backing-off', f'The task of process {pk} was given back; it is offered again at {at}.')
    if task['state'] == 'ready':
        return _waiting_for_slot(facts, task)
    holder = task.get('holder')
    if holder is None:
        return None
    busy = [c for c in facts.children if c['state'] not in _TERMINATED]
    if busy:
        listed = ', '.join(f'{c["pk"]} ({c["label"]}, {c["state"]})' for c in busy[:10])
        return Diagnosis(
            'waiting-on-children',
            f'Process {pk} runs in worker pid {holder["pid"]} and waits on its children: {listed}. '
            f'Ask the same of them: `aiida-zmq explain {" ".join(str(c["pk"]) for c in busy[:10])}`.',
        )
    return Diagnosis(
        'running',
        f'Process {pk} runs in worker pid {holder["pid"]} (alive, heard from {_ago(holder["silent_s"])} ago): it is '
        f'{(facts.process or {}).get("state")}, not stuck as far as the broker can tell; `verdi process report {pk}` '
        'says what it does.',
    )


def _waiting_for_slot(facts: Facts, task: dict[str, t.Any]) -> Diagnosis:
    ahead = task.get('ahead') or 0
    workers = facts.workers or []
    if not workers:
        return Diagnosis(
            'no-workers',
            f'The task of process {facts.pk} waits ({ahead} ahead of it) and no daemon worker takes tasks: '
            '`verdi daemon incr 1`, or `verdi daemon restart` if the workers hang.',
        )
    slots = sum(worker.slots for worker in workers)
    held = sum(worker.held for worker in workers)
    return Diagnosis(
        'waiting-for-slot',
        f'The task of process {facts.pk} waits for a free worker slot: {ahead} ahead of it; {len(workers)} '
        f'worker(s) hold {held} of {slots or "unlimited"} slots. It starts when one frees; for more at once: `verdi '
        'daemon incr 1`, or `verdi config set daemon.worker_process_slots N` and `verdi daemon restart`.',
    )
